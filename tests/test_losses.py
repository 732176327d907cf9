"""Unit identities of the JDM objective against analytic references (Gaussians have closed-form scores)."""

import math

import pytest
import torch

from jdm_train import losses
from jdm_train.guidance import cfg
from jdm_train.schedule import NoiseSchedule

S = NoiseSchedule()


def gaussian_denoiser(mu: torch.Tensor, std: float):
    """Exact x0 = E[x | x_t] for data N(mu, std^2 I), written out from Bayes' rule."""

    def denoise(x_t, t, cond=None):
        abar = S.alphas_cumprod[t].to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        a, var_n = abar.sqrt(), 1 - abar
        return mu + a * std**2 / (abar * std**2 + var_n) * (x_t - a * mu)

    return denoise


def gaussian_score(mu, std, x_t, t):
    abar = S.alphas_cumprod[t].to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
    return -(x_t - abar.sqrt() * mu) / (abar * std**2 + 1 - abar)


def _batch(seed=0, b=6, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    t = torch.randint(20, 981, (b,), generator=g)
    return x, eps, t


@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
def test_equal_real_and_fake_give_zero_fidelity_direction(weighting):
    x, eps, t = _batch()
    den = gaussian_denoiser(torch.full((2, 3, 3), 0.3, dtype=torch.float64), 0.7)
    g, _ = losses.generator_direction(x, t, eps, S, den, den, weighting=weighting)
    assert torch.count_nonzero(g) == 0
    x_req = x.clone().requires_grad_(True)
    loss, _ = losses.generator_loss(x_req, t, eps, S, den, den, weighting=weighting)
    loss.backward()
    assert torch.count_nonzero(x_req.grad) == 0


def test_fidelity_term_is_alpha_times_analytic_score_difference_and_points_at_real_mean():
    x, eps, t = _batch(1)
    mu_r = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1).expand(1, 3, 3, 3)[:, :2]
    mu_f = torch.zeros_like(mu_r)
    x_t = S.add_noise(x, eps, t)
    real, fake = gaussian_denoiser(mu_r, 1.0), gaussian_denoiser(mu_f, 1.0)
    g, _ = losses.generator_direction(x, t, eps, S, real, fake, weighting="none")
    alpha, _ = S.alpha_sigma(t, x)
    expected = alpha * (gaussian_score(mu_r, 1.0, x_t, t) - gaussian_score(mu_f, 1.0, x_t, t))
    torch.testing.assert_close(g, expected)
    # Unit-variance Gaussians: s_real - s_fake = alpha (mu_r - mu_f) at every x_t, so g is exactly
    # alpha^2 (mu_r - mu_f): it moves the fake samples towards the real mean (decreasing the KL).
    torch.testing.assert_close(g, alpha**2 * (mu_r - mu_f).expand_as(g))
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), (mu_r - mu_f).flatten(1).expand(g.shape[0], -1))
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_weightings_match_their_closed_forms():
    x, eps, t = _batch(2)
    x_t = S.add_noise(x, eps, t)
    real = gaussian_denoiser(torch.full_like(x[:1], 0.5), 0.8)
    fake = gaussian_denoiser(torch.full_like(x[:1], -0.2), 1.3)
    x0_r, x0_f = real(x_t, t), fake(x_t, t)
    dmd, _ = losses.generator_direction(x, t, eps, S, real, fake, weighting="dmd")
    norm = (x - x0_r).abs().mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(dmd, (x0_r - x0_f) / norm)  # DMD's normalised gradient, docs/method.md §3
    sig2, _ = losses.generator_direction(x, t, eps, S, real, fake, weighting="sigma2")
    torch.testing.assert_close(sig2, x0_r - x0_f)
    with pytest.raises(ValueError, match="weighting"):
        losses.term_scale(x, x0_r, t, S, "snr")


