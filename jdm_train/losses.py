"""The JDM objective (arXiv 2503.06652, Sec. 3), its f-divergence weighting (f-distill,
arXiv 2502.15681) and the paper's baselines, as pure functions.

Everything takes tensors and denoiser callables `x0 = denoise(x_t, t, cond)` (teacher / real
score, fake score, consistency model, guidance teacher, student) and returns `(loss, logs)`,
`logs` being a dict of detached 0-dim tensors. No model classes, no accelerate.

Units (docs/method.md §8). Eq. 5 is a sum of *score-space* terms at x_t, mapped to the
student output x by the chain rule `d x_t / d x = alpha_t`:

    g = lambda_t alpha_t [ grad_{x_t} log p(c|x_t) + (w - 1) alpha_t (x0_B(c) - x0_B(empty)) / sigma_t^2
                           + h_f(r) (s_phi - s_psi) + grad_{x_t} r(x_t) ]

with `s_phi - s_psi = alpha_t (x0_real - x0_fake) / sigma_t^2`. `g` is the direction in x that
*decreases* the bound (Eq. 4/10); it is applied through `surrogate_loss`, whose gradient with
respect to x is -g. The one place that sets the weighting is `term_scale`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from jdm_train.guidance import cfg_term
from jdm_train.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]
LogLikelihood = Callable[[Tensor], Tensor]

DIVERGENCES = ("rkl", "srkl", "js", "hellinger", "fkl", "jeffreys")
WEIGHTINGS = ("dmd", "sigma2", "none")
CONDITION_WEIGHTINGS = ("eq5", "snr", "x0")
DEFAULT_T_MIN, DEFAULT_T_MAX = 20, 980


def _logs(**values: Tensor | float) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v).detach().float().mean() for k, v in values.items()}


def _upcast(v: Tensor) -> Tensor:
    # Losses of half-precision models are reduced in float32; float64 (tests) stays float64.
    return v.float() if v.dtype in (torch.float16, torch.bfloat16) else v


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _mean_abs(v: Tensor) -> Tensor:
    return v.abs().flatten(1).mean(1)


def sample_timesteps(
    batch: int, t_min: int = DEFAULT_T_MIN, t_max: int = DEFAULT_T_MAX, device=None, generator: torch.Generator | None = None
) -> Tensor:
    """`t ~ U{t_min..t_max}` (B,) long: the generator and fake-score timesteps (docs/method.md §2, ours 20..980)."""
    if not 0 <= t_min <= t_max <= 999:
        raise ValueError(f"expected 0 <= t_min <= t_max <= 999, got t_min={t_min}, t_max={t_max}")
    return torch.randint(t_min, t_max + 1, (batch,), device=device, generator=generator)


# --------------------------------------------------------------------------- weighting


def term_scale(x: Tensor, x0_real: Tensor, t: Tensor, schedule: NoiseSchedule, weighting: str = "dmd") -> Tensor:
    """`lambda_t alpha_t` per sample, (B, 1, ...): the factor that maps every score-space term of
    Eq. 5 at x_t to a direction on x. The only place where the weighting of the objective is set.

    - `"none"`: lambda_t = 1, Eq. 5 literally (fidelity becomes `alpha^2/sigma^2 (x0_real - x0_fake)`).
    - `"sigma2"`: lambda_t = sigma_t^2 / alpha_t^2, so the fidelity term is `x0_real - x0_fake`.
    - `"dmd"` (ours, as DMD; deviation from Eq. 5 because lambda then depends on the sample, not
      only on t): lambda = sigma_t^2 / (alpha_t^2 mean|x - x0_real|), so the fidelity term is DMD's
      `(x0_real - x0_fake) / mean|x - x0_real|` (docs/method.md §3), x0_real being the unguided
      teacher. All terms share it, which keeps their relative scale as Eq. 5 states.
    """
    alpha, sigma = schedule.alpha_sigma(t, x)
    if weighting == "none":
        return alpha
    if weighting == "sigma2":
        return sigma**2 / alpha
    if weighting == "dmd":
        norm = _mean_abs(x.detach() - x0_real).clamp_min(1e-6)
        return sigma**2 / (alpha * _per_sample(norm, x))
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def score_difference(x0_a: Tensor, x0_b: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
    """`s_a(x_t) - s_b(x_t) = alpha_t (x0_a - x0_b) / sigma_t^2` for two denoisers at the same x_t (JDM Eq. 1, 5)."""
    alpha, sigma = schedule.alpha_sigma(t, x0_a)
    return alpha * (x0_a - x0_b) / sigma**2


# --------------------------------------------------------------------------- f-divergences


def _log_f_weight(logits: Tensor, divergence: str) -> Tensor:
    # log h_f(r) with r = exp(logit), in log space so forward-KL's r cannot overflow.
    if divergence == "rkl":
        return torch.zeros_like(logits)
    if divergence == "srkl":
        return -F.softplus(logits)  # 1 / (r + 1)
    if divergence == "js":
        return -F.softplus(-logits)  # r / (r + 1)
    if divergence == "hellinger":
        return 0.5 * logits - torch.log(torch.tensor(2.0, dtype=logits.dtype))  # sqrt(r) / 2
    if divergence == "fkl":
        return logits  # r
    if divergence == "jeffreys":
        return F.softplus(logits)  # r + 1
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def f_divergence_weight(logits: Tensor, divergence: str = "rkl", normalize: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """f-distill's weight `h_f(r) = f''(r) r^2` of the score difference, r = p_phi / p_theta = exp(logit).

    logits: (B,) discriminator logits at (x_t, t) (real = teacher data, fake = student). Weights:
    reverse-KL 1 (plain JDM), softened reverse-KL 1/(r+1), Jensen-Shannon r/(r+1), squared
    Hellinger sqrt(r)/2, forward-KL r, Jeffreys r+1. With `normalize` they are divided by their
    batch mean (docs/method.md §4). Returns detached (B,) weights.
    """
    if logits.ndim != 1:
        raise ValueError(f"logits must be (B,), got shape {tuple(logits.shape)}")
    log_h = _log_f_weight(logits.detach().float(), divergence)
    if normalize:
        w = log_h.shape[0] * torch.softmax(log_h, dim=0)
    else:
        w = log_h.exp()
    w = w.to(logits.dtype)
    return w, _logs(f_weight_max=w.max(), f_weight_min=w.min(), disc_logit=logits)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Non-saturating GAN loss of the density-ratio discriminator (f-distill): real = noised data,
    fake = noised student samples, both (B,). At the optimum `logit = log p_phi(x_t) / p_theta(x_t)`."""
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    return loss, _logs(disc_loss=loss, disc_accuracy=acc)


