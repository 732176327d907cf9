"""Canny edges: `cv2.Canny` itself on the CPU, an exact batched port of it for other devices,
and a differentiable face.

ControlNet's canny annotator calls `cv2.Canny(uint8 RGB HWC, low, high)`. OpenCV then
(imgproc/src/canny.cpp): takes a 3x3 Sobel of each channel with replicated borders,
keeps per pixel the channel of largest L1 magnitude `|dx| + |dy|` (the first on ties),
thins by non-maximum suppression in four sectors, marks pixels with magnitude `> low`
as candidates and `> high` as strong, and keeps the 8-connected candidate components
that hold a strong pixel (hysteresis). `canny_edges` calls OpenCV for CPU tensors (exact by
definition, and 3x faster there than the port was at its fastest, `bench extractors`); for
other devices it runs the port: kornia's Sobel, then every later step in 8/16-bit integers so that each comparison is
OpenCV's; hysteresis is a breadth-first search over the candidate pixels, whose rounds touch
only the newly reached pixels (a dilation loop re-reads the whole image every round).
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from .base import Extractor, Param, check_images, to_hint

# tan(22.5 deg) in Q15, OpenCV's TG22: sectors are decided in exact integer arithmetic.
_TG22 = 13573
_MAX_L1 = 2040  # largest |dx| + |dy| of a 3x3 Sobel on 8-bit values
_CHUNK = 2


def _select(keep: torch.Tensor, other: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """`torch.where(ones == -1, keep, other)` for a 0/-1 int16 mask.

    torch.where is not vectorised for these dtypes on CPU (20x slower than this)."""
    return (keep - other).bitwise_and_(ones).add_(other)


def _gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV's per-pixel gradient of an RGB batch: (B, 3, H, W) in [0, 1] -> m, dx, dy (B, H, W) int16.

    Values are quantised to 8 bits by rounding (k/255 * 255 may land just below k,
    which truncation would turn into k - 1); Sobel 3x3 with replicated border per
    channel; m = |dx| + |dy| of the channel with the largest m, the first on ties.
    """
    c = images.shape[1]
    q = (images.float() * 255).clamp_(0, 255).round_()  # 255 x in float32, as the OpenCV path converts
    # The Sobel of 8-bit integers is an integer below 1021 in magnitude, exact in float32 when the
    # convolution sums the products directly, as PyTorch's CPU convolutions do (MPS has no TF32).
    # cuDNN may pick FFT or Winograd algorithms and TF32 inputs: in float64 those land well within
    # 0.5 of the integer, and TF32 never applies.
    wide = torch.float32 if images.device.type in ("cpu", "mps") else torch.float64
    g = kornia.filters.spatial_gradient(q.to(wide), mode="sobel", normalized=False).round_().to(torch.int16)
    dx, dy = g[:, :, 0], g[:, :, 1]
    mag = dx.abs()
    mag += dy.abs()
    m = mag.amax(1)
    gx, gy = dx[:, c - 1], dy[:, c - 1]
    for ch in range(c - 2, -1, -1):  # lower channels override: the first maximum wins
        first = (mag[:, ch] == m).to(torch.int16).neg_()
        gx, gy = _select(dx[:, ch], gx, first), _select(dy[:, ch], gy, first)
    return m, gx, gy