F_FORMULAS = {
    "rkl": lambda r: torch.ones_like(r),
    "srkl": lambda r: 1 / (r + 1),
    "js": lambda r: r / (r + 1),
    "hellinger": lambda r: r.sqrt() / 2,
    "fkl": lambda r: r,
    "jeffreys": lambda r: r + 1,
}


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_f_weights_match_their_formulas_and_normalise_to_mean_one(divergence):
    logits = torch.linspace(-4, 4, 9, dtype=torch.float64)
    r = logits.exp()
    raw, _ = losses.f_divergence_weight(logits, divergence, normalize=False)
    torch.testing.assert_close(raw, F_FORMULAS[divergence](r), rtol=1e-6, atol=1e-9)
    # Independent check of h_f(r) = f''(r) r^2 with f'' by finite differences of the generator f.
    f = {
        "rkl": lambda r: -torch.log(r),
        "srkl": lambda r: (r + 1) * torch.log(0.5 + 0.5 / r),
        "js": lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),
        "hellinger": lambda r: (r.sqrt() - 1) ** 2,
        "fkl": lambda r: r * torch.log(r),
        "jeffreys": lambda r: (r - 1) * torch.log(r),
    }[divergence]
    h = 1e-4 * r
    f2 = (f(r + h) - 2 * f(r) + f(r - h)) / h**2
    torch.testing.assert_close(raw, f2 * r**2, rtol=1e-4, atol=1e-6)
    w, _ = losses.f_divergence_weight(logits, divergence)
    torch.testing.assert_close(w, raw / raw.mean())
    torch.testing.assert_close(w.mean(), torch.tensor(1.0, dtype=torch.float64))


def test_forward_kl_weight_is_finite_for_huge_logits():
    w, _ = losses.f_divergence_weight(torch.tensor([1000.0, 0.0, -1000.0]), "fkl")
    torch.testing.assert_close(w, torch.tensor([3.0, 0.0, 0.0]))


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_f_weighting_reduces_to_plain_gradient_when_ratio_is_constant(divergence):
    x, eps, t = _batch(3)
    real = gaussian_denoiser(torch.full_like(x[:1], 0.5), 0.8)
    fake = gaussian_denoiser(torch.full_like(x[:1], -0.2), 1.3)
    plain, _ = losses.generator_direction(x, t, eps, S, real, fake)
    disc = lambda x_t, t, c: torch.full((x_t.shape[0],), 0.7, dtype=x_t.dtype)  # noqa: E731
    weighted, _ = losses.generator_direction(x, t, eps, S, real, fake, discriminator=disc, divergence=divergence)
    torch.testing.assert_close(weighted, plain)


def test_f_weights_multiply_each_sample_of_the_fidelity_term():
    x, eps, t = _batch(4)
    real = gaussian_denoiser(torch.full_like(x[:1], 0.5), 0.8)
    fake = gaussian_denoiser(torch.full_like(x[:1], -0.2), 1.3)
    logits = torch.linspace(-2, 2, x.shape[0], dtype=torch.float64)
    plain, _ = losses.generator_direction(x, t, eps, S, real, fake)
    js, _ = losses.generator_direction(x, t, eps, S, real, fake, discriminator=lambda *_: logits, divergence="js")
    w = torch.sigmoid(logits) / torch.sigmoid(logits).mean()
    torch.testing.assert_close(js, w.reshape(-1, 1, 1, 1) * plain)
    with pytest.raises(ValueError, match="discriminator"):
        losses.generator_direction(x, t, eps, S, real, fake, divergence="js")


def test_discriminator_loss_is_minimised_by_the_log_density_ratio():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200_000, generator=g, dtype=torch.float64) + 1.0
    fake = torch.randn(200_000, generator=g, dtype=torch.float64)
    log_ratio = lambda v: v - 0.5  # log N(v; 1, 1) - log N(v; 0, 1)  # noqa: E731
    values = [losses.discriminator_loss(log_ratio(real) + c, log_ratio(fake) + c)[0].item() for c in (-0.3, 0.0, 0.3)]
    assert values[1] < values[0] and values[1] < values[2]
    slopes = [losses.discriminator_loss(s * log_ratio(real), s * log_ratio(fake))[0].item() for s in (0.8, 1.0, 1.2)]
    assert slopes[1] < slopes[0] and slopes[1] < slopes[2]


def _small_consistency_model():
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)

    def f(x_t, t, cond=None):
        tt = (t.to(x_t) / 1000).reshape(-1, 1)
        return x_t + 0.3 * torch.tanh(x_t @ w1 * (1 + tt)) @ w2

    return f


def test_condition_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(6)
    x_t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([100, 500, 900])
    f = _small_consistency_model()
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    c = torch.tensor([0, 2, 1])
    decode = lambda v: torch.tanh(v) * 2  # noqa: E731
    log_lik = lambda img: torch.log_softmax(img @ a, dim=1).gather(1, c[:, None]).squeeze(1)  # noqa: E731
    grad, logs = losses.condition_gradient(x_t, t, f, log_lik, decode=decode)
    assert not grad.requires_grad
    fd = torch.zeros_like(x_t)
    h = 1e-6
    for i in range(x_t.shape[1]):
        e = torch.zeros_like(x_t)
        e[:, i] = h
        fd[:, i] = (log_lik(decode(f(x_t + e, t))) - log_lik(decode(f(x_t - e, t)))) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(logs["log_likelihood"], log_lik(decode(f(x_t, t))).mean().float())


