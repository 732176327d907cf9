"""jdm_train.files: atomic replacement of a file, and the PNG grid of sample images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from jdm_train.files import atomic_write, save_image_grid




def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "sub" / "a.json"
    with atomic_write(out) as tmp:
        assert tmp.parent == out.parent and not out.exists()
        tmp.write_text("old")
    with atomic_write(out) as tmp:
        tmp.write_text("new")
        assert out.read_text() == "old"  # a reader sees the old file until the block ends
    assert out.read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError, match="half"):
        with atomic_write(out) as tmp:
            tmp.write_text("ne")
            raise RuntimeError("half written")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_the_file_gets_the_umask_mode_of_a_plain_open_even_if_the_writer_changed_it(tmp_path, umask, mask, file_mode):
    umask(mask)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    out = tmp_path / "w.bin"
    with atomic_write(out) as tmp:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)  # what safetensors does to its files
    assert file_mode(out) == file_mode(plain) == 0o666 & ~mask


def test_image_grid_places_images_row_by_row_with_gaps_and_scale(tmp_path):
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    images = colours[:, :, None, None].expand(3, 3, 4, 5)  # 3 single-colour 4x5 images
    path = save_image_grid(tmp_path / "g.png", images, ncol=2, gap=1, scale=2)
    a = np.asarray(Image.open(path).convert("RGB"))
    assert a.shape == (2 * 2 * (4 + 1), 2 * 2 * (5 + 1), 3)
    assert (a[0, 0] == [255, 0, 0]).all() and (a[0, 12] == [0, 255, 0]).all() and (a[10, 0] == [0, 0, 255]).all()
    assert (a[8, 0] == 255).all() and (a[0, 10] == 255).all()  # the gaps are white
    assert (a[10, 12] == 255).all()  # the missing fourth image too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


def test_image_grid_without_gap_is_the_images_side_by_side(tmp_path):
    images = torch.rand(4, 3, 3, 2, generator=torch.Generator().manual_seed(0))
    a = np.asarray(Image.open(save_image_grid(tmp_path / "g.png", images, ncol=2)))
    expected = torch.cat([torch.cat([images[0], images[1]], 2), torch.cat([images[2], images[3]], 2)], 1)
    np.testing.assert_array_equal(a, (expected.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        save_image_grid(tmp_path / "bad.png", images[:, :1], ncol=2)