# --------------------------------------------------------------------------- condition terms


def condition_gradient(
    x_t: Tensor,
    t: Tensor,
    consistency_denoise: Denoiser,
    log_likelihood: LogLikelihood,
    cond: Any = None,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`g_c = grad_{x_t} log p(c | x_t)` with `log p(c|x_t) ~= log_likelihood(decode(f(x_t, t)))` (JDM Eq. 5, 7).

    f is the consistency model (fake score + consistency LoRA, Eq. 8), one sample of p(x | x_t);
    `log_likelihood` maps the decoded image to (B,) log-likelihoods of the wanted condition
    (it closes over c). Also the reward term of Eq. 9 when `log_likelihood` is a reward.
    Only x_t is differentiated: no gradient reaches the models' parameters. Returns (B, ...) detached.
    """
    leaf = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        x_hat = consistency_denoise(leaf, t, cond)
        image = decode(x_hat) if decode is not None else x_hat
        ll = log_likelihood(image)
        if ll.ndim != 1 or ll.shape[0] != x_t.shape[0]:
            raise ValueError(f"log_likelihood must return (B,) = ({x_t.shape[0]},), got shape {tuple(ll.shape)}")
        (grad,) = torch.autograd.grad(ll.sum(), leaf)
    return grad.detach(), _logs(log_likelihood=ll, condition_grad_norm=grad.flatten(1).norm(dim=1))


def cfg_direction(
    x_t: Tensor, t: Tensor, guidance_denoise: Denoiser, cond: Any, uncond: Any, scale: float, schedule: NoiseSchedule,
    x0_cond: Tensor | None = None, x0_uncond: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled CFG as a condition term in score space (JDM Sec. 3.1, docs/method.md §6):
    `alpha_t (w - 1) (x0_B(x_t, c) - x0_B(x_t, empty)) / sigma_t^2`, B being the guidance teacher.
    `x0_cond`, `x0_uncond`: `x0_B(x_t, c)` and `x0_B(x_t, empty)` when already computed (B is the
    real score, as in DMD's CFG)."""
    with torch.no_grad():
        if x0_cond is None:
            x0_cond = guidance_denoise(x_t, t, cond)
        if x0_uncond is None:
            x0_uncond = guidance_denoise(x_t, t, uncond)
        term = cfg_term(x0_cond, x0_uncond, scale)
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    return alpha * term / sigma**2, _logs(cfg_x0_norm=_mean_abs(term))


# --------------------------------------------------------------------------- generator


def surrogate_loss(x: Tensor, g: Tensor, reduction: str = "mean") -> Tensor:
    """`0.5 || x - sg(x + g) ||^2` (docs/method.md §8): d loss / dx = -g per sample.

    reduction "sum": the gradient is exactly -g; "mean" (over the batch, summed within a sample):
    -g / B, the Monte-Carlo mean of Eq. 5.
    """
    if x.shape != g.shape:
        raise ValueError(f"x and g must have the same shape, got {tuple(x.shape)} and {tuple(g.shape)}")
    per_sample = 0.5 * (x - (x + g).detach()).pow(2).flatten(1).sum(1)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def fidelity_term(
    x_t: Tensor, t: Tensor, x0_real: Tensor, schedule: NoiseSchedule, fake_denoise: Denoiser, cond: Any = None,
    discriminator: Callable[[Tensor, Tensor, Any], Tensor] | None = None, divergence: str = "rkl",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Fidelity learning in score space at x_t (B, ...): `h_f(r) (s_phi - s_psi)` (JDM Eq. 5,
    docs/method.md §3), weighted per sample by f-distill's `h_f(r)` (docs/method.md §4).

    `x0_real` is the teacher's x0 at `(x_t, t, cond)`; r comes from `discriminator(x_t, t, cond) -> (B,)`
    logits, needed unless divergence="rkl" (weight 1, plain JDM). Detached.
    """
    logs: dict[str, Tensor] = {}
    with torch.no_grad():
        x0_fake = fake_denoise(x_t, t, cond)
    fid = score_difference(x0_real, x0_fake, t, schedule)
    if divergence != "rkl":
        with torch.no_grad():
            logits = discriminator(x_t, t, cond).reshape(-1)
        h, flogs = f_divergence_weight(logits, divergence)
        logs.update(flogs)
        fid = _per_sample(h, fid) * fid
    logs.update(_logs(real_fake_gap=_mean_abs(x0_real - x0_fake)))
    return fid, logs


def condition_term(
    x_t: Tensor, t: Tensor, schedule: NoiseSchedule, consistency_denoise: Denoiser, log_likelihood: LogLikelihood,
    cond: Any = None, decode: Callable[[Tensor], Tensor] | None = None, *, weight: float = 1.0, t_max: int = 999,
    weighting: str = "eq5", mask: Tensor | None = None,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Condition learning: `weight grad_{x_t} log p(c|x_t)` through the consistency model (JDM Eq. 5, 7;
    docs/method.md §5), weighted across t by `weighting` (ours). Returns the term (B, ...), detached,
    in score space for "eq5" and "snr" and as a direction on x for "x0"; None when no sample is kept.

    - "eq5": the fidelity term's lambda_t, as Eq. 5 (grows as 1 / alpha_t^2 towards t = 999 under DMD's
      weighting, where the consistency model's x0 is a blur, and all but vanishes at small t).
    - "snr": times SNR(t) = alpha_t^2 / sigma_t^2: on x, the gradient with respect to the consistency
      model's x0 (d x0 / d x_t ~ 1 / alpha_t), at the same scale at every t; it keeps DMD's
      1 / mean|x - x0_real|, which is large at small t.
    - "x0": `alpha_t g_c` on x, with no lambda_t and no DMD normalisation.

    Kept are the samples with t <= `t_max` (ours; 999: always, Eq. 5; near t = 999 the one-step x0 is a
    blur whose edge gradient, amplified by 1 / alpha_t, is mostly noise) and, when given, `mask` (B,)
    True (False: control dropped, `--control-dropout`, ours).
    """
    keep = t <= t_max
    if mask is not None:
        keep = keep & mask.to(keep.device, torch.bool)
    if not bool(keep.any()):
        # No sample kept (t above t_max, or control dropped): skip the consistency/decoder pass.
        return None, {}
    g_c, logs = condition_gradient(x_t, t, consistency_denoise, log_likelihood, cond, decode)
    w_c = _per_sample(weight * keep.to(g_c.dtype), g_c)
    alpha, sigma = schedule.alpha_sigma(t, g_c)
    if weighting == "x0":
        return w_c * alpha * g_c, logs
    return (w_c * (alpha / sigma).pow(2) if weighting == "snr" else w_c) * g_c, logs


def reward_term(
    x_t: Tensor, t: Tensor, consistency_denoise: Denoiser, reward: LogLikelihood, cond: Any = None,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Human feedback `grad_{x_t} r(decode(f(x_t, t)))` in score space (JDM Eq. 9, docs/method.md §9):
    through the consistency model f, as the condition term, never on x directly (reward hacking). Detached."""
    g_r, rlogs = condition_gradient(x_t, t, consistency_denoise, reward, cond, decode)
    return g_r, {"reward": rlogs["log_likelihood"], "reward_grad_norm": rlogs["condition_grad_norm"]}


def _identity(x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    return x_t


def _check_terms(divergence: str, discriminator: Any, fake_denoise: Any, log_likelihood: Any, reward: Any,
                 consistency_denoise: Any, cfg_scale: float, guidance_denoise: Any, condition_weighting: str) -> None:
    if condition_weighting not in CONDITION_WEIGHTINGS:
        raise ValueError(f"condition_weighting must be one of {CONDITION_WEIGHTINGS}, got {condition_weighting!r}")
    if divergence != "rkl" and discriminator is None and fake_denoise is not None:
        raise ValueError(f"divergence={divergence!r} needs a discriminator for the density ratio; "
                         "use 'rkl' or pass discriminator")
    if (log_likelihood is not None or reward is not None) and consistency_denoise is None:
        raise ValueError("the condition and reward terms need consistency_denoise (the fake score + consistency LoRA, Eq. 8)")
    if cfg_scale != 1.0 and guidance_denoise is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs guidance_denoise (the guidance teacher)")


def generator_direction(
    x: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule, real_denoise: Denoiser, fake_denoise: Denoiser | None,
    cond: Any = None, *, consistency_denoise: Denoiser | None = None, log_likelihood: LogLikelihood | None = None,
    decode: Callable[[Tensor], Tensor] | None = None, guidance_denoise: Denoiser | None = None, guidance_cond: Any = None,
    guidance_uncond: Any = None, cfg_scale: float = 1.0, reward: LogLikelihood | None = None,
    discriminator: Callable[[Tensor, Tensor, Any], Tensor] | None = None, divergence: str = "rkl", weighting: str = "dmd",
    fidelity_weight: float = 1.0, condition_weight: float = 1.0, reward_weight: float = 1.0, condition_t_max: int = 999,
    condition_weighting: str = "eq5", condition_mask: Tensor | None = None,
    exact_condition: Callable[[Tensor, Tensor], Tensor] | None = None,
    real_and_unguided: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The summed JDM direction g on the student output x (B, ...) of one generator step (JDM Eq. 5 / 9 / 10
    with f-distill weighting; docs/method.md §2-8), detached. x_t = alpha_t sg(x) + sigma_t eps at t (B,).

    The terms at (x_t, t), summed in score space and mapped to x by `term_scale(weighting)`: `fidelity_term`
    (none with `fake_denoise=None`); `condition_term` with `condition_t_max`, `condition_weighting`,
    `condition_mask` (none when `log_likelihood` is None: implicit VSD); `cfg_direction` from `guidance_denoise`
    (none at `cfg_scale` 1); `reward_term`. The `*_weight`s multiply them (1: Eq. 5's scale). `exact_condition`
    `(x_t, t) -> (B,)`: log p(c|x_t) in closed form (the analytic world, `toy.py`), replacing the estimate.
    `real_and_unguided` `(x_t, t) -> (x0_real, x0 at the negative prompt)`: both real-score passes of DMD's
    CFG at once (the trainer batches them: one UNet call of batch 2B costs about one of B at small sizes).
    """
    _check_terms(divergence, discriminator, fake_denoise, log_likelihood, reward, consistency_denoise, cfg_scale,
                 guidance_denoise, condition_weighting)
    x_t = schedule.add_noise(x.detach(), eps, t)
    logs: dict[str, Tensor] = {}
    x0_unguided = None
    with torch.no_grad():
        if real_and_unguided is not None:
            x0_real, x0_unguided = real_and_unguided(x_t, t)
        else:
            x0_real = real_denoise(x_t, t, cond)
    # Score-space terms at x_t, mapped to x by term_scale (Eq. 5), and terms given as directions on x already.
    scale = term_scale(x, x0_real, t, schedule, weighting)
    sizes: dict[str, Tensor] = {}  # each term's size on x per element: whether control or fidelity wins
    score, on_x = torch.zeros_like(x_t), torch.zeros_like(x_t)
    if fake_denoise is not None and fidelity_weight != 0.0:
        fid, flogs = fidelity_term(x_t, t, x0_real, schedule, fake_denoise, cond, discriminator, divergence)
        score = score + fidelity_weight * fid
        sizes["fidelity_on_x"] = _mean_abs(scale * fidelity_weight * fid)
        logs.update(flogs)
    if exact_condition is not None:
        consistency_denoise, decode, log_likelihood = _identity, None, lambda v: exact_condition(v, t)
    if log_likelihood is not None and condition_weight != 0.0:
        g_c, clogs = condition_term(x_t, t, schedule, consistency_denoise, log_likelihood, cond, decode, weight=condition_weight,
                                    t_max=condition_t_max, weighting=condition_weighting, mask=condition_mask)
        if g_c is not None:
            on_x, score = (on_x + g_c, score) if condition_weighting == "x0" else (on_x, score + g_c)
            sizes["condition_on_x"] = _mean_abs(g_c if condition_weighting == "x0" else scale * g_c)
        logs.update(clogs)
    if cfg_scale != 1.0:
        # B = the real score with the same text (DMD's CFG): its conditional x0 is x0_real.
        x0_cond = x0_real if guidance_denoise is real_denoise and guidance_cond is cond else None
        g_cfg, glogs = cfg_direction(x_t, t, guidance_denoise, guidance_cond, guidance_uncond, cfg_scale, schedule, x0_cond,
                                     x0_unguided if x0_cond is not None else None)
        score = score + g_cfg
        sizes["cfg_on_x"] = _mean_abs(scale * g_cfg)
        logs.update(glogs)
    if reward is not None and reward_weight != 0.0:
        g_r, rlogs = reward_term(x_t, t, consistency_denoise, reward, cond, decode)
        score = score + reward_weight * g_r
        sizes["reward_on_x"] = _mean_abs(scale * reward_weight * g_r)
        logs.update(rlogs)
    g = scale * score + on_x
    logs.update(_logs(direction_norm=g.flatten(1).norm(dim=1), **sizes))
    return g.detach(), logs


def generator_loss(x: Tensor, t: Tensor, eps: Tensor, schedule: NoiseSchedule, real_denoise: Denoiser,
                   fake_denoise: Denoiser | None, cond: Any = None, *, reduction: str = "mean",
                   **terms: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """The JDM generator loss (Eq. 10): `surrogate_loss(x, generator_direction(...))`, so that
    back-propagating it moves x along g. Keyword arguments are those of `generator_direction`.
    Implicit VSD is this with `log_likelihood=None` (fidelity only)."""
    g, logs = generator_direction(x, t, eps, schedule, real_denoise, fake_denoise, cond, **terms)
    loss = surrogate_loss(x, g, reduction)
    logs["generator_loss"] = loss.detach()
    return loss, logs


# --------------------------------------------------------------------------- auxiliary models


def fake_score_loss(
    fake_denoise: Denoiser, x: Tensor, eps: Tensor, t: Tensor, schedule: NoiseSchedule, cond: Any = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Fake-score denoising loss `|| eps_psi(x_t, t) - eps ||^2` on sg(x) (JDM Eq. 6), mean over elements."""
    x_t = schedule.add_noise(x.detach(), eps, t)
    eps_hat = schedule.eps_from_x0(x_t, fake_denoise(x_t, t, cond), t)
    loss = F.mse_loss(_upcast(eps_hat), _upcast(eps))
    return loss, _logs(fake_score_loss=loss)


def consistency_timesteps(points: int, schedule: NoiseSchedule, t_max: int = 999, rho: float = 7.0) -> Tensor:
    """The consistency-training discretisation `0 = t_0 < t_1 < ... < t_N <= t_max` (long, (N + 1,)).

    Karras et al.'s rho = 7 spacing (as in CT and iCT, Song et al. 2023/2024) of the VE sigma
    `sqrt((1 - abar) / abar)` from t = 0 to t_max, rounded to the nearest distinct DDPM timestep:
    dense at small noise, where a sample changes fastest with t. `points` asks for N + 1 points;
    rounding may merge a few at the low end.
    """
    if points < 2:
        raise ValueError(f"the consistency discretisation needs at least 2 points, got {points}")
    ends = torch.tensor([0, t_max])
    lo, hi = (schedule.sigma_ve(ends) ** (1 / rho)).tolist()
    sigmas = (lo + torch.linspace(0, 1, points, dtype=torch.float64) * (hi - lo)) ** rho
    return torch.unique(schedule.timestep_from_sigma_ve(sigmas))


def consistency_pairs(n: int, timesteps: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """`(t_k, t_{k-1})` (B,) each for k ~ U{1..N} over the discretisation `timesteps` (as CT's Alg. 3)."""
    k = torch.randint(1, timesteps.numel(), (n,), generator=generator, device=timesteps.device)
    return timesteps[k], timesteps[k - 1]


def consistency_loss(
    consistency_denoise: Denoiser,
    target_denoise: Denoiser,
    x: Tensor,
    eps: Tensor,
    t: Tensor,
    t_prev: Tensor,
    schedule: NoiseSchedule,
    cond: Any = None,
    ode_denoise: Denoiser | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The consistency LoRA's loss (JDM Eq. 8): `|| f(x_{t_k}, t_k) - sg f^-(x_{t_{k-1}}, t_{k-1}) ||^2`,
    `x_{t_k}` from sg(x) (B, ...) and eps, `t = t_k > t_prev = t_{k-1}` (B,). Mean over elements.

    `x_{t_{k-1}}` is, by default, made from the same sg(x) and eps (consistency training, Song et al.
    2023, Alg. 3, as Eq. 8 is written). With `ode_denoise` (ours, `--consistency-pairs ode`) it is one
    DDIM step from `x_{t_k}` on that denoiser's probability-flow ODE (consistency distillation, Alg. 2,
    with the fake score as the ODE): the same-eps pair averages x over a coarse step, so at a coarse
    discretisation consistency training's minimiser is close to the posterior mean; the ODE pair is
    deterministic, and its minimiser is the N-step DDIM sample of the fake score.

    `target_denoise` is f^-, the stop-gradient target: an EMA of the consistency LoRA, not the online
    network. At `t_prev == 0` the target is the boundary condition `f(x_{t_0}, t_0) = x_{t_0} / alpha_0`
    (the identity up to the schedule's scale), not a network: without an anchor the loss is zero for
    any constant f.
    """
    if not bool((t > t_prev).all()):
        raise ValueError("consistency_loss needs t > t_prev for every sample (t_k > t_{k-1}, Eq. 8)")
    x = x.detach()
    x_t = schedule.add_noise(x, eps, t)
    with torch.no_grad():
        if ode_denoise is None:
            x_prev = schedule.add_noise(x, eps, t_prev)
        else:
            x_prev = schedule.ddim_step(x_t, ode_denoise(x_t, t, cond), t, t_prev)
        alpha0, _ = schedule.alpha_sigma(t_prev, x)
        boundary = _per_sample(t_prev == 0, x)
        target = torch.where(boundary, x_prev / alpha0, target_denoise(x_prev, t_prev, cond))
    pred = consistency_denoise(x_t, t, cond)
    loss = F.mse_loss(_upcast(pred), _upcast(target))
    return loss, _logs(consistency_loss=loss, consistency_boundary_share=boundary.float())


def dsm_controlnet_loss(
    student_denoise: Denoiser, x_data: Tensor, eps: Tensor, schedule: NoiseSchedule, cond: Any = None, t_g: int = 999
) -> tuple[Tensor, dict[str, Tensor]]:
    """Baseline "DSM ControlNet" (JDM Sec. 3.2, Table 2): `|| G(x_T, c) - x_data ||^2` on data pairs,
    x_T = alpha_T x_data + sigma_T eps at the generator timestep. Its optimum is E[x | x_T, c]:
    it keeps the control but averages modes (blurry)."""
    t = torch.full((x_data.shape[0],), int(t_g), device=x_data.device, dtype=torch.long)
    pred = student_denoise(schedule.add_noise(x_data, eps, t), t, cond)
    loss = F.mse_loss(_upcast(pred), _upcast(x_data))
    return loss, _logs(dsm_loss=loss)