def test_condition_gradient_leaves_model_parameters_untouched():
    lin = torch.nn.Linear(4, 4).double()
    x_t = torch.randn(2, 4, dtype=torch.float64)
    losses.condition_gradient(x_t, torch.tensor([10, 20]), lambda v, t, c: lin(v), lambda img: -img.pow(2).sum(1))
    assert all(p.grad is None for p in lin.parameters())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_surrogate_gradient_is_minus_g(reduction):
    x, _, _ = _batch(7)
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    losses.surrogate_loss(xr, g, reduction).backward()
    scale = 1.0 if reduction == "sum" else 1.0 / x.shape[0]
    torch.testing.assert_close(xr.grad, -g * scale)


def test_terms_add_up_in_score_space_with_one_scale():
    x, eps, t = _batch(8)
    x_t = S.add_noise(x, eps, t)
    alpha, sigma = S.alpha_sigma(t, x)
    real = gaussian_denoiser(torch.full_like(x[:1], 0.5), 0.8)
    fake = gaussian_denoiser(torch.full_like(x[:1], -0.2), 1.3)
    guide = lambda v, tt, c: real(v, tt) * (1.0 if c == "pos" else 0.5)  # noqa: E731
    f = lambda v, tt, c: 0.9 * v  # noqa: E731
    log_lik = lambda img: -(img - 1.0).pow(2).flatten(1).sum(1)  # noqa: E731
    reward = lambda img: img.flatten(1).sum(1)  # noqa: E731
    kw = dict(consistency_denoise=f, log_likelihood=log_lik, guidance_denoise=guide, guidance_cond="pos",
              guidance_uncond="neg", cfg_scale=3.0, reward=reward, condition_weight=0.5, reward_weight=2.0)
    g, logs = losses.generator_direction(x, t, eps, S, real, fake, weighting="none", **kw)
    s_fid = alpha * (real(x_t, t) - fake(x_t, t)) / sigma**2
    g_c = 0.9 * (-2 * (0.9 * x_t - 1.0))  # d/dx_t of -(0.9 x_t - 1)^2
    s_cfg = alpha * 2.0 * (guide(x_t, t, "pos") - guide(x_t, t, "neg")) / sigma**2
    g_r = torch.full_like(x, 0.9)
    torch.testing.assert_close(g, alpha * (s_fid + 0.5 * g_c + s_cfg + 2.0 * g_r))
    # The logged size of each term on x (mean |.| per element): the balance of control and fidelity.
    for name, term in (("fidelity", s_fid), ("condition", 0.5 * g_c), ("cfg", s_cfg), ("reward", 2.0 * g_r)):
        torch.testing.assert_close(logs[f"{name}_on_x"], (alpha * term).abs().flatten(1).mean(1).mean().float())
    # Same relative scale under DMD normalisation: only one per-sample factor changes.
    g_dmd, _ = losses.generator_direction(x, t, eps, S, real, fake, weighting="dmd", **kw)
    norm = (x - real(x_t, t)).abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(g_dmd, g * sigma**2 / (alpha**2 * norm))


def test_condition_t_max_drops_the_condition_term_of_later_samples_only():
    x, eps, t = _batch(11)
    t = torch.tensor([100, 500, 600, 601, 900, 980])
    real = gaussian_denoiser(torch.full_like(x[:1], 0.5), 0.8)
    fake = gaussian_denoiser(torch.full_like(x[:1], -0.2), 1.3)
    kw = dict(consistency_denoise=lambda v, tt, c: 0.9 * v, log_likelihood=lambda img: -(img - 1.0).pow(2).flatten(1).sum(1),
              weighting="none")
    full, _ = losses.generator_direction(x, t, eps, S, real, fake, **kw)
    fidelity, _ = losses.generator_direction(x, t, eps, S, real, fake, weighting="none")
    cut, _ = losses.generator_direction(x, t, eps, S, real, fake, condition_t_max=600, **kw)
    torch.testing.assert_close(cut[:3], full[:3])
    torch.testing.assert_close(cut[3:], fidelity[3:])
    assert not torch.allclose(full[3:], fidelity[3:])
    # a dropped control (condition_mask False) removes the term the same way, whatever t
    kept = torch.tensor([True, False, True, False, True, True])
    masked, _ = losses.generator_direction(x, t, eps, S, real, fake, condition_mask=kept, **kw)
    torch.testing.assert_close(masked[kept], full[kept])
    torch.testing.assert_close(masked[~kept], fidelity[~kept])


