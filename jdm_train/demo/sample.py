"""Multi-step sampling of an SD1.x-style teacher in the demo world (the paper's multi-step baseline).

Deterministic DDIM (eta = 0) over an x0-denoiser `x0 = denoise(x_t, t, cond)`, on the SD1.x
schedule of `jdm_train.schedule`, with ordinary classifier-free guidance. Used to draw the
teacher's uncontrolled reference samples for FID and the sample grids.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from jdm_train.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, Tensor, object], Tensor]


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """Descending timesteps with diffusers' "leading" spacing and steps_offset=1 (what SD1.5 uses)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    ratio = num_timesteps // steps
    return [min(i * ratio + 1, num_timesteps - 1) for i in reversed(range(steps))]


@torch.no_grad()
def ddim_sample(denoise: Denoiser, noise: Tensor, steps: int, cond: object = None, schedule: NoiseSchedule | None = None) -> Tensor:
    """DDIM (eta=0) from `noise` (B, C, H, W) at t=T; returns the final x0 (B, C, H, W). NFE = `steps` denoiser calls."""
    schedule = NoiseSchedule() if schedule is None else schedule
    ts = ddim_timesteps(steps, schedule.num_timesteps)
    x = noise
    for i, t_int in enumerate(ts):
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
        x0 = denoise(x, t, cond)
        if i + 1 == len(ts):
            return x0
        eps = schedule.eps_from_x0(x, x0, t)
        t_next = torch.full_like(t, ts[i + 1])
        alpha, sigma = schedule.alpha_sigma(t_next, x)
        x = alpha * x0 + sigma * eps
    return x


def cfg_unet_denoiser(unet, cond_emb: Tensor, uncond_emb: Tensor, scale: float, schedule: NoiseSchedule | None = None) -> Denoiser:
    """x0-denoiser of an eps-prediction UNet2DConditionModel with classifier-free guidance `scale`.

    `cond_emb`, `uncond_emb`: text-encoder hidden states (B, 77, D); the `cond` argument of the
    returned callable is ignored (the text is bound here).
    """
    schedule = NoiseSchedule() if schedule is None else schedule

    def denoise(x_t: Tensor, t: Tensor, cond: object = None) -> Tensor:
        dtype = next(unet.parameters()).dtype
        if scale == 1.0:
            eps = unet(x_t.to(dtype), t, encoder_hidden_states=cond_emb.to(dtype)).sample.to(x_t)
        else:
            both = unet(
                torch.cat([x_t, x_t]).to(dtype),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([cond_emb, uncond_emb]).to(dtype),
            ).sample.to(x_t)
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + scale * (eps_c - eps_u)
        return schedule.x0_from_eps(x_t, eps, t)

    return denoise
