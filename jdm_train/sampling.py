"""One-step generation (JDM's student `G(z, text, c)`), in two equal forms.

- `generate_one_step(denoise, noise, t_g, cond)`: what the trainer and the evaluation
  run on a VP denoiser `x0 = denoise(x_t, t, cond)`.
- `sample_one_step(model, x, sigmas, ...)`: the same evaluation in k-diffusion's sampler
  signature, which ComfyUI's `KSAMPLER` wraps. ComfyUI feeds
  `x = noise * sqrt(1 + sigma^2)` at sigma_max and the UNet sees `x / sqrt(1 + sigma^2)`,
  i.e. the unit-variance noise at timestep 999: both forms evaluate the student once on `z`.

`ddim_reference` is the teacher's multi-step counterpart that validation grids and evaluations put
beside the student's one-step samples.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .guidance import cfg as cfg_combine
from .schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor, Any], Tensor]

DEFAULT_GENERATOR_TIMESTEP = 999


def generate_one_step(denoise: Denoiser, noise: Tensor, t_g: int = DEFAULT_GENERATOR_TIMESTEP, cond: Any = None) -> Tensor:
    """x = G(z) = x0-prediction of the student at timestep `t_g` with `x_t = z` (docs/method.md §0)."""
    t = torch.full((noise.shape[0],), int(t_g), device=noise.device, dtype=torch.long)
    return denoise(noise, t, cond)


@torch.no_grad()
def sample_one_step(model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback=None, disable=None) -> Tensor:
    """k-diffusion sampler: a single model evaluation at `sigmas[0]`, returned as the final sample."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    denoised = model(x, sigmas[0] * s_in, **extra_args)
    if callback is not None:
        callback({"x": x, "i": 0, "sigma": sigmas[0], "sigma_hat": sigmas[0], "denoised": denoised})
    return denoised


@torch.no_grad()
def ddim_reference(denoise: Denoiser, noise: Tensor, cond: Any, uncond: Any, steps: int, scale: float,
                   schedule: NoiseSchedule) -> Tensor:
    """Deterministic DDIM (eta = 0; Song et al. 2021, Eq. 12) with classifier-free guidance.

    `steps` integer timesteps evenly spaced from 999 to 0; `noise` (B, C, H, W) is x_999 and
    the x0-prediction (B, C, H, W) at the last timestep is returned. `scale` = 1 skips the
    unconditional pass."""
    ts = torch.linspace(999, 0, steps, device=noise.device).round().long()
    x = noise
    for i, t_now in enumerate(ts):
        t = t_now.repeat(noise.shape[0])
        x0 = denoise(x, t, cond)
        if scale != 1.0:
            x0 = cfg_combine(x0, denoise(x, t, uncond), scale)
        if i + 1 == len(ts):
            return x0
        x = schedule.ddim_step(x, x0, t, ts[i + 1].repeat(noise.shape[0]))
    return x
