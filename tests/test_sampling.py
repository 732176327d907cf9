"""`ddim_reference` (the teacher's multi-step reference in previews and evaluation) against
diffusers' own DDIMScheduler, an independent implementation of the same sampler."""

import torch
from diffusers import DDIMScheduler

from jdm_train.sampling import ddim_reference
from jdm_train.schedule import NoiseSchedule


def _denoiser(weight: torch.Tensor):
    """A deterministic, non-linear x0-predictor that depends on x_t, t and a conditioning vector."""

    def denoise(x_t, t, cond):
        tt = (t.to(x_t.dtype) / 1000).reshape(-1, 1, 1, 1)
        mixed = torch.einsum("ij,bjhw->bihw", weight, x_t)
        return torch.tanh(mixed * (1 - tt) + cond.reshape(1, -1, 1, 1) * tt)

    return denoise


def _diffusers_ddim(denoise, noise, cond, uncond, scale, schedule):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="linspace")
    # 1000 steps: diffusers' DDIM takes prev_t = t - 1000 // steps, which equals the next listed
    # timestep only when every timestep is used.
    sched.set_timesteps(1000)
    x = noise
    for t_now in sched.timesteps:
        t = t_now.repeat(noise.shape[0])
        eps_c = schedule.eps_from_x0(x, denoise(x, t, cond), t)
        eps_u = schedule.eps_from_x0(x, denoise(x, t, uncond), t)
        x = sched.step(eps_u + scale * (eps_c - eps_u), int(t_now), x).prev_sample
    return x


def test_ddim_reference_equals_diffusers_ddim_with_cfg():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    cond, uncond = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    schedule = NoiseSchedule()
    denoise = _denoiser(weight)
    ours = ddim_reference(denoise, noise, cond, uncond, steps=1000, scale=3.0, schedule=schedule)
    ref = _diffusers_ddim(denoise, noise, cond, uncond, 3.0, schedule)
    # diffusers keeps alphas_cumprod in float32 (ours: float64): ~1e-6 drift over 1000 steps
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # and the guidance really matters, so the comparison above can fail
    unguided = ddim_reference(denoise, noise, cond, uncond, steps=1000, scale=1.0, schedule=schedule)
    assert (unguided - ours).abs().max() > 1e-3
