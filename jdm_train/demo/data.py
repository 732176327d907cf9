"""The demo world: procedural captioned images of coloured shapes.

Every image is a pure function of its integer index: one or two shapes (circle, square,
triangle) of a named colour, varied size and position, on a plain named background, 64x64
RGB, with a caption that states exactly what is drawn, e.g.
"a red circle above a blue square on a grey background". Conditions (canny, low-res) come
from these images through `jdm_train.extractors`, as for real data.

Train and held-out images come from disjoint index ranges (`TRAIN_START`, `HELDOUT_START`),
so held-out conditions are never seen while training the teacher or the student.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from jdm_train.files import atomic_write

IMAGE_SIZE = 64
# Drawn at 4x and box-filtered down: anti-aliased edges without depending on PIL's resamplers.
_SUPERSAMPLE = 4

TRAIN_START = 0
HELDOUT_START = 1_000_000
# How many distinct images the shipped teacher was trained on (and the default train set size).
DEFAULT_TRAIN_SIZE = 20000

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "purple": (140, 55, 185),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "beige": (225, 205, 160),
}
RELATIONS = ("above", "below", "to the left of", "to the right of")


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    cx: float  # centre, pixels in [0, IMAGE_SIZE)
    cy: float
    size: float  # half-extent in pixels


@dataclass(frozen=True)
class Scene:
    """What image `index` shows; `caption` is derived from it, never stored separately."""

    index: int
    background: str
    shapes: tuple[Shape, ...]
    relation: str | None  # how shapes[0] relates to shapes[1]; None for one shape

    @property
    def caption(self) -> str:
        first = f"a {self.shapes[0].colour} {self.shapes[0].kind}"
        if self.relation is None:
            return f"{first} on a {self.background} background"
        second = f"a {self.shapes[1].colour} {self.shapes[1].kind}"
        return f"{first} {self.relation} {second} on a {self.background} background"


def scene(index: int) -> Scene:
    """The scene of image `index` (deterministic: a private RNG seeded by the index)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = random.Random(index * 7919 + 17)
    background = rng.choice(sorted(BACKGROUNDS))
    colours = [c for c in sorted(COLOURS) if c != background]
    if rng.random() < 0.5:
        size = rng.uniform(9.0, 18.0)
        cx, cy = (rng.uniform(size + 2, IMAGE_SIZE - size - 2) for _ in range(2))
        shape = Shape(rng.choice(SHAPES), rng.choice(colours), cx, cy, size)
        return Scene(index, background, (shape,), None)
    relation = rng.choice(RELATIONS)
    c0, c1 = rng.sample(colours, 2)
    k0, k1 = rng.choice(SHAPES), rng.choice(SHAPES)
    s0, s1 = rng.uniform(6.0, 11.0), rng.uniform(6.0, 11.0)
    # Shapes sit in opposite halves along the relation's axis, so the relation is unambiguous.
    half = IMAGE_SIZE / 2
    a0 = rng.uniform(s0 + 2, half - s0 - 1)
    a1 = rng.uniform(half + s1 + 1, IMAGE_SIZE - s1 - 2)
    b0 = rng.uniform(s0 + 2, IMAGE_SIZE - s0 - 2)
    b1 = rng.uniform(s1 + 2, IMAGE_SIZE - s1 - 2)
    if relation in ("below", "to the right of"):
        a0, a1 = IMAGE_SIZE - a0, IMAGE_SIZE - a1
    vertical = relation in ("above", "below")
    p0 = (b0, a0) if vertical else (a0, b0)
    p1 = (b1, a1) if vertical else (a1, b1)
    shapes = (Shape(k0, c0, *p0, s0), Shape(k1, c1, *p1, s1))
    return Scene(index, background, shapes, relation)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, scale: int) -> None:
    cx, cy, r = shape.cx * scale, shape.cy * scale, shape.size * scale
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape.kind == "square":
        h = r * 0.9  # equal area-ish with the circle, so size alone does not reveal the kind
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.8), (cx + r * 1.05, cy + r * 0.8)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPES}")


def render(sc: Scene) -> np.ndarray:
    """The image of a scene: uint8 array (IMAGE_SIZE, IMAGE_SIZE, 3)."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[sc.background])
    draw = ImageDraw.Draw(img)
    for shape in sc.shapes:
        _draw_shape(draw, shape, _SUPERSAMPLE)
    arr = np.asarray(img, dtype=np.float32).reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3)
    return np.round(arr.mean(axis=(1, 3))).astype(np.uint8)


def image_tensor(index: int) -> Tensor:
    """Image `index` as a float tensor (3, 64, 64) in [0, 1]."""
    return torch.from_numpy(render(scene(index))).permute(2, 0, 1).float().div(255.0)


def caption(index: int) -> str:
    return scene(index).caption


class ShapesDataset(Dataset):
    """Images `start .. start + length - 1` as dicts {"image": (3, R, R) in [0, 1], "caption": str, "index": int}.

    `split="train"` starts at TRAIN_START, `split="heldout"` at HELDOUT_START. Images are
    drawn at 64x64; another `resolution` R resizes them (bilinear, antialiased).
    """

    def __init__(self, length: int = DEFAULT_TRAIN_SIZE, split: str = "train", resolution: int = IMAGE_SIZE):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if length <= 0 or (split == "train" and length > HELDOUT_START - TRAIN_START):
            raise ValueError(f"length must be in 1..{HELDOUT_START - TRAIN_START}, got {length}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.start = TRAIN_START if split == "train" else HELDOUT_START
        self.length = length
        self.resolution = resolution

    def __len__(self) -> int:
        return self.length

    def caption(self, i: int) -> str:
        return caption(self.start + i % self.length)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        index = self.start + i
        image = image_tensor(index)
        if self.resolution != IMAGE_SIZE:
            size = (self.resolution, self.resolution)
            image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                                                    align_corners=False)[0]
        return {"image": image, "caption": caption(index), "index": index}


def batch(indices: list[int] | range) -> tuple[Tensor, list[str]]:
    """Images (B, 3, 64, 64) in [0, 1] and their captions."""
    images = torch.stack([image_tensor(i) for i in indices])
    return images, [caption(i) for i in indices]


def write_image_folder(root: str | os.PathLike, n: int, split: str = "train") -> Path:
    """Write `n` images as `root/NNNNNNN.png` with the caption in `root/NNNNNNN.txt` (a captioned image folder).

    Files already present with the same name are overwritten; other files are left alone.
    """
    ds = ShapesDataset(n, split)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        index = ds.start + i
        sc = scene(index)
        stem = root / f"{index:07d}"
        with atomic_write(stem.with_suffix(".png")) as tmp:
            Image.fromarray(render(sc)).save(tmp, format="PNG")
        stem.with_suffix(".txt").write_text(sc.caption + "\n", encoding="utf-8")
    return root
