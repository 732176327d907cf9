import pytest
import torch

from jdm_train.guidance import cfg, cfg_term, decoupled_cfg


def _x0s(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("scale", [1.0, 2.5, 7.5, 0.0])
def test_decoupled_cfg_with_b_equal_a_is_ordinary_cfg(scale):
    pos, neg, _, _ = _x0s()
    # Ordinary CFG written out independently: uncond + w (cond - uncond).
    expected = neg + scale * (pos - neg)
    torch.testing.assert_close(decoupled_cfg(pos, pos, neg, scale), expected)
    torch.testing.assert_close(cfg(pos, neg, scale), expected)


def test_decoupled_cfg_uses_only_b_for_the_direction():
    a_pos, a_neg, b_pos, b_neg = _x0s(1)
    out = decoupled_cfg(a_pos, b_pos, b_neg, 4.0)
    torch.testing.assert_close(out, a_pos + 3.0 * (b_pos - b_neg))
    # Teacher A's unconditional prediction plays no role: changing it changes nothing.
    assert not torch.allclose(out, cfg(a_pos, a_neg, 4.0))
    torch.testing.assert_close(cfg_term(b_pos, b_neg, 1.0), torch.zeros_like(b_pos))


def test_per_sample_tensor_scale_broadcasts():
    a_pos, _, b_pos, b_neg = _x0s(2)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    out = decoupled_cfg(a_pos, b_pos, b_neg, scale)
    for i in range(3):
        torch.testing.assert_close(out[i], decoupled_cfg(a_pos[i], b_pos[i], b_neg[i], float(scale[i])))


def test_shape_mismatch_is_a_value_error():
    a, b, _, _ = _x0s()
    with pytest.raises(ValueError, match="x0_b_pos"):
        decoupled_cfg(a, b, b[:, :2], 2.0)


def test_the_trainers_batched_real_score_passes_give_the_unbatched_direction():
    """DMD's CFG with the real score as guidance teacher: the trainer's one pass of batch 2B
    (`Players._real_and_unguided`) gives the direction of the two separate passes."""
    from jdm_train import fixtures, losses
    from jdm_train.denoisers import Cond, UNetDenoiser
    from jdm_train.schedule import NoiseSchedule

    schedule = NoiseSchedule()
    real = UNetDenoiser(fixtures.make_unet(cross_attention_dim=16).eval(), schedule)
    fake = UNetDenoiser(fixtures.make_unet(cross_attention_dim=16, seed=1).eval(), schedule)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 800])
    cond, neg = Cond(torch.randn(2, 7, 16, generator=g)), Cond(torch.randn(2, 7, 16, generator=g))

    def both(x_t, t):
        x0 = real(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond(torch.cat([cond.text, neg.text])))
        return x0[:2], x0[2:]

    common = dict(guidance_denoise=real, guidance_cond=cond, guidance_uncond=neg, cfg_scale=4.0)
    separate, _ = losses.generator_direction(x, t, eps, schedule, real, fake, cond, **common)
    batched, _ = losses.generator_direction(x, t, eps, schedule, real, fake, cond, real_and_unguided=both, **common)
    without_cfg, _ = losses.generator_direction(x, t, eps, schedule, real, fake, cond)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(separate, without_cfg)  # the guidance term is really there
