"""Condition extractors `h`, keyed by the `--control` name.

Each extractor has an exact face `extract(images) -> cond` (training pairs,
consistency, ComfyUI preprocessor nodes) and a differentiable face `soft(images)`
used by `log_likelihood` for the condition term of JDM Eq. 5: a log-likelihood of the whole
condition, the sum over pixels of a per-pixel distance divided by a per-pixel temperature tau.
Images are BCHW float RGB in [0, 1] on any device/dtype; conditions are 3-channel BCHW in [0, 1].

    h = get_extractor("canny", low_threshold=100, high_threshold=200)
    c = h.extract(x_data)                      # (B, 3, H, W)
    logp = h.log_likelihood(x, c, tau=4.0)     # (B,), a sum over pixels, differentiable in x
    err = h.consistency(x, c)                  # (B,), mean |h(x) - c|

A new control is one new entry in `EXTRACTORS`.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import DISTANCES, Extractor, Param
from .canny import Canny, canny_edges, hysteresis, soft_canny
from .depth import Depth, load_depth
from .hed import HED, HEDNetwork, load_hed
from .lowres import LowRes, lowres_area, lowres_nearest
from .weights import MissingWeightsError, annotator_dirs, clear_cache

EXTRACTORS: dict[str, type[Extractor]] = {
    "canny": Canny,
    "hed": HED,
    "depth": Depth,
    "lowres": LowRes,
}


def _lookup(name: str) -> type[Extractor]:
    try:
        return EXTRACTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown control {name!r}; expected one of: {', '.join(EXTRACTORS)}") from None


def extractor_names() -> list[str]:
    """The valid `--control` names."""
    return list(EXTRACTORS)


def extractor_params(name: str) -> tuple[Param, ...]:
    """The user parameters of extractor `name` (name, default, min, max, step, ...)."""
    return _lookup(name).PARAMS


def get_extractor(name: str, **params: Any) -> Extractor:
    """Build extractor `name` with `params`; unknown names or parameters raise ValueError."""
    return _lookup(name)(**params)


def run_extractor(name: str, images: torch.Tensor, **params: Any) -> torch.Tensor:
    """`get_extractor(name, **params).extract(images)`: (B, C, H, W) -> (B, 3, H, W) in [0, 1]."""
    return get_extractor(name, **params).extract(images)


__all__ = [
    "DISTANCES",
    "EXTRACTORS",
    "Canny",
    "Depth",
    "Extractor",
    "HED",
    "HEDNetwork",
    "LowRes",
    "MissingWeightsError",
    "Param",
    "annotator_dirs",
    "clear_cache",
    "load_depth",
    "load_hed",
    "canny_edges",
    "extractor_names",
    "extractor_params",
    "get_extractor",
    "hysteresis",
    "lowres_area",
    "lowres_nearest",
    "run_extractor",
    "soft_canny",
]
