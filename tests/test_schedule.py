import torch
from diffusers import DDPMScheduler

from jdm_train.schedule import NoiseSchedule, sd_alphas_cumprod
from jdm_train.sampling import generate_one_step, sample_one_step


def test_schedule_matches_diffusers_ddpm():
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    torch.testing.assert_close(sd_alphas_cumprod().float(), ref.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_eps_x0_identities():
    s = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = s.add_noise(x, eps, t)
    torch.testing.assert_close(s.x0_from_eps(x_t, eps, t), x)
    torch.testing.assert_close(s.eps_from_x0(x_t, x, t), eps)


def test_sigma_max_is_comfyui_value_and_inverts():
    s = NoiseSchedule()
    sigma = s.sigma_ve(torch.tensor([999]))
    assert abs(sigma.item() - 14.6146) < 1e-3
    assert s.timestep_from_sigma_ve(sigma).item() == 999


def test_one_step_forms_agree():
    """The k-diffusion form on a VE wrapper equals the VP form on unit-variance noise."""
    s = NoiseSchedule()
    w = torch.randn(3, 3, dtype=torch.float64)

    def denoise(x_t, t, cond):  # any deterministic function of (x_t, t)
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x_t)) * t.reshape(-1, 1, 1, 1) / 1000

    def ve_model(x, sigma):  # what ComfyUI's eps model wrapper does for a VP denoiser
        t = s.timestep_from_sigma_ve(sigma)
        return denoise(x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt(), t, None)

    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sig = s.sigma_ve(torch.tensor([999])).to(z)
    a = generate_one_step(denoise, z, 999)
    b = sample_one_step(ve_model, z * (1 + sig**2).sqrt(), torch.cat([sig, sig.new_zeros(1)]))
    torch.testing.assert_close(a, b)
