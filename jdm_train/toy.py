"""An analytic world where JDM's truth is known exactly, and the trainer in miniature.

Data: a 2-D Gaussian mixture with unequal weights (one light mode of 5%). Its diffused score and
x0 = E[x | x_t] are closed-form for every t on the SD schedule, so the teacher is exact.
Control: a discrete c with a known classifier p(c|x) = softmax(beta * u_k . x) (three angular
sectors) that the teacher does not know; p(x|c) ∝ p(c|x) p(x) is sampled exactly by rejection.

The toy trainer computes the objective with the SD trainer's loss functions (`jdm_train.losses`)
for the same players: a student `G(z, c)`, a fake score initialised to the teacher (teacher +
zero-initialised MLP correction), a consistency model = the fake score with a peft LoRA on its
`nn.Linear` layers, and a discriminator head on the fake score's hidden features. Its loop is
its own, not the SD trainer's: each step first updates the fake score (with the discriminator)
and then the consistency LoRA, `fake_steps` times (two by default), each time on fresh student
samples, and the generator last; the SD trainer (`players.phases`) updates the generator first
and then the fake score, consistency LoRA and discriminator together. The toy also fits the fake
score on t in [0, 999]. Baselines: DSM ControlNet and implicit VSD. `evaluate` measures fidelity
(sliced W2 to the true conditionals), consistency (mean true p(c|x)) and light-mode coverage.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from jdm_train import losses
from jdm_train.denoisers import averaged
from jdm_train.schedule import NoiseSchedule

METHODS = ("jdm", "vsd", "dsm")
CONDITIONS = ("estimate", "exact")  # grad log p(c|x_t) through the consistency model, or in closed form
# The trainer's defaults (config.TrainConfig): Eq. 5's weight 1, the condition term as an x0 gradient
# at every t ("snr"). Under Eq. 5's own lambda_t the single-sample estimate over-pushes at high t, where
# the exact grad log p(c|x_t) vanishes (`python -m jdm_train.bench toy --referee`).
TOY_CONDITION_WEIGHT = 1.0
TOY_CONDITION_WEIGHTING = "snr"


@dataclass
class ToyWorld:
    """A 2-D Gaussian mixture `sum_k w_k N(mu_k, s_k^2 I)` and a sector classifier `p(c|x)`."""

    means: Tensor  # (K, 2)
    stds: Tensor  # (K,)
    weights: Tensor  # (K,)
    directions: Tensor  # (C, 2) unit vectors u_c
    sharpness: float
    light_mode: int
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)

    @property
    def num_classes(self) -> int:
        return self.directions.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """x ~ p(x) (n, 2) and the mixture component of each sample (n,)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.stds[k, None] * torch.randn(n, 2, generator=generator)
        return x, k

    def condition_logits(self, x: Tensor) -> Tensor:
        """Logits of p(c|x), (n, C)."""
        return self.sharpness * x @ self.directions.to(x).T

    def log_p_c_given_x(self, x: Tensor, c: Tensor) -> Tensor:
        """log p(c|x) (n,) for integer c (n,): the known, differentiable condition likelihood."""
        return torch.log_softmax(self.condition_logits(x), dim=1).gather(1, c.long()[:, None]).squeeze(1)

    def log_p_c_given_x_t(self, x_t: Tensor, t: Tensor, c: Tensor, nodes: int = 12) -> Tensor:
        """Exact log p(c|x_t) = log E_{x ~ p(x|x_t)} p(c|x) (n,), differentiable in x_t: the condition
        term of Eq. 5 without any estimate. The posterior p(x|x_t) of the mixture is a mixture of
        Gaussians (responsibilities, Tweedie means, variances s^2 sigma^2 / (alpha^2 s^2 + sigma^2));
        the softmax's expectation under each is a `nodes` x `nodes` Gauss-Hermite quadrature."""
        from numpy.polynomial.hermite_e import hermegauss

        resp, diff, var = self._diffused(x_t, t)
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        s2 = self.stds.to(x_t) ** 2
        mean = self.means.to(x_t) + (alpha * s2 / var)[:, :, None] * diff  # (B, K, 2)
        std = (s2 * sigma**2 / var).sqrt()  # (B, K)
        z, w = (torch.as_tensor(v, dtype=x_t.dtype) for v in hermegauss(nodes))
        grid = torch.stack(torch.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2)  # (Q, 2)
        weight = (w[:, None] * w[None, :]).reshape(-1) / (2 * math.pi)
        x = mean[:, :, None, :] + std[:, :, None, None] * grid  # (B, K, Q, 2)
        p_c = torch.softmax(self.condition_logits(x.reshape(-1, 2)), dim=1).reshape(*x.shape[:3], -1)
        p_c = p_c.gather(3, c.long().reshape(-1, 1, 1, 1).expand(*x.shape[:3], 1)).squeeze(3)
        return ((resp[:, :, None] * weight * p_c).sum((1, 2))).log()

    def sample_condition(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """c ~ p(c|x) (n,): the toy's condition extractor h."""
        return torch.multinomial(torch.softmax(self.condition_logits(x), dim=1), 1, generator=generator).squeeze(1)

    def sample_joint(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        x, _ = self.sample(n, generator)
        return x, self.sample_condition(x, generator)

    def sample_conditional(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exactly x ~ p(x|c) ∝ p(c|x) p(x): propose from p(x), accept with probability p(c|x) <= 1."""
        out, have = [], 0
        while have < n:
            x, _ = self.sample(4 * n, generator)
            accept = torch.rand(x.shape[0], generator=generator) < self.log_p_c_given_x(x, torch.full((x.shape[0],), c)).exp()
            out.append(x[accept])
            have += int(accept.sum())
        return torch.cat(out)[:n]

    def class_prior(self, n: int = 400_000, seed: int = 1234) -> Tensor:
        """p(c) = E_x p(c|x) (C,) by Monte Carlo with a fixed seed (no closed form for a softmax)."""
        x, _ = self.sample(n, torch.Generator().manual_seed(seed))
        return torch.softmax(self.condition_logits(x), dim=1).mean(0)

    def _diffused(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # x_t | k ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I): responsibilities and per-component variances.
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        var = alpha**2 * self.stds.to(x_t) ** 2 + sigma**2  # (B, K)
        diff = x_t[:, None, :] - alpha[:, :, None] * self.means.to(x_t)  # (B, K, 2)
        log_r = self.weights.to(x_t).log() - diff.pow(2).sum(-1) / (2 * var) - var.log()
        return torch.softmax(log_r, dim=1), diff, var

    def denoise(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """Exact teacher x0 = E[x | x_t] (B, 2) of the diffused mixture (the real score of Eq. 5)."""
        resp, diff, var = self._diffused(x_t, t)
        alpha, _ = self.schedule.alpha_sigma(t, x_t)
        gain = alpha * self.stds.to(x_t) ** 2 / var  # (B, K)
        post = self.means.to(x_t) + gain[:, :, None] * diff
        return (resp[:, :, None] * post).sum(1)

    def score(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Exact grad_{x_t} log p_t(x_t) (B, 2), written without Tweedie (an independent check of `denoise`)."""
        resp, diff, var = self._diffused(x_t, t)
        return -(resp[:, :, None] * diff / var[:, :, None]).sum(1)

    def mode_of(self, x: Tensor) -> Tensor:
        """Most responsible mixture component of clean samples (n,)."""
        resp, _, _ = self._diffused(x, torch.zeros(x.shape[0], dtype=torch.long))
        return resp.argmax(1)


def default_world() -> ToyWorld:
    """Five modes on a ring of radius 2; sector 0 holds two heavy modes, sector 1 a heavy and the
    light (5%) mode, sector 2 one mode: p(x|c) is multimodal, so averaging modes is visible."""
    deg = torch.tensor([20.0, -35.0, 100.0, 150.0, 240.0]) * math.pi / 180
    means = 2.0 * torch.stack([deg.cos(), deg.sin()], 1)
    sector = torch.tensor([0.0, 120.0, 240.0]) * math.pi / 180
    return ToyWorld(
        means=means,
        stds=torch.full((5,), 0.3),
        weights=torch.tensor([0.30, 0.20, 0.25, 0.05, 0.20]),
        directions=torch.stack([sector.cos(), sector.sin()], 1),
        sharpness=3.0,
        light_mode=3,
    )


# --------------------------------------------------------------------------- networks


def _time_features(t: Tensor, n: int = 8) -> Tensor:
    freqs = math.pi * 2.0 ** torch.arange(n // 2, dtype=torch.float32)
    ang = (t.float() / 1000)[:, None] * freqs
    return torch.cat([ang.sin(), ang.cos()], 1)


class Student(nn.Module):
    """G(z, c): the one-step generator; c enters as a one-hot (the toy's ControlNet)."""

    def __init__(self, num_classes: int, hidden: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(2 + num_classes, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2),
        )

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        return self.net(torch.cat([z, nn.functional.one_hot(c.long(), self.num_classes).to(z)], 1))

    def denoise(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Denoiser form of the student (read as an x0 prediction at t_g, like the SD student)."""
        return self(x_t, cond)


class FakeScore(nn.Module):
    """eps_psi = eps_teacher + MLP correction with a zero last layer, so it starts as a copy of the
    teacher (as the SD fake score does). `features` feed the discriminator head."""

    def __init__(self, world: ToyWorld, hidden: int = 128):
        super().__init__()
        self.world = world
        self.inp = nn.Linear(2 + 8, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.disc_head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def features(self, x_t: Tensor, t: Tensor) -> Tensor:
        h = nn.functional.silu(self.inp(torch.cat([x_t, _time_features(t)], 1)))
        return nn.functional.silu(self.mid(h))

    def denoise(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        s = self.world.schedule
        eps_teacher = s.eps_from_x0(x_t, self.world.denoise(x_t, t), t)
        return s.x0_from_eps(x_t, eps_teacher + self.out(self.features(x_t, t)), t)

    def discriminator(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.disc_head(self.features(x_t, t)).squeeze(1)


def add_consistency_lora(fake: FakeScore, rank: int = 8) -> list[nn.Parameter]:
    """Inject the consistency LoRA (peft) into the fake score's denoising layers; returns its parameters.
    The base weights stay trainable: the fake-score step trains them with the LoRA switched off."""
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["inp", "mid", "out"]), fake)
    for m in fake.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(False)
    for p in fake.parameters():
        p.requires_grad_(True)
    return [p for n, p in fake.named_parameters() if "lora_" in n]


@contextmanager
def lora_enabled(model: nn.Module, enabled: bool):
    """Switch the consistency LoRA on (consistency model f) or off (fake score) for a block."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(enabled)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(False)
        # peft freezes disabled adapters; the toy trainer chooses what to step by optimizer instead.
        for p in model.parameters():
            p.requires_grad_(True)


# --------------------------------------------------------------------------- training


@dataclass
class ToyRun:
    student: Student
    logs: dict[str, float]


@dataclass
class _Auxiliary:
    """The players the generator learns against: the fake score (with the discriminator head when
    f != rkl) and the consistency LoRA on it with its EMA target, each with its optimiser."""

    world: ToyWorld
    fake: FakeScore
    opt_f: torch.optim.Optimizer
    use_disc: bool
    lora: list[nn.Parameter]
    opt_c: torch.optim.Optimizer | None = None
    ema: object = None
    points: Tensor | None = None

    @classmethod
    def build(cls, world: ToyWorld, lr: float, use_disc: bool, use_lora: bool, lora_rank: int, consistency_ema: float,
              consistency_points: int) -> "_Auxiliary":
        fake = FakeScore(world)
        lora = add_consistency_lora(fake, lora_rank) if use_lora else []
        lora_ids = {id(p) for p in lora}
        opt_f = torch.optim.Adam([p for p in fake.parameters() if id(p) not in lora_ids], lr=lr, betas=(0.0, 0.99))
        aux = cls(world, fake, opt_f, use_disc, lora)
        if lora:
            from diffusers.training_utils import EMAModel

            aux.opt_c = torch.optim.Adam(lora, lr=lr, betas=(0.0, 0.99))
            aux.ema = EMAModel(lora, decay=consistency_ema, foreach=True)
            aux.points = losses.consistency_timesteps(consistency_points, world.schedule)
        return aux

    def consistency(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """The consistency model f: the fake score with the LoRA on."""
        with lora_enabled(self.fake, True):
            return self.fake.denoise(x_t, t)

    @torch.no_grad()
    def consistency_target(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        """f^- of Eq. 8: the consistency model with the EMA of the LoRA."""
        with averaged(self.ema, self.lora):
            return self.consistency(x_t, t)

    def update(self, student: Student, x_data: Tensor, c: Tensor, batch: int, gen: torch.Generator) -> dict[str, Tensor]:
        """One fake-score update (Eq. 6, plus the discriminator's GAN loss when f != rkl), then one
        consistency-LoRA update (Eq. 8), on fresh student samples."""
        s = self.world.schedule
        with torch.no_grad():
            x = student(torch.randn(batch, 2, generator=gen), c)
        t = losses.sample_timesteps(batch, 0, 999, generator=gen)
        loss, flog = losses.fake_score_loss(self.fake.denoise, x, torch.randn(batch, 2, generator=gen), t, s)
        if self.use_disc:
            t_d = losses.sample_timesteps(batch, generator=gen)
            eps_d = torch.randn(batch, 2, generator=gen)
            with torch.no_grad():  # as in the SD trainer: the head learns, the fake score's features do not
                real_f = self.fake.features(s.add_noise(x_data, eps_d, t_d), t_d)
                fake_f = self.fake.features(s.add_noise(x, eps_d, t_d), t_d)
            d_loss, dlog = losses.discriminator_loss(self.fake.disc_head(real_f).squeeze(1),
                                                     self.fake.disc_head(fake_f).squeeze(1))
            loss = loss + d_loss
            flog.update(dlog)
        self.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_f.step()
        if self.opt_c is not None:
            flog.update(self._consistency_update(x, batch, gen))
        return flog

    def _consistency_update(self, x: Tensor, batch: int, gen: torch.Generator) -> dict[str, Tensor]:
        t_k, t_prev = losses.consistency_pairs(batch, self.points, gen)
        c_loss, clog = losses.consistency_loss(self.consistency, self.consistency_target, x,
                                               torch.randn(batch, 2, generator=gen), t_k, t_prev, self.world.schedule)
        self.opt_c.zero_grad(set_to_none=True)
        self.opt_f.zero_grad(set_to_none=True)
        c_loss.backward()
        self.opt_c.step()
        self.ema.step(self.lora)
        return clog


def _condition_terms(world: ToyWorld, aux: _Auxiliary, c: Tensor, method: str, condition: str) -> dict:
    # The condition term of JDM only: estimated through the consistency model, or exact (the referee).
    if method == "jdm" and condition == "exact":
        return dict(exact_condition=lambda x_t, t, c=c: world.log_p_c_given_x_t(x_t, t, c))
    if method == "jdm":
        return dict(consistency_denoise=aux.consistency, log_likelihood=lambda img, c=c: world.log_p_c_given_x(img, c))
    return {}


def _generator_update(world: ToyWorld, student: Student, opt_g: torch.optim.Optimizer, aux: _Auxiliary, c: Tensor,
                      batch: int, gen: torch.Generator, cond_terms: dict, **objective) -> dict[str, Tensor]:
    """One generator step (Eq. 10 through `losses.generator_loss`); `objective`: its weighting keywords."""
    x = student(torch.randn(batch, 2, generator=gen), c)
    t = losses.sample_timesteps(batch, generator=gen)
    g_loss, glog = losses.generator_loss(
        x, t, torch.randn(batch, 2, generator=gen), world.schedule, world.denoise, aux.fake.denoise,
        discriminator=aux.fake.discriminator if aux.use_disc else None, **objective, **cond_terms,
    )
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return glog


def _train_dsm(world: ToyWorld, student: Student, opt_g: torch.optim.Optimizer, steps: int, batch: int,
               gen: torch.Generator) -> ToyRun:
    logs: dict[str, Tensor] = {}
    for _ in range(steps):
        x_data, c = world.sample_joint(batch, gen)
        loss, logs = losses.dsm_controlnet_loss(student.denoise, x_data, torch.randn(batch, 2, generator=gen),
                                                world.schedule, c)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
    return ToyRun(student, {k: float(v) for k, v in logs.items()})


def train(
    world: ToyWorld, method: str = "jdm", divergence: str = "rkl", steps: int = 600, batch: int = 256, lr: float = 1e-3,
    lr_fake: float | None = 2e-3, seed: int = 0, fake_steps: int = 2, consistency_points: int = 40,
    consistency_ema: float = 0.95, lora_rank: int = 8, condition_weight: float = TOY_CONDITION_WEIGHT,
    condition: str = "estimate", condition_weighting: str = TOY_CONDITION_WEIGHTING, weighting: str = "dmd",
    callback=None,
) -> ToyRun:
    """Train a student with `method` in {"jdm", "vsd", "dsm"}. Each step: `fake_steps` times a
    fake-score update (Eq. 6, with the discriminator's GAN loss when f != rkl) followed by a
    consistency-LoRA update (Eq. 8), then one generator step (Eq. 10 through
    `losses.generator_loss`; VSD: fidelity only; DSM: regression). The SD trainer takes the same
    updates generator first (module docstring).
    The consistency LoRA is trained as the SD trainer trains it (pairs on `consistency_points` Karras
    points down to the boundary t = 0, an EMA target with decay `consistency_ema`); the fake score is
    fitted on t in [0, 999]. `condition="exact"` replaces the consistency-model estimate of
    grad log p(c|x_t) by the exact one (`ToyWorld.log_p_c_given_x_t`), the referee of the estimate.
    `callback(step, student, logs)` runs after every generator step of JDM / VSD."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student = Student(world.num_classes)
    opt_g = torch.optim.Adam(student.parameters(), lr=lr, betas=(0.0, 0.99))
    if method == "dsm":
        return _train_dsm(world, student, opt_g, steps, batch, gen)
    aux = _Auxiliary.build(world, lr if lr_fake is None else lr_fake, divergence != "rkl",
                           method == "jdm" and condition == "estimate", lora_rank, consistency_ema, consistency_points)
    objective = dict(divergence=divergence, weighting=weighting, condition_weight=condition_weight,
                     condition_weighting=condition_weighting)
    logs: dict[str, Tensor] = {}
    for step in range(steps):
        x_data, c = world.sample_joint(batch, gen)
        for _ in range(fake_steps):
            flog = aux.update(student, x_data, c, batch, gen)
        glog = _generator_update(world, student, opt_g, aux, c, batch, gen, _condition_terms(world, aux, c, method, condition),
                                 **objective)
        logs = {**flog, **glog}
        if callback is not None:
            callback(step, student, logs)
    return ToyRun(student, {k: float(v) for k, v in logs.items()})


# --------------------------------------------------------------------------- evaluation


def sliced_w2(a: Tensor, b: Tensor, projections: Tensor) -> float:
    """Sliced Wasserstein-2 between equal-size samples a, b (n, 2) over unit `projections` (P, 2)."""
    pa, pb = (a @ projections.T).sort(0).values, (b @ projections.T).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


@torch.no_grad()
def evaluate(world: ToyWorld, sample, n: int = 4000, seed: int = 0) -> dict[str, float]:
    """Fidelity `sw2` (sliced W2 to fresh exact samples of p(x|c), averaged over c with p(c)),
    `consistency` (E_c E_{x~sample(c)} p(c|x)) and `light_mass` (p(c)-weighted fraction of samples on
    the light mode). `sample(c: int, n, generator) -> (n, 2)`."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    prior = world.class_prior()
    ang = torch.rand(64, generator=gen) * math.pi
    proj = torch.stack([ang.cos(), ang.sin()], 1)
    out = {"sw2": 0.0, "consistency": 0.0, "light_mass": 0.0}
    for c in range(world.num_classes):
        x = sample(c, n, gen)
        truth = world.sample_conditional(c, n, gen)
        out["sw2"] += float(prior[c]) * sliced_w2(x, truth, proj)
        out["consistency"] += float(prior[c]) * float(world.log_p_c_given_x(x, torch.full((n,), c)).exp().mean())
        out["light_mass"] += float(prior[c]) * float((world.mode_of(x) == world.light_mode).float().mean())
    return out


def student_sampler(student: Student):
    def sample(c: int, n: int, gen: torch.Generator) -> Tensor:
        return student(torch.randn(n, 2, generator=gen), torch.full((n,), c))

    return sample


def truth_sampler(world: ToyWorld):
    return lambda c, n, gen: world.sample_conditional(c, n, gen)
