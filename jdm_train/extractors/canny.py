"""Canny edges: an exact batched port of OpenCV's `cv2.Canny` and a differentiable face.

ControlNet's canny annotator calls `cv2.Canny(uint8 RGB HWC, low, high)`. OpenCV then
(imgproc/src/canny.cpp): takes a 3x3 Sobel of each channel with replicated borders,
keeps per pixel the channel of largest L1 magnitude `|dx| + |dy|` (the first on ties),
thins by non-maximum suppression in four sectors, marks pixels with magnitude `> low`
as candidates and `> high` as strong, and keeps the 8-connected candidate components
that hold a strong pixel (hysteresis). `canny_edges` reproduces each of these steps
on tensors; hysteresis is a connected-component labelling of the candidate pixels
(min-label propagation with pointer jumping), which converges in a few dozen rounds
where a dilation loop needs as many rounds as the longest edge is long.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F

from .base import Extractor, Param, check_images, to_hint

# tan(22.5 deg) in Q15, OpenCV's TG22: sectors are decided in exact integer arithmetic.
_TG22 = 13573
_MAX_L1 = 2040  # largest |dx| + |dy| of a 3x3 Sobel on 8-bit values


def _quantize(images: torch.Tensor) -> torch.Tensor:
    # Rounding (not truncation) keeps k/255 -> k exact although k/255*255 may land below k.
    return (images.clamp(0, 1) * 255).round()


def _sobel_int(u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel dx, dy of (B, C, H, W) integer-valued floats, replicated border (as cv2)."""
    p = F.pad(u8, (1, 1, 1, 1), mode="replicate")
    diff_x = p[..., 2:] - p[..., :-2]
    smooth_x = p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]
    dx = diff_x[..., :-2, :] + 2 * diff_x[..., 1:-1, :] + diff_x[..., 2:, :]
    dy = smooth_x[..., 2:, :] - smooth_x[..., :-2, :]
    return dx, dy


