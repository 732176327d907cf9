"""The players of JDM (Alg. 1) and the loss each is updated with.

Players: the student (generator: UNet or its LoRA, and the ControlNet), the fake score (Eq. 6),
the consistency LoRA (Eq. 8) and, for f-divergences other than reverse-KL, the density-ratio
discriminator (f-distill). `Players` computes every loss from a micro-batch and returns
`(loss, logs)`; `phases` groups them into updates: each `Term` says which parameters its
gradient goes to. Only the loop (`train.py`) calls backward, averages, clips and steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from jdm_train import losses, optim
from jdm_train.build import Models
from jdm_train.config import TrainConfig
from jdm_train.denoisers import Cond, UNetDenoiser, averaged
from jdm_train.randomness import keyed_generator
from jdm_train.sampling import generate_one_step
from jdm_train.schedule import NoiseSchedule

Loss = Callable[[dict, int], "tuple[Tensor, dict]"]


class RandomStreams:
    """Every random draw of a run from its own torch.Generator (`randomness.keyed_generator`), a pure
    function of (seed, step, micro-batch, repeat, process, purpose)."""

    def __init__(self, seed: int, process: int, device: torch.device):
        self.seed, self.process, self.device = seed, process, device

    def generator(self, step: int, purpose: str, micro: int = 0, repeat: int = 0) -> torch.Generator:
        return keyed_generator((self.seed, step, micro, repeat, self.process, purpose), self.device)

    def randn(self, shape, step: int, purpose: str, micro: int = 0, repeat: int = 0) -> Tensor:
        return torch.randn(shape, generator=self.generator(step, purpose, micro, repeat), device=self.device)


@dataclass
class Term:
    """One loss of a phase, back-propagated into `params` only, times `weight`. `role`: the
    denoiser whose adapters must be active when its gradient-checkpointed pass is recomputed."""

    name: str
    loss: Loss
    params: list
    weight: float = 1.0
    role: UNetDenoiser | None = None


@dataclass
class Phase:
    """One update: its terms on every micro-batch, then `optimizers` step and `averages` follow."""

    name: str
    terms: list[Term]
    optimizers: list[str]
    averages: list = field(default_factory=list)  # (EMAModel, params)
    repeats: int = 1


class Players:
    """The losses of a run's players on micro-batches (dicts from `Trainer.load_batch`: images,
    captions, control, cond, micro, step, and condition_mask with control dropout)."""

    def __init__(self, config: TrainConfig, models: Models, schedule: NoiseSchedule, streams: RandomStreams,
                 autocast: Callable):
        self.config, self.models, self.roles, self.codec = config, models, models.roles, models.codec
        self.schedule, self.streams, self.autocast = schedule, streams, autocast
        self.device = streams.device
        self._tapped: tuple[Tensor, Tensor] | None = None
        self.pairs: dict | None = None  # the teacher's ODE pairs of the regression term (Trainer sets them)
        self.consistency_ema = None
        if config.objective == "jdm" and config.consistency_weight > 0:
            from diffusers.training_utils import EMAModel

            # f^- of Eq. 8: an average of the consistency LoRA, so the target is not the online network.
            self.consistency_ema = EMAModel(self.roles.groups["consistency"], decay=config.consistency_ema, foreach=True)
            self.consistency_timesteps = losses.consistency_timesteps(config.consistency_points, schedule).to(self.device)
        # `--consistency-pairs ode`: the lower point of a pair is a DDIM step on the fake score's ODE.
        self.consistency_ode = self.roles.fake if config.consistency_pairs == "ode" else None

    def batch(self, items: list[dict], step: int, micro: int) -> dict:
        """A micro-batch of dataset items on the device, with conditions extracted from the images
        and, with `--control-dropout`, the dropped samples' hints blanked."""
        images = torch.stack([it["image"] for it in items]).to(self.device)
        captions = [it["caption"] for it in items]
        with torch.no_grad():
            control = self.models.extractor.extract(images)
        batch = {"images": images, "captions": captions, "control": control, "micro": micro, "step": step}
        hint = control
        if self.config.control_dropout > 0:
            # Dropped samples see a blank hint and get no condition term: the student learns the
            # teacher's distribution for a blank control instead of extrapolating to it.
            kept = self._kept(len(items), step, micro, "control_dropout")
            hint = _blank_dropped(control, kept)
            batch["condition_mask"] = kept
        batch["cond"] = Cond(self.codec.encode_text(captions), hint)
        return batch

    def _kept(self, n: int, step: int, micro: int, purpose: str) -> Tensor:
        gen = self.streams.generator(step, purpose, micro)
        return torch.rand(n, generator=gen, device=self.device) >= self.config.control_dropout

    # ------------------------------------------------------------------ randomness and samples

    def randn(self, batch: dict, shape, purpose: str, repeat: int = 0) -> Tensor:
        return self.streams.randn(shape, batch["step"], purpose, batch["micro"], repeat)

    def timesteps(self, batch: dict, purpose: str, repeat: int = 0, t_min: int | None = None,
                  t_max: int | None = None) -> Tensor:
        gen = self.streams.generator(batch["step"], purpose, batch["micro"], repeat)
        t_min = self.config.t_min if t_min is None else t_min
        t_max = self.config.t_max if t_max is None else t_max
        return losses.sample_timesteps(len(batch["captions"]), t_min, t_max, self.device, gen)

    def latent_shape(self, n: int) -> tuple[int, int, int, int]:
        return self.codec.latent_shape(n, self.config.resolution)

    def sample(self, batch: dict, repeat: int) -> Tensor:
        """sg(x) the fake-score players learn from: the generator's own sample on the first repeat,
        a fresh one (same for every term of the repeat) after."""
        key = f"x{repeat}"
        if key not in batch:
            z = self.randn(batch, self.latent_shape(len(batch["captions"])), "fake_z", repeat)
            with torch.no_grad(), self.autocast():
                batch[key] = generate_one_step(self.roles.student, z, self.config.generator_timestep,
                                               batch["cond"]).float()
        return batch[key].detach()

    # ------------------------------------------------------------------ the generator

    def generator(self, batch: dict, repeat: int = 0) -> tuple[Tensor, dict]:
        """The student's loss on `batch`: JDM (Eq. 5 / 9 / 10, `losses.generator_loss`) or a baseline."""
        objective = self.config.objective
        if objective == "controlnet":
            return self._controlnet_denoising(batch)
        if objective == "dsm":
            return self._dsm(batch)
        return self._distribution_matching(batch)

    def _controlnet_denoising(self, batch: dict) -> tuple[Tensor, dict]:
        """The multi-step ControlNet baseline: the teacher frozen, the ControlNet trained by denoising."""
        x_data = self.codec.encode_images(batch["images"])
        eps = self.randn(batch, x_data.shape, "eps")
        t = self.timesteps(batch, "t", t_min=0, t_max=999)
        with self.autocast():
            loss, logs = losses.fake_score_loss(self.roles.student, x_data, eps, t, self.schedule, batch["cond"])
        return loss, {"controlnet_loss": logs["fake_score_loss"]}

    def _dsm(self, batch: dict) -> tuple[Tensor, dict]:
        x_data = self.codec.encode_images(batch["images"])
        eps = self.randn(batch, x_data.shape, "eps")
        with self.autocast():
            return losses.dsm_controlnet_loss(self.roles.student, x_data, eps, self.schedule, batch["cond"],
                                              self.config.generator_timestep)

    def _distribution_matching(self, batch: dict) -> tuple[Tensor, dict]:
        cfg, roles, cond = self.config, self.roles, batch["cond"]
        z = self.randn(batch, self.latent_shape(len(batch["captions"])), "z")
        with self.autocast():
            x = generate_one_step(roles.student, z, cfg.generator_timestep, cond).float()
        batch["x0"] = x.detach()  # the fake score's first sample (`sample`)
        t = self.timesteps(batch, "t")
        eps = self.randn(batch, x.shape, "eps")
        fake = roles.fake
        terms = self._generator_terms(batch)
        if cfg.divergence != "rkl":
            terms["discriminator"] = self._discriminator_logits
            fake = self._fake_with_features
        with self.autocast():
            loss, logs = losses.generator_loss(x, t, eps, self.schedule, roles.teacher, fake, cond, **terms)
            if cfg.regression_weight > 0:
                reg, rlogs = self.regression(batch)
                loss = loss + cfg.regression_weight * reg
                logs.update(rlogs)
            if cfg.gan_weight > 0:
                # Non-saturating generator GAN term on the same noised student sample (f-distill).
                logits = self._discriminator_logits(self.schedule.add_noise(x, eps, t), t, cond)
                gan = torch.nn.functional.softplus(-logits).mean()
                loss = loss + cfg.gan_weight * gan
                logs["gan_loss"] = gan.detach()
        return loss, logs

    def regression(self, batch: dict) -> tuple[Tensor, dict]:
        """The regression term (ours, as DMD's): `|| G(z, text, c) - x_ode ||^2` on a micro-batch of the
        teacher's ODE pairs (`synthesis.ode_pairs`), c extracted from the teacher's sample (blank where
        control dropout drops it, and always for implicit VSD, which has no condition signal)."""
        if self.pairs is None:
            raise RuntimeError("--regression-weight needs the teacher's ODE pairs (Trainer draws them)")
        n, step, micro = len(batch["captions"]), batch["step"], batch["micro"]
        gen = self.streams.generator(step, "pairs", micro)
        index = torch.randint(len(self.pairs["captions"]), (n,), generator=gen, device=self.device).cpu()
        z, target = self.pairs["noise"][index].to(self.device), self.pairs["latents"][index].to(self.device)
        with torch.no_grad():
            control = self.models.extractor.extract(self.codec.decode(target))
        kept = self._kept(n, step, micro, "pairs_dropout")
        if self.config.objective != "jdm":
            kept = torch.zeros_like(kept)
        cond = Cond(self.codec.encode_text([self.pairs["captions"][i] for i in index.tolist()]),
                    _blank_dropped(control, kept))
        x = generate_one_step(self.roles.student, z, self.config.generator_timestep, cond).float()
        loss = torch.nn.functional.mse_loss(x, target)
        return loss, {"regression_loss": loss.detach()}

    def _generator_terms(self, batch: dict) -> dict:
        """The keyword arguments of `losses.generator_direction` for this batch."""
        cfg, models = self.config, self.models
        terms = dict(divergence=cfg.divergence, fidelity_weight=cfg.fidelity_weight,
                     condition_weight=cfg.condition_weight, reward_weight=cfg.reward_weight,
                     condition_t_max=cfg.condition_t_max, condition_weighting=cfg.condition_weighting,
                     condition_mask=batch.get("condition_mask"))
        if cfg.objective == "jdm":
            control, extractor = batch["control"], models.extractor
            terms.update(consistency_denoise=self.roles.consistency, decode=self.codec.decode,
                         log_likelihood=lambda img: extractor.log_likelihood(img, control, tau=cfg.condition_tau))
            if models.reward is not None:
                captions = batch["captions"]
                terms["reward"] = lambda img: models.reward(img, captions).reshape(-1).float()
        if models.guidance is not None:
            guided, unguided = self.guidance_conds(batch)
            terms.update(guidance_denoise=models.guidance, guidance_cond=guided, guidance_uncond=unguided,
                         cfg_scale=cfg.cfg_scale)
            if models.guidance is self.roles.teacher:
                terms["real_and_unguided"] = self._real_and_unguided(batch["cond"], unguided)
        return terms

    def _real_and_unguided(self, cond: Cond, unguided: Cond) -> Callable:
        """The real score at the caption and at the negative prompt in one pass of batch 2B (the
        real score has no ControlNet: the control is not part of its input)."""
        text = torch.cat([cond.text, unguided.text])

        def both(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            x0 = self.roles.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond(text))
            return x0[: len(x_t)], x0[len(x_t):]

        return both

    def guidance_conds(self, batch: dict) -> tuple[Cond, Cond]:
        """The guidance teacher's conditional and negative-prompt conditions (decoupled CFG)."""
        n, encoder = len(batch["captions"]), self.models.guidance_text_encoder
        negative = Cond(self.codec.encode_text([self.config.negative_prompt] * n, encoder))
        if encoder is None:  # the teacher guides itself: the real score's pass on the same Cond is reused
            return batch["cond"], negative
        return Cond(self.codec.encode_text(batch["captions"], encoder)), negative

    # ------------------------------------------------------------------ the fake-score players

    def fake_score(self, batch: dict, repeat: int = 0) -> tuple[Tensor, dict]:
        """Eq. 6: the fake score denoises the student's samples."""
        x = self.sample(batch, repeat)
        t = self.timesteps(batch, "fake_t", repeat)
        eps = self.randn(batch, x.shape, "fake_eps", repeat)
        with self.autocast():
            return losses.fake_score_loss(self.roles.fake, x, eps, t, self.schedule, batch["cond"])

    def consistency(self, batch: dict, repeat: int = 0) -> tuple[Tensor, dict]:
        """Eq. 8 on the student's samples, against the EMA target f^-."""
        x = self.sample(batch, repeat)
        gen = self.streams.generator(batch["step"], "cons_t", batch["micro"], repeat)
        t_k, t_prev = losses.consistency_pairs(x.shape[0], self.consistency_timesteps, gen)
        eps = self.randn(batch, x.shape, "cons_eps", repeat)
        with self.autocast():
            return losses.consistency_loss(self.roles.consistency, self.consistency_target, x, eps, t_k, t_prev,
                                           self.schedule, batch["cond"], ode_denoise=self.consistency_ode)

    @torch.no_grad()
    def consistency_target(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """f^- of Eq. 8: the consistency model with the EMA of its LoRA swapped in."""
        with averaged(self.consistency_ema, self.roles.groups["consistency"]):
            return self.roles.consistency(x_t, t, cond)

    def discriminator(self, batch: dict, repeat: int = 0) -> tuple[Tensor, dict]:
        """f-distill's density-ratio discriminator on the fake score's bottleneck features (no
        gradient into the fake score): noised data against noised student samples."""
        roles, x = self.roles, self.sample(batch, repeat)
        t = self.timesteps(batch, "disc_t", repeat)
        eps = self.randn(batch, x.shape, "disc_eps", repeat)
        x_data = self.codec.encode_images(batch["images"])
        with self.autocast():
            with torch.no_grad():
                real = self._features(self.schedule.add_noise(x_data, eps, t), t, batch["cond"])
                fake = self._features(self.schedule.add_noise(x, eps, t), t, batch["cond"])
            return losses.discriminator_loss(roles.discriminator(real), roles.discriminator(fake))

    def _features(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        tap = self.roles.fake_tap
        tap.enabled = True
        try:
            self.roles.fake(x_t, t, cond)
        finally:
            tap.enabled = False
        return tap.value

    def _discriminator_logits(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """(B,) logits of log p_phi / p_theta at (x_t, t): reuses the fidelity term's fake-score
        pass when it ran at this very x_t (`_fake_with_features`)."""
        tapped, self._tapped = self._tapped, None
        features = tapped[1] if tapped is not None and tapped[0] is x_t else self._features(x_t, t, cond)
        return self.roles.discriminator(features)

    def _fake_with_features(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        tap = self.roles.fake_tap
        tap.enabled = True
        try:
            x0 = self.roles.fake(x_t, t, cond)
        finally:
            tap.enabled = False
        self._tapped = (x_t, tap.value)
        return x0


def _blank_dropped(control: Tensor, kept: Tensor) -> Tensor:
    return control * kept.reshape(-1, 1, 1, 1).to(control.dtype)


def phases(players: Players, optimizers: dict, generator_ema=None) -> list[Phase]:
    """Alg. 1's updates in order: the student, then `--fake-updates-per-step` updates of the fake
    score, the consistency LoRA and the discriminator (disjoint parameters, one sample)."""
    config, roles = players.config, players.roles
    groups = roles.groups
    generator_params = optim.generator_params(groups)
    out = [Phase("generator", [Term("generator", players.generator, generator_params, role=roles.student)],
                 ["generator"], [(generator_ema, generator_params)] if generator_ema is not None else [])]
    if "fake" not in optimizers:
        return out
    terms = [Term("fake_score", players.fake_score, groups["fake"])]
    averages = []
    if players.consistency_ema is not None:
        terms.append(Term("consistency", players.consistency, groups["consistency"], config.consistency_weight))
        averages.append((players.consistency_ema, groups["consistency"]))
    if roles.discriminator is not None:
        terms.append(Term("discriminator", players.discriminator, groups["discriminator"]))
    names = [n for n in ("fake", "discriminator") if n in optimizers]
    out.append(Phase("fake", terms, names, averages, repeats=config.fake_updates_per_step))
    return out