def _nms(images: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate and strong pixel masks, (B, H, W) bool each, exactly as canny.cpp's stage 2."""
    m, gx, gy = _gradients(images)
    # Outside the image the magnitude is 0 (OpenCV's zeroed ring-buffer borders).
    mp = F.pad(m, (1, 1, 1, 1))
    c = mp[:, 1:-1, 1:-1]
    ax, ay = gx.abs().int(), gy.abs().int() << 15
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = (ay - (ax << 16)) > tg22x  # y > tg22x + (x << 16), without overflow
    diagonal = ~(horizontal | vertical)
    # (xs ^ ys) >= 0: same sign, the gradient points along the main diagonal.
    same_sign = (gx < 0) == (gy < 0)
    keep = horizontal & (c > mp[:, 1:-1, :-2]) & (c >= mp[:, 1:-1, 2:])
    keep |= vertical & (c > mp[:, :-2, 1:-1]) & (c >= mp[:, 2:, 1:-1])
    keep |= diagonal & same_sign & (c > mp[:, :-2, :-2]) & (c > mp[:, 2:, 2:])
    keep |= diagonal & ~same_sign & (c > mp[:, :-2, 2:]) & (c > mp[:, 2:, :-2])
    candidate = keep & (m > low)
    strong = candidate & (m > high)
    return candidate, strong


def hysteresis(candidate: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Keep the 8-connected components of `candidate` that contain a `strong` pixel.

    candidate, strong: (B, H, W) bool with strong ⊆ candidate. Returns (B, H, W) bool.
    A breadth-first search from all strong pixels at once over a flat index space:
    each round visits only the newest pixels, so the total work is proportional to
    the number of edge pixels, and the number of rounds to the longest run of weak
    pixels (about a hundred for 512 px photos).
    """
    b, h, w = candidate.shape
    wp = w + 2
    # The zero ring keeps neighbour offsets inside the array and separates the images.
    weak = F.pad(candidate & ~strong, (1, 1, 1, 1))
    # Start only from strong pixels next to a weak one: most strong pixels have none.
    rows = weak[:, :, :-2] | weak[:, :, 1:-1] | weak[:, :, 2:]
    near_weak = F.pad(rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:], (1, 1, 1, 1))
    front = (F.pad(strong, (1, 1, 1, 1)) & near_weak).reshape(-1).nonzero().squeeze(1)
    todo = weak.reshape(-1)
    offsets = torch.tensor([-wp - 1, -wp, -wp + 1, -1, 1, wp - 1, wp, wp + 1], device=front.device)
    claim = torch.empty(todo.numel(), dtype=torch.int32, device=front.device)
    while front.numel():
        nbr = (front[:, None] + offsets).reshape(-1)
        front = nbr[todo[nbr]]
        # A pixel next to several front pixels is found several times, and the copies
        # multiply round after round (7x the work on photos): keep the copy whose
        # position won the scatter.
        pos = torch.arange(front.numel(), dtype=torch.int32, device=front.device)
        claim[front] = pos
        front = front[claim[front] == pos]
        todo[front] = False
    weak_left = todo.view(b, h + 2, wp)[:, 1:-1, 1:-1]
    return candidate & ~weak_left


BACKENDS = ("auto", "opencv", "tensor")


def canny_edges(images: torch.Tensor, low: float = 100, high: float = 200, backend: str = "auto") -> torch.Tensor:
    """Exact `cv2.Canny(round(255 x), low, high)` per image: (B, C, H, W), C = 1 or 3 -> (B, H, W) bool.

    255 x is computed in float32 and rounded half to even, saturating at 0 and 255.

    Thresholds are on the L1 Sobel magnitude of 8-bit values and floored, as OpenCV
    does; they are swapped when low > high. `backend`: "opencv" calls `cv2.Canny` per
    image, "tensor" runs the batched port on the images' device, "auto" picks OpenCV for
    CPU tensors when it is installed and the port otherwise. Both give the same edges.
    """
    if backend not in BACKENDS:
        raise ValueError(f"canny_edges: backend must be one of {BACKENDS}, got {backend!r}")
    lo, hi = math.floor(low), math.floor(high)
    if lo > hi:
        lo, hi = hi, lo
    if images.shape[0] == 0:
        return torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
    cv2 = _opencv() if backend != "tensor" else None
    if backend == "opencv" and cv2 is None:
        raise ValueError("canny_edges: backend 'opencv' needs OpenCV (pip install opencv-python-headless)")
    if cv2 is not None and (backend == "opencv" or images.device.type == "cpu"):
        return _canny_opencv(cv2, images, lo, hi).to(images.device)
    with _one_cpu_thread(images.device):
        # Chunks keep the int16 temporaries of stage 2 in cache; hysteresis runs on the whole batch.
        masks = [_nms(chunk, lo, hi) for chunk in images.split(_CHUNK)]
        return hysteresis(torch.cat([c for c, _ in masks]), torch.cat([s for _, s in masks]))


@functools.cache
def _opencv():
    try:
        import cv2
    except ImportError:  # the tensor port still gives the same edges
        return None
    return cv2


def _canny_opencv(cv2, images: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """`cv2.Canny` per image of a (B, C, H, W) batch in [0, 1] -> (B, H, W) bool on the CPU."""
    # The conversion to 8 bits is OpenCV's too (SIMD, and no extra pass): convertScaleAbs rounds
    # 255 x half to even, as torch.round does, and saturates at 255. It takes absolute values,
    # so values below 0 are clamped first, which only images outside [0, 1] pay for.
    hwc = images.detach().cpu().float().permute(0, 2, 3, 1)
    b, h, w, c = hwc.shape
    out = torch.empty(b, h, w, dtype=torch.uint8)
    edges = out.numpy()
    for i in range(b):
        img = hwc[i].contiguous()  # a view for BHWC data such as ComfyUI's IMAGE
        if cv2.minMaxLoc(img.view(h, w * c).numpy())[0] < 0:
            img = img.clamp_min(0)
        cv2.Canny(cv2.convertScaleAbs(img.numpy(), alpha=255), lo, hi, edges=edges[i])
        # 255 -> 1 in place, so the bytes are valid bools: no second tensor, and no torch
        # op, whose thread pool costs more than the pass itself on a busy machine
        np.minimum(edges[i], 1, out=edges[i])
    return out.view(torch.bool)


@contextmanager
def _one_cpu_thread(device: torch.device):
    # Stage 2 and hysteresis are many light passes; an OpenMP fork/join per pass costs
    # more than it saves (2 threads: 4-25x slower, measured on a busy 2-core machine).
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def sobel(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised 3x3 Sobel dx, dy (B, C, H, W) with replicated border, differentiable (kornia)."""
    g = kornia.filters.spatial_gradient(images, mode="sobel", normalized=False)
    return g[:, :, 0], g[:, :, 1]


def soft_canny(
    images: torch.Tensor, low: float = 100, high: float = 200, softness: float = 1.0, logits: bool = False
) -> torch.Tensor:
    """Differentiable edge probability (B, 3, H, W) -> (B, 1, H, W) in (0, 1), or its logits.

    A sigmoid of the Sobel L1 magnitude (8-bit units, channel maximum as in
    OpenCV) centred between the thresholds, with `softness` times a quarter of their
    gap as temperature, so pixels at `low` map to ~0.12 and at `high` to ~0.88. It has
    no non-maximum suppression: its edges are a few pixels wide. (A soft NMS made it one
    pixel wide like the exact map, pixel F1 0.94 vs 0.58, but the demo student then learnt
    the control far less: edge F1 0.25 vs 0.53 after 1000 steps, `bench control`.)
    """
    lo, hi = min(low, high), max(low, high)
    dtype = images.dtype
    # 8-bit Sobel values square past float16's range (1020^2 > 65504): compute in float32 at least.
    dx, dy = sobel(images.to(torch.promote_types(dtype, torch.float32)) * 255)
    # sqrt(g^2 + 1) - 1 is |g| smoothed below one 8-bit step, so the gradient exists everywhere.
    mag = (dx.square() + 1).sqrt() + (dy.square() + 1).sqrt() - 2
    mag = mag.amax(1, keepdim=True)
    temperature = softness * max(hi - lo, 4.0) / 4
    z = (mag - (lo + hi) / 2) / temperature
    return (z if logits else torch.sigmoid(z)).to(dtype)


class Canny(Extractor):
    """Canny edges as ControlNet's annotator makes them (white edges on black)."""

    name = "canny"
    distance = "balanced_bce"
    PARAMS = (
        Param("low_threshold", 100, 0, _MAX_L1, 1, tooltip="lower hysteresis threshold (8-bit Sobel L1 units, as cv2.Canny)"),
        Param("high_threshold", 200, 0, _MAX_L1, 1, tooltip="upper hysteresis threshold (8-bit Sobel L1 units, as cv2.Canny)"),
        Param("softness", 1.0, 0.05, 20.0, 0.05, tooltip="temperature of the differentiable edge map (training only)"),
    )

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "canny")
        with torch.no_grad():
            edges = canny_edges(x, self.params["low_threshold"], self.params["high_threshold"])
        # one pass from bool to the 3-channel float hint
        return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(edges[:, None].expand_as(x))

    def soft_logits(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "canny")
        p = self.params
        return to_hint(soft_canny(x, p["low_threshold"], p["high_threshold"], p["softness"], logits=True))
