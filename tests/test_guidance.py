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
