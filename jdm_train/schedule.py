"""The SD1.x DDPM noise schedule in the notation of docs/method.md §0.

`x_t = alpha_t x + sigma_t eps` with `alpha_t = sqrt(abar_t)`, `sigma_t = sqrt(1 - abar_t)`
on the scaled-linear betas (0.00085 to 0.012, 1000 steps). Timesteps are integers in
[0, 999], as the UNet sees them. Everything that converts between eps, x0 and score
goes through here, so the toy world and the SD trainer share one set of conventions.
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def sd_alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """`abar_t` for t = 0..T-1 (float64), identical to diffusers' `scaled_linear` DDPM schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class NoiseSchedule:
    """alpha_t / sigma_t look-ups broadcast against a batch, in the batch's dtype and device."""

    def __init__(self, alphas_cumprod: Tensor | None = None):
        self.alphas_cumprod = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t for integer timesteps `t` (B,), shaped (B, 1, ...) like `like`."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = abar.sqrt().reshape(shape).to(like)
        sigma = (1.0 - abar).sqrt().reshape(shape).to(like)
        return alpha, sigma

    def add_noise(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x)
        return alpha * x + sigma * eps

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - sigma * eps) / alpha

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma

    def ddim_step(self, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Deterministic DDIM (eta = 0; Song et al. 2021, Eq. 12) from x_t at t to t_next, given the
        x0-prediction at (x_t, t): the probability-flow ODE's first-order step."""
        return self.add_noise(x0, self.eps_from_x0(x_t, x0, t), t_next)

    def sigma_ve(self, t: Tensor) -> Tensor:
        """ComfyUI / k-diffusion sigma of timestep t: sqrt((1 - abar) / abar)."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return ((1.0 - abar) / abar).sqrt()

    def timestep_from_sigma_ve(self, sigma: Tensor) -> Tensor:
        """Nearest integer timestep for a k-diffusion sigma (what ComfyUI's ModelSamplingDiscrete does)."""
        log_sigmas = (((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()).log().to(sigma.device)
        dists = sigma.double().log().reshape(-1, 1) - log_sigmas.reshape(1, -1)
        return dists.abs().argmin(dim=1)