def _nms(images: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate and strong pixel masks, (B, H, W) bool each, exactly as canny.cpp's stage 2."""
    dx, dy = _sobel_int(_quantize(images).float())
    mag = dx.abs() + dy.abs()
    # argmax returns the first maximum: OpenCV also keeps the first channel on ties.
    best = mag.argmax(1, keepdim=True)
    m = mag.gather(1, best)[:, 0].to(torch.int32)
    gx = dx.gather(1, best)[:, 0].to(torch.int32)
    gy = dy.gather(1, best)[:, 0].to(torch.int32)

    # Outside the image the magnitude is 0 (OpenCV's zeroed ring-buffer borders).
    mp = F.pad(m, (1, 1, 1, 1))
    c = mp[:, 1:-1, 1:-1]
    ax, ay = gx.abs(), gy.abs() << 15
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ay > tg22x + (ax << 16)
    keep_h = (c > mp[:, 1:-1, :-2]) & (c >= mp[:, 1:-1, 2:])
    keep_v = (c > mp[:, :-2, 1:-1]) & (c >= mp[:, 2:, 1:-1])
    # (xs ^ ys) >= 0: same sign, the gradient points along the main diagonal.
    same_sign = (gx < 0) == (gy < 0)
    keep_main = (c > mp[:, :-2, :-2]) & (c > mp[:, 2:, 2:])
    keep_anti = (c > mp[:, :-2, 2:]) & (c > mp[:, 2:, :-2])
    keep_d = torch.where(same_sign, keep_main, keep_anti)
    keep = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    candidate = keep & (m > low)
    strong = candidate & (m > high)
    return candidate, strong


def hysteresis(candidate: torch.Tensor, strong: torch.Tensor, max_rounds: int = 10_000) -> torch.Tensor:
    """Keep the 8-connected components of `candidate` that contain a `strong` pixel.

    candidate, strong: (B, H, W) bool with strong ⊆ candidate. Returns (B, H, W) bool.
    Works on the candidate pixels only: each holds a label (its index), repeatedly
    takes the minimum over its neighbours, hooks its root to that minimum, and
    jumps pointers (label = label[label]); every round at least halves the distance
    to the component's minimum along most paths.
    """
    b, h, w = candidate.shape
    wp = w + 2
    flat = F.pad(candidate, (1, 1, 1, 1)).reshape(-1)  # the zero ring separates the images
    idx = flat.nonzero().squeeze(1)
    n = idx.numel()
    out = torch.zeros_like(flat)
    if n == 0:
        return out.view(b, h + 2, wp)[:, 1:-1, 1:-1]
    lut = torch.full((flat.numel(),), n, dtype=torch.long, device=flat.device)
    lut[idx] = torch.arange(n, device=flat.device)
    offsets = torch.tensor([-wp - 1, -wp, -wp + 1, -1, 1, wp - 1, wp, wp + 1], device=flat.device)
    nbr = lut[idx[:, None] + offsets]  # (n, 8); n is the sentinel "no candidate there"
    del lut

    label = torch.arange(n + 1, device=flat.device)
    for _ in range(max_rounds):
        prev = label
        m = torch.minimum(label[nbr].amin(1), label[:n])
        label = label.clone()
        label.scatter_reduce_(0, prev[:n], m, reduce="amin")
        label[:n] = torch.minimum(label[:n], m)
        label = label[label]
        label = label[label]
        if torch.equal(label, prev):
            break
    strong_c = F.pad(strong, (1, 1, 1, 1)).reshape(-1)[idx]
    has_strong = torch.zeros(n + 1, dtype=torch.uint8, device=flat.device)
    has_strong.scatter_reduce_(0, label[:n], strong_c.to(torch.uint8), reduce="amax")
    out[idx] = has_strong[label[:n]].bool()
    return out.view(b, h + 2, wp)[:, 1:-1, 1:-1]


def canny_edges(images: torch.Tensor, low: float = 100, high: float = 200) -> torch.Tensor:
    """Exact `cv2.Canny(round(255 x), low, high)` per image: (B, 3, H, W) -> (B, H, W) bool.

    Thresholds are on the L1 Sobel magnitude of 8-bit values and floored, as OpenCV
    does; they are swapped when low > high.
    """
    lo, hi = math.floor(low), math.floor(high)
    if lo > hi:
        lo, hi = hi, lo
    candidate, strong = _nms(images, lo, hi)
    return hysteresis(candidate, strong)


def soft_canny(
    images: torch.Tensor, low: float = 100, high: float = 200, softness: float = 1.0, logits: bool = False
) -> torch.Tensor:
    """Differentiable edge probability (B, 3, H, W) -> (B, 1, H, W) in (0, 1), or its logits.

    A sigmoid of kornia's Sobel L1 magnitude (8-bit units, channel maximum as in
    OpenCV) centred between the thresholds, with `softness` times a quarter of their
    gap as temperature, so pixels at `low` map to ~0.12 and at `high` to ~0.88. It has
    no non-maximum suppression: its edges are a few pixels wide.
    """
    lo, hi = min(low, high), max(low, high)
    grad = kornia.filters.spatial_gradient(images * 255, mode="sobel", normalized=False)  # (B, C, 2, H, W)
    # sqrt(g^2 + 1) - 1 is |g| smoothed below one 8-bit step, so the gradient exists everywhere.
    mag = (grad.square() + 1).sqrt().sum(2) - 2
    mag = mag.amax(1, keepdim=True)
    temperature = softness * max(hi - lo, 4.0) / 4
    z = (mag - (lo + hi) / 2) / temperature
    return z if logits else torch.sigmoid(z)


class Canny(Extractor):
    """Canny edges as ControlNet's annotator makes them (white edges on black)."""

    name = "canny"
    distance = "bce"
    PARAMS = (
        Param("low_threshold", 100, 0, _MAX_L1, 1, tooltip="lower hysteresis threshold (8-bit Sobel L1 units, as cv2.Canny)"),
        Param("high_threshold", 200, 0, _MAX_L1, 1, tooltip="upper hysteresis threshold (8-bit Sobel L1 units, as cv2.Canny)"),
        Param("softness", 1.0, 0.05, 20.0, 0.05, tooltip="temperature of the differentiable edge map (training only)"),
    )

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "canny")
        with torch.no_grad():
            edges = canny_edges(x, self.params["low_threshold"], self.params["high_threshold"])
        return to_hint(edges[:, None].to(images.dtype))

    def soft_logits(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "canny")
        p = self.params
        return to_hint(soft_canny(x, p["low_threshold"], p["high_threshold"], p["softness"], logits=True))
