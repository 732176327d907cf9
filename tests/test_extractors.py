"""Registry, canny and lowres extractors against independent references (OpenCV, slicing)."""

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from jdm_train.extractors import (
    EXTRACTORS,
    canny_edges,
    extractor_names,
    extractor_params,
    get_extractor,
    hysteresis,
    run_extractor,
    soft_canny,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo(name: str) -> np.ndarray:
    img = getattr(data, name)()
    return img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)


def to_bchw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


# -- registry ---------------------------------------------------------------

def test_registry_names_and_unknown_name():
    assert {"canny", "lowres"} <= set(extractor_names())
    with pytest.raises(ValueError, match="canny"):
        get_extractor("sketch")


def test_params_are_declared_and_validated():
    for name in extractor_names():
        for p in extractor_params(name):
            assert p.kind in ("bool", "int", "float", "str")
            if p.kind in ("int", "float"):
                assert p.min <= p.default <= p.max and p.step > 0
        ext = get_extractor(name)
        assert ext.distance in ("l1", "mse", "bce", "balanced_bce")
    with pytest.raises(ValueError, match="low_threshold"):
        get_extractor("canny", low_thresh=3)
    with pytest.raises(ValueError, match="factor"):
        get_extractor("lowres", factor=1)
    with pytest.raises(ValueError, match="integer"):
        get_extractor("lowres", factor=2.5)