def test_snr_condition_weighting_is_the_x0_gradient_at_every_t():
    # f(x_t) = x_t / alpha_t (a consistency model predicting eps = 0) and log p = -|f - 1|^2 / 2:
    # grad_{x_t} = -(f - 1) / alpha_t. With lambda_t = sigma^2 / alpha^2 ("sigma2") Eq. 5 gives the
    # direction -(f - 1) sigma^2 / alpha^2 on x; the SNR weighting removes the 1 / SNR factor, leaving
    # the x0 gradient -(f - 1) at every t.
    x, eps, t = _batch(12)
    t = torch.tensor([20, 100, 400, 700, 900, 980])
    alpha, sigma = S.alpha_sigma(t, x)
    x0 = S.add_noise(x, eps, t) / alpha
    kw = dict(consistency_denoise=lambda v, tt, c: v / S.alpha_sigma(tt, v)[0],
              log_likelihood=lambda img: -0.5 * (img - 1.0).pow(2).flatten(1).sum(1), weighting="sigma2")
    snr, _ = losses.generator_direction(x, t, eps, S, real_denoise=lambda v, tt, c: v, fake_denoise=None,
                                        condition_weighting="snr", **kw)
    eq5, _ = losses.generator_direction(x, t, eps, S, real_denoise=lambda v, tt, c: v, fake_denoise=None, **kw)
    torch.testing.assert_close(snr, -(x0 - 1.0))
    torch.testing.assert_close(eq5, -(x0 - 1.0) * sigma**2 / alpha**2)
    # "x0": the same x0 gradient whatever the fidelity weighting (DMD's per-sample norm included)
    for weighting in ("dmd", "none"):
        kw["weighting"] = weighting
        direct, _ = losses.generator_direction(x, t, eps, S, real_denoise=lambda v, tt, c: 0.5 * v, fake_denoise=None,
                                               condition_weighting="x0", **kw)
        torch.testing.assert_close(direct, -(x0 - 1.0))
    with pytest.raises(ValueError, match="condition_weighting"):
        losses.generator_direction(x, t, eps, S, lambda v, tt, c: v, None, condition_weighting="bogus", **kw)


def test_decoupled_cfg_with_guidance_teacher_equal_to_real_is_dmd_cfg():
    x, eps, t = _batch(9)
    x_t = S.add_noise(x, eps, t)
    teacher = lambda v, tt, c: gaussian_denoiser(torch.full_like(x[:1], 0.5 if c == "pos" else -0.5), 0.8)(v, tt)  # noqa: E731
    fake = gaussian_denoiser(torch.full_like(x[:1], -0.2), 1.3)
    g, _ = losses.generator_direction(x, t, eps, S, teacher, fake, "pos", guidance_denoise=teacher, guidance_cond="pos",
                                      guidance_uncond="neg", cfg_scale=4.5, weighting="sigma2")
    # DMD's guided real score: x0_cfg = uncond + w (cond - uncond); direction x0_cfg - x0_fake.
    x0_cfg = cfg(teacher(x_t, t, "pos"), teacher(x_t, t, "neg"), 4.5)
    torch.testing.assert_close(g, x0_cfg - fake(x_t, t, "pos"))
    # The guidance teacher's conditional pass is the real score's own: evaluated once, same result.
    calls = []
    counted = lambda v, tt, c: calls.append(c) or teacher(v, tt, c)  # noqa: E731
    g2, _ = losses.generator_direction(x, t, eps, S, counted, fake, "pos", guidance_denoise=counted, guidance_cond="pos",
                                       guidance_uncond="neg", cfg_scale=4.5, weighting="sigma2")
    assert calls == ["pos", "neg"]
    torch.testing.assert_close(g2, g)


def test_fake_score_loss_of_exact_denoiser_is_the_posterior_variance():
    # Data N(0, s^2): E||eps - E[eps | x_t]||^2 per element is alpha^2 s^2 / (alpha^2 s^2 + sigma^2).
    g = torch.Generator().manual_seed(11)
    n, s = 200_000, 0.6
    x = s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    t = torch.full((n,), 300)
    loss, _ = losses.fake_score_loss(gaussian_denoiser(torch.zeros(1, 1, dtype=torch.float64), s), x, eps, t, S)
    abar = S.alphas_cumprod[300].item()
    expected = abar * s**2 / (abar * s**2 + 1 - abar)
    assert abs(loss.item() - expected) < 4 * expected * math.sqrt(2 / n) + 1e-3


