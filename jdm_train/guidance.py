"""Decoupled classifier-free guidance (JDM Sec. 3.1), as pure functions on x0 predictions.

JDM treats text alignment as a condition of its own, so the guidance direction may come from
a *guidance teacher* B that differs from the real score A (SD2.1 guiding SD1.5 in the paper):

    x0_guided = x0_A(c) + (w - 1) (x0_B(c) - x0_B(empty))

With B = A this is ordinary CFG, `x0(empty) + w (x0(c) - x0(empty))`, exactly. Everything
here works on x0 predictions of any shape; the trainer (`losses.generator_direction`) converts
the guidance term to score space and the ComfyUI Decoupled-CFG Teacher node calls
`decoupled_cfg` at sampling time. Nothing here knows about models or ComfyUI.
"""

from __future__ import annotations

from torch import Tensor


def _check_scale(scale: float | Tensor) -> None:
    if isinstance(scale, (int, float)) and scale != scale:  # NaN
        raise ValueError(f"guidance scale must be a number, got {scale!r}")


def cfg_term(x0_b_pos: Tensor, x0_b_neg: Tensor, scale: float | Tensor) -> Tensor:
    """The guidance teacher's condition direction `(w - 1) (x0_B(c) - x0_B(empty))` (JDM Sec. 3.1).

    x0_b_pos, x0_b_neg: (B, ...) x0 predictions of the guidance teacher with and without the
    text. `scale` is the CFG scale w (w = 1: no guidance); a tensor must broadcast against x0.
    """
    _check_scale(scale)
    if x0_b_pos.shape != x0_b_neg.shape:
        raise ValueError(f"x0_b_pos and x0_b_neg must have the same shape, got {tuple(x0_b_pos.shape)} and "
                         f"{tuple(x0_b_neg.shape)}")
    return (scale - 1) * (x0_b_pos - x0_b_neg)


def decoupled_cfg(x0_a_pos: Tensor, x0_b_pos: Tensor, x0_b_neg: Tensor, scale: float | Tensor) -> Tensor:
    """`x0_A(c) + (w - 1) (x0_B(c) - x0_B(empty))`: teacher A's prediction guided by teacher B (JDM Sec. 3.1).

    All x0 tensors are (B, ...) of one shape. With `x0_b_* = x0_a_*` this equals `cfg(...)`.
    """
    if x0_a_pos.shape != x0_b_pos.shape:
        raise ValueError(f"x0_a_pos and x0_b_pos must have the same shape, got {tuple(x0_a_pos.shape)} and "
                         f"{tuple(x0_b_pos.shape)}")
    return x0_a_pos + cfg_term(x0_b_pos, x0_b_neg, scale)


def cfg(x0_pos: Tensor, x0_neg: Tensor, scale: float | Tensor) -> Tensor:
    """Ordinary classifier-free guidance `x0(empty) + w (x0(c) - x0(empty))` (Ho & Salimans 2022)."""
    _check_scale(scale)
    return x0_neg + scale * (x0_pos - x0_neg)
