"""Captioned image folders and the deterministic batch order."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from jdm_train.data import BatchOrder, CaptionedImageFolder


def _image(path, w=40, h=30, value=0):
    a = np.full((h, w, 3), value, np.uint8)
    a[:, : w // 2] = 255 - value
    Image.fromarray(a).save(path)


def test_txt_captions_resize_and_crop(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png", w=40 + 10 * i)
        (tmp_path / f"{i}.txt").write_text(f" caption {i}\n")
    ds = CaptionedImageFolder(tmp_path, resolution=16)
    assert len(ds) == 3
    item = ds[1]
    assert item["caption"] == "caption 1"
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    # center crop of a left-dark/right-bright image keeps both halves
    assert float(item["image"][:, :, 0].mean()) > 0.9 and float(item["image"][:, :, -1].mean()) < 0.1


def test_metadata_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "a.jpg")
    _image(tmp_path / "b.png")
    rows = [{"file_name": "sub/a.jpg", "text": "first"}, {"file_name": "b.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = CaptionedImageFolder(tmp_path, resolution=8)
    assert sorted(ds[i]["caption"] for i in range(len(ds))) == ["first", "second"]


def test_unreadable_and_uncaptioned_images_are_skipped_and_counted(tmp_path):
    _image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("ok")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("x")
    _image(tmp_path / "nocaption.png")
    ds = CaptionedImageFolder(tmp_path, resolution=8)
    assert len(ds) == 1 and ds[0]["caption"] == "ok"
    assert ds.stats.skipped_unreadable == ["broken.png"]
    assert ds.stats.skipped_uncaptioned == ["nocaption.png"]


def test_empty_and_captionless_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        CaptionedImageFolder(tmp_path)
    _image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no captions"):
        CaptionedImageFolder(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        CaptionedImageFolder(tmp_path / "missing")


def test_batch_order_is_deterministic_covers_epochs_and_shards():
    order = BatchOrder(10, batch_size=2, seed=3)
    first_epoch = sum((order.indices(b) for b in range(5)), [])
    assert sorted(first_epoch) == list(range(10))
    assert BatchOrder(10, 2, seed=3).indices(7) == order.indices(7)
    assert sum((order.indices(b) for b in range(5, 10)), []) != first_epoch  # a new permutation per epoch
    r0, r1 = BatchOrder(8, 2, seed=0, rank=0, world_size=2), BatchOrder(8, 2, seed=0, rank=1, world_size=2)
    both = sum((r0.indices(b) + r1.indices(b) for b in range(2)), [])
    assert sorted(both) == list(range(8))


def test_empty_captions_are_kept_counted_and_warned_about(tmp_path, caplog):
    for name, caption in [("a", "a cat"), ("b", ""), ("c", "  \n"), ("d", "a dog")]:
        _image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "e.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/e.png", "text": ""}))
    with caplog.at_level("WARNING", logger="jdm_train.data"):
        ds = CaptionedImageFolder(tmp_path, resolution=8)
    assert len(ds) == 5
    assert ds.stats.empty_captions == ["b.png", "c.png", "sub/e.png"]
    assert "3 of 5 images have an empty caption (b.png, c.png, sub/e.png)" in caplog.text
