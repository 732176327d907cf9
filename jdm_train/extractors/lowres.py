"""Low resolution: the paper's super-resolution control (8x nearest-neighbour downscale)."""

from __future__ import annotations

import torch
from kornia.geometry.transform import resize

from .base import Extractor, Param, check_images


def _small_size(images: torch.Tensor, factor: int) -> tuple[int, int]:
    h, w = images.shape[-2:]
    return max(1, h // factor), max(1, w // factor)


def lowres_nearest(images: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Nearest downscale by `factor` and nearest upscale back: (B, C, H, W) -> (B, C, H, W).

    `nearest` picks source index floor(i * H / h), as `cv2.INTER_NEAREST` does: for H
    divisible by `factor` each block shows its top-left pixel.
    """
    small = resize(images, _small_size(images, factor), interpolation="nearest", antialias=False)
    return resize(small, tuple(images.shape[-2:]), interpolation="nearest", antialias=False)


def lowres_area(images: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Differentiable face: area (block-mean) downscale, nearest upscale back."""
    small = resize(images, _small_size(images, factor), interpolation="area", antialias=False)
    return resize(small, tuple(images.shape[-2:]), interpolation="nearest", antialias=False)


class LowRes(Extractor):
    """An image seen through an `factor`x nearest-neighbour downscale, shown at full size."""

    name = "lowres"
    distance = "mse"
    independent_channels = True  # an RGB image: three observations per pixel
    PARAMS = (Param("factor", 8, 2, 64, 1, tooltip="downscale factor"),)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "lowres")
        with torch.no_grad():
            return lowres_nearest(x.clamp(0, 1), self.params["factor"])

    def soft(self, images: torch.Tensor) -> torch.Tensor:
        return lowres_area(check_images(images, "lowres"), self.params["factor"])
