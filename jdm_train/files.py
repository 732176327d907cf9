"""Files written whole or not at all, and sample images as one PNG grid.

`atomic_write` is the one way this project replaces a file: a reader (ComfyUI, a resumed run, a
viewer) sees the old file or the complete new one, and a kill or an error leaves no part behind.
`model_io` builds its weight-file writes on the same temporaries (`new_temp`, `remove_temp`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor


def new_temp(path: Path, folder: bool = False) -> Path:
    """A new file (or folder) ``.<name>.<random>.tmp`` beside ``path``: same file system, so the rename is atomic.

    A new file gets the mode a plain ``open()`` gives (0666 less the umask)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            if folder:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: could not create a temporary file for {path.name}")


def remove_temp(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    try:  # makes a rename itself durable; not possible on every platform
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` whole or not at all: yields a new empty temporary file beside it to write to.

    On leaving the block normally the temporary file is fsynced, given back the mode a plain
    ``open()`` gives (0666 less the umask; some writers, as safetensors, set 0600) and renamed onto
    ``path`` (``os.replace``). On an exception it is removed and ``path`` is left as it was. The
    parent folder is created. Writers that pick a format from the suffix need it named::

        with atomic_write(out) as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_temp(tmp)
        raise
    fsync_dir(path.parent)


def save_image_grid(path: str | os.PathLike, images: Tensor, ncol: int, gap: int = 0, scale: int = 1) -> Path:
    """Images (B, 3, H, W) in [0, 1] as one PNG, row by row with ``ncol`` per row, written atomically.

    ``gap`` white pixels after every image (right and below); ``scale`` enlarges the whole grid
    by pixel repetition (nearest neighbour), for small images."""
    import numpy as np
    from PIL import Image

    if images.ndim != 4 or images.shape[1] != 3 or ncol < 1:
        raise ValueError(f"save_image_grid: images (B, 3, H, W) and ncol >= 1 expected, got {tuple(images.shape)}, {ncol}")
    b, _, h, w = images.shape
    nrow = -(-b // ncol)
    grid = torch.ones(3, nrow * (h + gap), ncol * (w + gap))
    for i, im in enumerate(images.detach().float().cpu()):
        r, c = divmod(i, ncol)
        grid[:, r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = im
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
