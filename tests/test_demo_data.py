"""The demo world's procedural data: determinism, captions that say what is drawn, splits, folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from jdm_train.demo import data
from jdm_train.demo.features import parse_caption


def test_same_index_same_image_and_caption():
    a, b = data.image_tensor(123), data.image_tensor(123)
    assert torch.equal(a, b)
    assert data.caption(123) == data.caption(123)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.equal(a, data.image_tensor(124))


def _pixel_colour(img: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    return tuple(int(v) for v in img[int(round(y)), int(round(x))])


@pytest.mark.parametrize("index", list(range(40)) + [data.HELDOUT_START + i for i in range(10)])
def test_caption_describes_the_pixels(index):
    """Independent check from the pixels: corners show the background, shape centres the shape colour,
    and the stated relation matches where the shapes are."""
    sc = data.scene(index)
    img = data.render(sc)
    bg = data.BACKGROUNDS[sc.background]
    for x, y in ((0, 0), (63, 0), (0, 63), (63, 63)):
        if not any(abs(s.cx - x) < s.size + 1 and abs(s.cy - y) < s.size + 1 for s in sc.shapes):
            assert _pixel_colour(img, x, y) == bg
    # The centroid of a triangle is inside it; the drawn centre (cx, cy) is too.
    for s in sc.shapes:
        assert _pixel_colour(img, s.cx, s.cy) == data.COLOURS[s.colour], (index, s)
    bg_name, objs, rel = parse_caption(sc.caption)
    assert bg_name == sc.background and objs == [(s.colour, s.kind) for s in sc.shapes]
    if rel is not None:
        a, b = sc.shapes
        expected = {"above": a.cy < b.cy, "below": a.cy > b.cy,
                    "to the left of": a.cx < b.cx, "to the right of": a.cx > b.cx}[rel]
        assert expected, (index, sc)


def test_shape_kinds_differ_in_pixels():
    """A circle, square and triangle of the same size and place cover different pixel sets."""
    masks = []
    for kind in data.SHAPES:
        sc = data.Scene(0, "black", (data.Shape(kind, "white", 32.0, 32.0, 14.0),), None)
        masks.append(data.render(sc)[..., 0] > 128)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (masks[i] != masks[j]).sum() > 40


def test_shape_colour_never_equals_background_and_shapes_do_not_overlap():
    for index in range(500):
        sc = data.scene(index)
        assert all(s.colour != sc.background for s in sc.shapes)
        if len(sc.shapes) == 2:
            a, b = sc.shapes
            assert abs(a.cx - b.cx) > a.size + b.size or abs(a.cy - b.cy) > a.size + b.size


def test_splits_are_disjoint_and_valid():
    train, held = data.ShapesDataset(5), data.ShapesDataset(5, split="heldout")
    assert [train[i]["index"] for i in range(5)] == list(range(5))
    assert held[0]["index"] == data.HELDOUT_START
    assert len(data.ShapesDataset()) == data.DEFAULT_TRAIN_SIZE
    with pytest.raises(ValueError, match="split"):
        data.ShapesDataset(5, split="test")
    with pytest.raises(IndexError):
        train[5]
    with pytest.raises(ValueError, match="index"):
        data.scene(-1)


def test_dataset_resolution():
    item = data.ShapesDataset(2, resolution=32)[1]
    assert item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["image"].mean((1, 2)), data.image_tensor(1).mean((1, 2)), atol=0.02)


def test_write_image_folder_round_trips(tmp_path):
    root = data.write_image_folder(tmp_path / "shapes", 3, split="heldout")
    pngs = sorted(root.glob("*.png"))
    assert [p.stem for p in pngs] == [f"{data.HELDOUT_START + i:07d}" for i in range(3)]
    for i, p in enumerate(pngs):
        img = np.asarray(Image.open(p).convert("RGB"))
        assert np.array_equal(img, data.render(data.scene(data.HELDOUT_START + i)))
        assert p.with_suffix(".txt").read_text().strip() == data.caption(data.HELDOUT_START + i)
    assert not list(root.glob("*.tmp"))