def test_bad_images_raise():
    ext = get_extractor("lowres")
    with pytest.raises(ValueError, match="BCHW"):
        ext.extract(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="channels"):
        ext.extract(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="float"):
        ext.extract(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


# -- canny ------------------------------------------------------------------

@pytest.mark.parametrize("low,high", [(100, 200), (50, 120)])
def test_canny_matches_opencv_on_photos(low, high):
    ext = get_extractor("canny", low_threshold=low, high_threshold=high)
    for name in PHOTOS:
        img = photo(name)
        ref = cv2.Canny(img, low, high) > 0
        out = ext.extract(to_bchw(img))
        assert out.shape == (1, 3, *img.shape[:2])
        assert torch.equal(out[:, 0], out[:, 2])
        assert np.array_equal(out[0, 0].numpy() > 0.5, ref), name
        # the batched port, which GPU tensors take, on the same photo
        assert np.array_equal(canny_edges(to_bchw(img), low, high, backend="tensor")[0].numpy(), ref), name


@pytest.mark.parametrize("backend", ["opencv", "tensor"])
def test_canny_swapped_and_fractional_thresholds_follow_opencv(backend):
    img = photo("coffee")[:160, :200]
    ref = cv2.Canny(img, 180.7, 60.2) > 0  # cv2 floors, then swaps
    out = canny_edges(to_bchw(img), 180.7, 60.2, backend=backend)
    assert np.array_equal(out[0].numpy(), ref)


def test_canny_batch_equals_per_image_and_keeps_dtype():
    imgs = [photo(n)[:128, :160] for n in PHOTOS]
    batch = torch.cat([to_bchw(i) for i in imgs]).double()
    ext = get_extractor("canny")
    out = ext.extract(batch)
    assert out.dtype == torch.float64 and out.device == batch.device
    for k in range(len(imgs)):
        assert torch.equal(out[k : k + 1], ext.extract(batch[k : k + 1]))
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_hysteresis_against_flood_fill():
    gen = torch.Generator().manual_seed(0)
    cand = torch.rand(3, 40, 50, generator=gen) < 0.45
    strong = cand & (torch.rand(3, 40, 50, generator=gen) < 0.03)
    out = hysteresis(cand, strong)
    # Independent reference: breadth-first flood fill from every strong pixel.
    ref = np.zeros(cand.shape, bool)
    c = cand.numpy()
    for b, i, j in zip(*np.nonzero(strong.numpy())):
        stack = [(i, j)]
        while stack:
            y, x = stack.pop()
            if ref[b, y, x]:
                continue
            ref[b, y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < 40 and 0 <= xx < 50 and c[b, yy, xx] and not ref[b, yy, xx]:
                        stack.append((yy, xx))
    assert ref.sum() > 100
    assert np.array_equal(out.numpy(), ref)


def test_hysteresis_long_serpentine_converges():
    # One 8-connected path of ~2100 pixels whose only strong pixel is at its far end.
    n = 64
    grid = np.zeros((n, n), bool)
    grid[::2] = True
    grid[1::4, -1] = True
    grid[3::4, 0] = True
    cand = torch.from_numpy(grid)[None]
    strong = torch.zeros_like(cand)
    strong[0, 62, 5] = True
    assert torch.equal(hysteresis(cand, strong), cand)
    grid[61, -1] = False  # cut the path: only row 62 and its tail pixel stay connected
    out = hysteresis(torch.from_numpy(grid)[None], strong)
    assert out.sum() == n + 1 and out[0, 62].all() and out[0, 63, 0]


def test_soft_canny_tracks_exact_edges():
    img = to_bchw(photo("astronaut")[::2, ::2])
    ext = get_extractor("canny")
    exact, soft = ext.extract(img), ext.soft(img)
    assert soft.shape == exact.shape and soft.min() >= 0 and soft.max() <= 1
    on, off = soft[exact > 0.5].mean(), soft[exact < 0.5].mean()
    assert on > 0.8 and off < 0.3
    # the likelihood prefers the image the edges came from over another photo
    other = to_bchw(photo("coffee")[:256, :256])
    assert ext.log_likelihood(img, exact) > ext.log_likelihood(other, exact)


def _sobel_by_slices(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hand-written separable Sobel soft_canny used before kornia's: an independent reference."""
    import torch.nn.functional as F

    p = F.pad(images, (1, 1, 1, 1), mode="replicate")
    diff_x = p[..., 2:] - p[..., :-2]
    smooth_x = p[..., :-2] + p[..., 2:] + 2 * p[..., 1:-1]
    dx = diff_x[..., :-2, :] + diff_x[..., 2:, :] + 2 * diff_x[..., 1:-1, :]
    dy = smooth_x[..., 2:, :] - smooth_x[..., :-2, :]
    return dx, dy


def test_kornia_sobel_equals_the_hand_written_one(monkeypatch):
    from jdm_train.extractors import canny

    x = torch.rand(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    new, old = canny.sobel(x), _sobel_by_slices(x)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b)
    w = torch.rand(2, 2, 3, 9, 11, dtype=torch.float64)
    g_new = torch.autograd.grad((torch.stack(new) * w).sum(), x)[0]
    g_old = torch.autograd.grad((torch.stack(old) * w).sum(), x)[0]
    torch.testing.assert_close(g_new, g_old)
    # soft_canny, logits and probabilities, in float32 on a photo: the same within float32 rounding
    img = to_bchw(photo("astronaut")[::4, ::4])
    soft = [canny.soft_canny(img, 80, 160, 1.5, logits) for logits in (True, False)]
    monkeypatch.setattr(canny, "sobel", _sobel_by_slices)
    for logits, new_out in zip((True, False), soft):
        torch.testing.assert_close(new_out, canny.soft_canny(img, 80, 160, 1.5, logits), rtol=1e-5, atol=1e-4)


def test_soft_canny_gradcheck():
    x = torch.rand(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_canny(t, 50, 100, 2.0), (x,))
    ext = get_extractor("canny", low_threshold=50, high_threshold=100)
    c = ext.extract(x.detach())
    assert torch.autograd.gradcheck(lambda t: ext.log_likelihood(t, c, tau=0.5), (x,))


# -- lowres -----------------------------------------------------------------

def test_lowres_exact_against_slicing_and_opencv():
    x = torch.rand(2, 3, 64, 48)
    out = get_extractor("lowres").extract(x)
    ref = x[..., ::8, ::8].repeat_interleave(8, -2).repeat_interleave(8, -1)
    assert torch.equal(out, ref)
    # a size not divisible by the factor: cv2.INTER_NEAREST picks the same source pixels
    img = photo("chelsea")[:101, :77]
    small = cv2.resize(img, (77 // 8, 101 // 8), interpolation=cv2.INTER_NEAREST)
    big = cv2.resize(small, (77, 101), interpolation=cv2.INTER_NEAREST)
    assert torch.equal(run_extractor("lowres", to_bchw(img)), to_bchw(big))


@pytest.mark.parametrize("shape", [(2, 3, 64, 48), (1, 3, 101, 77), (1, 1, 5, 3)])
def test_lowres_kornia_resizing_equals_torch_interpolate(shape):
    import torch.nn.functional as F

    from jdm_train.extractors import lowres_area, lowres_nearest

    x = torch.rand(shape, dtype=torch.float64)
    for fn, down in ((lowres_nearest, "nearest"), (lowres_area, "area")):
        small = F.interpolate(x, size=(max(1, shape[2] // 8), max(1, shape[3] // 8)), mode=down)
        assert torch.equal(fn(x, 8), F.interpolate(small, size=shape[2:], mode="nearest")), (fn.__name__, shape)


def test_lowres_soft_is_block_mean_and_gradchecks():
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    ext = get_extractor("lowres", factor=4)
    soft = ext.soft(x)
    assert torch.allclose(soft[0, :, 0, 0], x[0, :, :4, :4].mean((1, 2)))
    assert torch.autograd.gradcheck(ext.soft, (x,))
    c = ext.extract(x.detach())
    assert torch.autograd.gradcheck(lambda t: ext.log_likelihood(t, c, tau=0.1), (x,))


def test_consistency_is_mean_abs_error():
    x = torch.rand(3, 3, 32, 32)
    for name in ("canny", "lowres"):
        ext = get_extractor(name)
        c = ext.extract(x)
        assert torch.equal(ext.consistency(x, c), torch.zeros(3))
        c2 = c.clone()
        c2[1] = 1 - c2[1]
        err = ext.consistency(x, c2)
        assert err[0] == 0 and err[2] == 0
        assert torch.isclose(err[1], (c[1] - c2[1]).abs().mean()) and err[1] > 0.1


def test_every_registered_extractor_builds():
    assert list(EXTRACTORS) == extractor_names()
    for name in extractor_names():
        assert get_extractor(name).name == name


def test_half_precision_and_call_alias():
    img = to_bchw(photo("rocket")[:96, :128])
    for name in ("canny", "lowres"):
        ext = get_extractor(name)
        full = ext(img)
        half = ext.extract(img.half())
        assert half.dtype == torch.float16 and half.shape == full.shape
        # 8-bit values survive float16, so the exact faces agree
        assert torch.equal(half.float(), full) if name == "canny" else torch.allclose(half.float(), full, atol=1e-3)
        soft = ext.soft(img.half())
        assert soft.dtype == torch.float16 and torch.isfinite(soft).all()
        if name == "canny":  # logits too: 8-bit Sobel squares overflow float16 unless upcast
            assert torch.isfinite(ext.soft_logits(img.half())).all()


def test_empty_batch_and_grey_input():
    for name in ("canny", "lowres"):
        out = get_extractor(name).extract(torch.rand(0, 3, 16, 16))
        assert out.shape == (0, 3, 16, 16)
    grey = photo("camera")[:64, :80, 0]
    out = get_extractor("canny").extract(torch.from_numpy(grey)[None, None].float() / 255)
    assert np.array_equal(out[0, 0].numpy() > 0.5, cv2.Canny(grey, 100, 200) > 0)


def test_canny_restores_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        canny_edges(torch.rand(1, 3, 32, 32), backend="tensor")  # the port runs on one thread
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["opencv", "tensor"])
@pytest.mark.parametrize("kind", ["noise", "ties", "blur", "grey_levels"])
def test_canny_bit_exact_on_adversarial_images(kind, backend):
    # Noise and few grey levels make every tie rule of OpenCV (channel choice, NMS
    # strict/non-strict comparisons, sector borders, thresholds) matter.
    rng = np.random.default_rng(sum(map(ord, kind)))
    for _ in range(4):
        h, w = rng.integers(5, 70, 2)
        if kind == "noise":
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        elif kind == "ties":
            img = (rng.integers(0, 4, (h, w, 3)) * 60).astype(np.uint8)
        elif kind == "blur":
            img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        else:
            img = np.repeat(rng.integers(0, 3, (h, w, 1)).astype(np.uint8) * 100, 3, -1)
        lo, hi = (int(t) for t in sorted(rng.integers(0, 400, 2)))
        out = canny_edges(to_bchw(img), lo, hi, backend=backend)[0].numpy()
        assert np.array_equal(out, cv2.Canny(img, lo, hi) > 0), (h, w, lo, hi)


def test_balanced_bce_weighs_edge_and_background_pixels_half_each():
    """Canny's condition distance: HED's class-balanced BCE, per pixel, averages to the mean of the
    per-class mean BCEs (so its pixel sum is the pixel count times that)."""
    import torch.nn.functional as F

    from jdm_train.extractors.base import DISTANCES

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    c = (torch.rand(2, 3, 16, 16, generator=g) > 0.95).float()
    bce = F.binary_cross_entropy_with_logits(logits, c, reduction="none")
    for i in range(2):
        pos, neg = bce[i][c[i] > 0.5], bce[i][c[i] < 0.5]
        expected = 0.5 * pos.mean() + 0.5 * neg.mean()
        per_pixel = DISTANCES["balanced_bce"](logits, c)[i]
        assert per_pixel.shape == c[i].shape
        torch.testing.assert_close(per_pixel.mean(), expected)
    # no edges at all: plain BCE over the background
    blank = torch.zeros_like(c)
    torch.testing.assert_close(DISTANCES["balanced_bce"](logits, blank), DISTANCES["bce"](logits, blank))
    assert get_extractor("canny").distance == "balanced_bce"
