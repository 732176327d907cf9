"""canny_edges' two backends: OpenCV for CPU tensors, the batched port elsewhere; same edges either way."""

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from jdm_train.extractors import canny, canny_edges, get_extractor


def photos(n: int = 3, size: int = 96) -> torch.Tensor:
    imgs = [cv2.resize(getattr(data, name)(), (size, size), interpolation=cv2.INTER_AREA)
            for name in ("astronaut", "coffee", "chelsea")[:n]]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def test_auto_uses_opencv_on_cpu_and_the_port_without_it(monkeypatch):
    x = photos()
    calls = []
    real = canny._canny_opencv
    monkeypatch.setattr(canny, "_canny_opencv", lambda *a: calls.append(1) or real(*a))
    auto = canny_edges(x)
    assert calls == [1]
    monkeypatch.setattr(canny, "_opencv", lambda: None)  # OpenCV not installed
    assert torch.equal(canny_edges(x), auto) and calls == [1]
    with pytest.raises(ValueError, match="opencv-python-headless"):
        canny_edges(x, backend="opencv")
    with pytest.raises(ValueError, match="backend"):
        canny_edges(x, backend="cuda")


@pytest.mark.parametrize("layout", ["bhwc_view", "bchw", "float64", "float16", "out_of_range", "grey"])
def test_backends_agree_on_every_input_form(layout):
    """Both backends quantise 255 x alike (float32, half to even, saturated) for any layout and dtype."""
    g = torch.Generator().manual_seed(0)
    x = photos()
    if layout == "bhwc_view":  # ComfyUI's IMAGE seen as BCHW through movedim: no copy on the OpenCV path
        x = x.permute(0, 2, 3, 1).contiguous().movedim(-1, 1)
    elif layout == "float64":
        x = x.double() + torch.rand(x.shape, generator=g, dtype=torch.float64) / 255
    elif layout == "float16":
        x = x.half()
    elif layout == "out_of_range":  # generated images overshoot [0, 1] a little; exact halves included
        x = x * 1.3 - 0.15
        x[:, :, ::7] = (torch.randint(0, 255, x[:, :, ::7].shape, generator=g) + 0.5) / 255
    elif layout == "grey":
        x = x[:, :1]
    cv, port = canny_edges(x, 60, 140, backend="opencv"), canny_edges(x, 60, 140, backend="tensor")
    assert cv.dtype == torch.bool and cv.shape == (x.shape[0], *x.shape[2:])
    assert cv.sum() > 100
    assert torch.equal(cv, port)


def test_extract_on_cpu_is_opencv_on_the_rounded_image():
    x = photos()
    u8 = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    out = get_extractor("canny", low_threshold=100, high_threshold=200).extract(x)
    for i in range(x.shape[0]):
        assert np.array_equal(out[i, 0].numpy() > 0.5, cv2.Canny(u8[i], 100, 200) > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("benchmark", [False, True])
def test_port_on_cuda_equals_opencv(benchmark):
    """On the GPU the port runs: bit-exact against cv2.Canny, whichever convolution cuDNN picks."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        rng = np.random.default_rng(1)
        imgs = [cv2.GaussianBlur(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8), (0, 0), 1.5) for _ in range(4)]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255)
        x = torch.cat([x, torch.nn.functional.interpolate(photos(3, 97), size=(97, 131))])
        for low, high in ((100, 200), (20, 60)):
            out = canny_edges(x.cuda(), low, high)
            assert out.is_cuda
            assert torch.equal(out.cpu(), canny_edges(x, low, high, backend="opencv"))
    finally:
        torch.backends.cudnn.benchmark = old