def test_consistency_loss_zero_for_a_consistent_map_and_trains_only_the_later_point():
    x, eps, t = _batch(12)
    point = x[:1].clone()
    const = lambda v, tt, c: point.expand_as(v)  # noqa: E731  # consistent for data = delta(point)
    loss, _ = losses.consistency_loss(const, const, point.expand_as(x), eps, t, t - 10, S)
    assert loss.item() == 0.0
    lin = torch.nn.Linear(18, 18).double()
    den = lambda v, tt, c: lin(v.flatten(1)).reshape(v.shape)  # noqa: E731
    loss, _ = losses.consistency_loss(den, den, x, eps, t, t - 10, S)
    x_k, x_p = S.add_noise(x, eps, t), S.add_noise(x, eps, t - 10)
    torch.testing.assert_close(loss, (den(x_k, t, None) - den(x_p, t - 10, None)).pow(2).mean())
    loss.backward()
    # d/dW of ||W a - sg(W b)||^2 is 2 (W a - W b) a^T / N: only the t_k point carries gradient.
    diff = (den(x_k, t, None) - den(x_p, t - 10, None)).detach().flatten(1)
    expected = 2 * diff.T @ x_k.flatten(1) / diff.numel()
    torch.testing.assert_close(lin.weight.grad, expected)
    with pytest.raises(ValueError, match="t > t_prev"):
        losses.consistency_loss(den, den, x, eps, t, t, S)


def test_consistency_loss_reaches_the_boundary_and_its_target_is_not_the_online_network():
    """Eq. 8 as consistency training: at t_{k-1} = 0 the target is f(x_0, 0) = x_0 / alpha_0, whatever the
    networks; elsewhere it is the target network f^-, never the online one. A constant f, which made the
    old loss zero, now pays at the boundary."""
    x, eps, _ = _batch(14)
    t = torch.tensor([3, 3, 3, 500, 500, 500])
    t_prev = torch.tensor([0, 0, 0, 400, 400, 400])
    online_calls, target_calls = [], []

    def online(v, tt, c):
        online_calls.append(tt.clone())
        return torch.zeros_like(v)  # a constant f

    def target(v, tt, c):
        target_calls.append(tt.clone())
        return torch.full_like(v, 2.0)

    loss, logs = losses.consistency_loss(online, target, x, eps, t, t_prev, S)
    alpha0 = S.alphas_cumprod[0].sqrt().item()
    boundary = S.add_noise(x[:3], eps[:3], t_prev[:3]) / alpha0
    expected = torch.cat([boundary, torch.full_like(x[3:], 2.0)]).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.item() > 0.1
    assert all(bool((tt == t).all()) for tt in online_calls)  # online network only at t_k
    assert all(not bool((tt == t).all()) for tt in target_calls)
    torch.testing.assert_close(logs["consistency_boundary_share"], torch.tensor(0.5))


def test_consistency_ode_pairs_take_one_ddim_step_of_the_given_denoiser():
    """`--consistency-pairs ode`: the lower point is the DDIM step of the exact denoiser of N(0, s^2 I)
    data, whose coefficient is written out here: x_prev = (a' a s^2 + o' o) / (a^2 s^2 + o^2) x_t. The
    default pair is made from the same x and eps instead."""
    x, eps, _ = _batch(15)
    t, t_prev = torch.tensor([999, 700, 500, 300, 100, 41]), torch.tensor([815, 523, 327, 146, 41, 7])
    s2 = 0.25
    seen = {}

    def target(v, tt, c):
        seen["x_prev"] = v.clone()
        return v

    zero = lambda v, tt, c: torch.zeros_like(v)  # noqa: E731
    losses.consistency_loss(zero, target, x, eps, t, t_prev, S, ode_denoise=gaussian_denoiser(torch.zeros(1), s2**0.5))
    a, o = (v.double().reshape(-1, 1, 1, 1) for v in (S.alphas_cumprod[t].sqrt(), (1 - S.alphas_cumprod[t]).sqrt()))
    a1, o1 = (v.double().reshape(-1, 1, 1, 1) for v in (S.alphas_cumprod[t_prev].sqrt(),
                                                           (1 - S.alphas_cumprod[t_prev]).sqrt()))
    x_t = a * x + o * eps
    torch.testing.assert_close(seen["x_prev"], (a1 * a * s2 + o1 * o) / (a**2 * s2 + o**2) * x_t)
    losses.consistency_loss(zero, target, x, eps, t, t_prev, S)
    torch.testing.assert_close(seen["x_prev"], a1 * x + o1 * eps)


