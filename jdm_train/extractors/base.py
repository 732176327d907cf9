"""The condition-extractor interface shared by every control: parameters, distances, base class.

JDM (arXiv 2503.06652) needs each condition extractor `h` twice: exactly, to build
training pairs `c = h(x_data)` and to measure consistency `||h(x) - c||_1` (Sec. 4.1),
and differentiably, for the condition term `grad_{x_t} log p(c | x_t)` of Eq. 5 with
`log p(c | x_t) ~= -d(h_soft(decode(x_hat)), c) / tau`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Param:
    """One user parameter of an extractor, in a form a UI can turn into a widget.

    `default` fixes the type (bool, int, float or str). Numbers carry `min`, `max`,
    `step`; strings may carry `choices`.
    """

    name: str
    default: Any
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    tooltip: str = ""

    @property
    def kind(self) -> str:
        return {bool: "bool", int: "int", float: "float", str: "str"}[type(self.default)]

    def validate(self, value: Any, owner: str) -> Any:
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{owner}: {self.name} must be a bool, got {value!r}")
        elif kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{owner}: {self.name} must be a number, got {value!r}")
            if kind == "int":
                if int(value) != value:
                    raise ValueError(f"{owner}: {self.name} must be an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise ValueError(f"{owner}: {self.name}={value} is outside [{self.min}, {self.max}]")
        else:
            if not isinstance(value, str):
                raise ValueError(f"{owner}: {self.name} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{owner}: {self.name}={value!r}; expected one of {list(self.choices)}")
        return value


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs()


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square()


def _bce(logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # On logits: a confidently wrong pixel keeps its gradient where a saturated
    # probability would give none (and BCE on probabilities mis-differentiates there).
    return F.binary_cross_entropy_with_logits(logits, c, reduction="none")


def _balanced_bce(logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # HED's class-balanced cross-entropy (Xie & Tu 2015): edge and non-edge pixels weigh half each.
    # With plain BCE a sparse edge map (~3% of pixels) mostly says "no edges here", and the
    # condition term learns to erase edges instead of drawing the given ones. The weights average
    # 1 over the image, so the sum over pixels keeps the size of a plain BCE sum.
    positive = (c > 0.5).to(logits.dtype)
    share = positive.flatten(1).mean(1).clamp(1e-3, 1 - 1e-3).reshape((-1,) + (1,) * (c.ndim - 1))
    weight = torch.where(positive > 0, 1 - share, share)
    weight = weight / weight.flatten(1).mean(1).reshape(share.shape)
    return weight * F.binary_cross_entropy_with_logits(logits, c, reduction="none")


#: Per-pixel distances d(soft(x), c) -> (B, C, H, W); `log_likelihood` sums them over pixels.
#: "bce" and "balanced_bce" take the logits of `soft` (extractors with them implement `soft_logits`).
DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": _l1,
    "mse": _mse,
    "bce": _bce,
    "balanced_bce": _balanced_bce,
}
_ON_LOGITS = ("bce", "balanced_bce")


def check_images(images: torch.Tensor, owner: str) -> torch.Tensor:
    """Validate a BCHW float batch in [0, 1] and return it with 3 channels (grey is repeated)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{owner}: images must be a BCHW tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{owner}: images must be float in [0, 1], got dtype {images.dtype}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"{owner}: images must have 1 or 3 channels (RGB), got {images.shape[1]}")
    return images


def to_hint(single: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 3, H, W), the 3-channel layout of a ControlNet hint image."""
    return single.expand(-1, 3, -1, -1).contiguous()


class Extractor:
    """A condition extractor `h` with an exact face and a differentiable face.

    Subclasses set `name`, `PARAMS`, `distance` and implement `extract` and `soft`.
    Images are BCHW float RGB in [0, 1] on any device/dtype; outputs are 3-channel BCHW
    in [0, 1] on the same device and dtype.
    """

    name: ClassVar[str] = ""
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    #: key of DISTANCES used by `log_likelihood`
    distance: ClassVar[str] = "l1"
    #: whether the condition's 3 channels are independent observations (an RGB image) or one map
    #: repeated as a hint (edges, depth): `log_likelihood` sums over the former, counts the latter once
    independent_channels: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        known = {p.name: p for p in self.PARAMS}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"extractor {self.name!r}: unknown parameter(s) {unknown}; expected some of {sorted(known)}"
            )
        self.params: dict[str, Any] = {
            n: p.validate(params.get(n, p.default), f"extractor {self.name!r}") for n, p in known.items()
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Exact condition `c = h(x)`: (B, C, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def soft(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable face of `h`: (B, C, H, W) -> (B, 3, H, W), comparable with `extract`."""
        if self.distance in _ON_LOGITS:
            return torch.sigmoid(self.soft_logits(images))
        raise NotImplementedError

    def soft_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of `soft` (extractors whose distance is "bce"): (B, C, H, W) -> (B, 3, H, W)."""
        raise NotImplementedError(f"extractor {self.name!r} has no logits; its distance is {self.distance!r}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)

    def log_likelihood(self, images: torch.Tensor, cond: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        """`log p(c | x) = -sum_pixels d(soft(x), c) / tau` per image, (B,): the condition term of JDM Eq. 5.

        A log-likelihood of the whole condition under a per-pixel model, up to a constant: a *sum*
        over pixels (and over channels only where they are independent, `independent_channels`),
        with `tau` the per-pixel temperature. A sum, not a mean, keeps Eq. 5's weight 1 meaningful
        and the gradient per latent element the same at every resolution (docs/method.md).
        """
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        soft = self.soft_logits(images) if self.distance in _ON_LOGITS else self.soft(images)
        if cond.shape != soft.shape:
            raise ValueError(f"extractor {self.name!r}: cond has shape {tuple(cond.shape)}, expected {tuple(soft.shape)}")
        per_pixel = DISTANCES[self.distance](soft, cond.to(soft.dtype))
        if not self.independent_channels:
            per_pixel = per_pixel.mean(1)  # one map shown in 3 channels is one observation per pixel
        return -per_pixel.flatten(1).sum(1) / tau

    @torch.no_grad()
    def consistency(self, images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The paper's consistency metric `mean |h(x) - c|` per image, (B,) (JDM Sec. 4.1)."""
        out = self.extract(images)
        if cond.shape != out.shape:
            raise ValueError(f"extractor {self.name!r}: cond has shape {tuple(cond.shape)}, expected {tuple(out.shape)}")
        return (out - cond.to(out.dtype)).abs().flatten(1).mean(1)