def test_consistency_discretisation_runs_from_the_boundary_to_999_in_karras_spacing():
    ts = losses.consistency_timesteps(40, S)
    assert ts[0].item() == 0 and ts[-1].item() == 999
    assert bool((ts[1:] > ts[:-1]).all())
    sig = S.sigma_ve(ts) ** (1 / 7)
    steps = sig[1:] - sig[:-1]  # rho = 7: equal steps in sigma^(1/7), up to rounding to timesteps
    assert steps[10:].max() < 1.6 * steps[10:].min()
    g = torch.Generator().manual_seed(0)
    t_k, t_prev = losses.consistency_pairs(4000, ts, g)
    assert bool((t_k > t_prev).all()) and (t_prev == 0).any() and (t_k == 999).any()
    index = torch.searchsorted(ts, t_k)
    assert bool((ts[index - 1] == t_prev).all())  # neighbours on the grid


def test_dsm_controlnet_loss_regresses_onto_data():
    x, eps, _ = _batch(13)
    seen = {}

    def student(v, tt, c):
        seen["t"], seen["x_t"], seen["c"] = tt, v, c
        return torch.zeros_like(v)

    loss, _ = losses.dsm_controlnet_loss(student, x, eps, S, cond="canny")
    torch.testing.assert_close(loss, x.pow(2).mean())
    assert seen["c"] == "canny" and bool((seen["t"] == 999).all())
    torch.testing.assert_close(seen["x_t"], S.add_noise(x, eps, seen["t"]))


def test_timesteps_and_user_errors():
    t = losses.sample_timesteps(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 20 and int(t.max()) == 980
    with pytest.raises(ValueError, match="t_min"):
        losses.sample_timesteps(4, 500, 100)
    x, eps, t = _batch(14)
    den = gaussian_denoiser(torch.zeros_like(x[:1]), 1.0)
    with pytest.raises(ValueError, match="consistency_denoise"):
        losses.generator_direction(x, t, eps, S, den, den, log_likelihood=lambda i: i.flatten(1).sum(1))
    with pytest.raises(ValueError, match="guidance_denoise"):
        losses.generator_direction(x, t, eps, S, den, den, cfg_scale=3.0)
    with pytest.raises(ValueError, match="divergence"):
        losses.f_divergence_weight(torch.zeros(3), "tv")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        losses.condition_gradient(x, t, den, lambda img: img.sum())


@pytest.mark.parametrize("weighting", losses.CONDITION_WEIGHTINGS)
def test_exact_condition_replaces_the_estimate_by_the_gradient_of_log_p_c_given_x_t(weighting):
    """`exact_condition(x_t, t)` is differentiated at x_t itself (no consistency model, no decoder) and
    weighted as the estimate would be: the direction equals the one the estimate gives when the
    consistency model is the identity and the likelihood is the same function of x_t."""
    x, eps, t = _batch(21)
    real = gaussian_denoiser(torch.zeros(1, 1, dtype=torch.float64), 0.7)
    log_p = lambda v, tt: -(v - 0.3).pow(2).flatten(1).sum(1) * (1 + tt.double() / 1000)  # noqa: E731
    g_exact, _ = losses.generator_direction(x, t, eps, S, real, None, exact_condition=log_p,
                                            condition_weighting=weighting)
    g_ref, _ = losses.generator_direction(x, t, eps, S, real, None, consistency_denoise=lambda v, tt, c: v,
                                          log_likelihood=lambda v: log_p(v, t), condition_weighting=weighting)
    torch.testing.assert_close(g_exact, g_ref)
    x_t = S.add_noise(x, eps, t)
    grad = -2 * (x_t - 0.3) * (1 + t.double() / 1000).reshape(-1, 1, 1, 1)
    alpha, sigma = S.alpha_sigma(t, x)
    scale = {"eq5": losses.term_scale(x, real(x_t, t, None), t, S),
             "snr": losses.term_scale(x, real(x_t, t, None), t, S) * (alpha / sigma) ** 2, "x0": alpha}[weighting]
    torch.testing.assert_close(g_exact, scale * grad)  # Eq. 5's weighting written out, on the analytic gradient
