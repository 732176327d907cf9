"""Training data: captioned image folders, and a deterministic order of batches.

A folder holds images with captions either as a `.txt` beside each image or as a diffusers
imagefolder `metadata.jsonl` (one JSON object per line with `file_name` and `text`).
Images are resized (shorter side) and center-cropped to the training resolution and come
out as float CHW in [0, 1]. Conditions are not stored: the trainer extracts them on the
training device from these images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError)


@dataclass
class FolderStats:
    """What was found while scanning a folder (logged by the trainer)."""

    images: int = 0
    skipped_unreadable: list[str] = field(default_factory=list)
    skipped_uncaptioned: list[str] = field(default_factory=list)
    #: kept, but trained as if the prompt were empty: usually a captioning step that failed
    empty_captions: list[str] = field(default_factory=list)


def _read_metadata_jsonl(path: Path) -> dict[str, str]:
    captions = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({exc})") from exc
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise ValueError(f"{path}:{lineno}: expected an object with 'file_name' and 'text'")
        captions[str(row["file_name"]).replace("\\", "/")] = str(row["text"])
    return captions


def load_image(path: Path, resolution: int) -> Tensor:
    """RGB image resized (shorter side) and center-cropped to `resolution`: (3, R, R) float in [0, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class CaptionedImageFolder(torch.utils.data.Dataset):
    """Images + captions from `root`; items are `{"image": (3, R, R) in [0, 1], "caption": str}`.

    Unreadable images are skipped and counted (`stats`), never a crash; empty captions are kept,
    counted and warned about; an empty folder or one without any caption is a ValueError naming
    the folder.
    """

    def __init__(self, root: str | Path, resolution: int = 512):
        self.root = Path(root)
        self.resolution = int(resolution)
        if not self.root.is_dir():
            raise ValueError(f"--data: {str(self.root)!r} is not a folder of images (nor a .txt prompt list)")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"--data: no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(self.root)!r}")
        meta = self.root / "metadata.jsonl"
        jsonl = _read_metadata_jsonl(meta) if meta.is_file() else {}
        self.stats = FolderStats()
        self.items: list[tuple[Path, str]] = []
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            txt = path.with_suffix(".txt")
            if rel in jsonl:
                caption = jsonl[rel]
            elif txt.is_file():
                caption = txt.read_text(encoding="utf-8").strip()
            else:
                self.stats.skipped_uncaptioned.append(rel)
                continue
            if not self._readable(path):
                self.stats.skipped_unreadable.append(rel)
                continue
            if not caption.strip():
                self.stats.empty_captions.append(rel)
            self.items.append((path, caption))
        self.stats.images = len(self.items)
        if not self.items:
            if len(self.stats.skipped_uncaptioned) == len(files):
                raise ValueError(f"--data: {str(self.root)!r} has {len(files)} images but no captions; expected a "
                                 ".txt beside each image or a metadata.jsonl with file_name/text")
            raise ValueError(f"--data: no readable captioned image in {str(self.root)!r} "
                             f"({len(self.stats.skipped_unreadable)} unreadable)")
        if self.stats.skipped_unreadable or self.stats.skipped_uncaptioned:
            log.warning("%s: skipped %d unreadable and %d uncaptioned images", self.root,
                        len(self.stats.skipped_unreadable), len(self.stats.skipped_uncaptioned))
        if self.stats.empty_captions:
            shown = ", ".join(self.stats.empty_captions[:3]) + (", ..." if len(self.stats.empty_captions) > 3 else "")
            log.warning("%s: %d of %d images have an empty caption (%s); they train as if the prompt were empty",
                        self.root, len(self.stats.empty_captions), len(self.items), shown)

    @staticmethod
    def _readable(path: Path) -> bool:
        try:
            with Image.open(path) as im:
                im.verify()
            return True
        except _BAD_IMAGE_ERRORS:
            return False

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        return self.items[index % len(self.items)][1]

    def __getitem__(self, index: int) -> dict:
        # A file that passed verify() can still fail to decode (truncated data); fall back to the
        # next item deterministically so a run never dies on one bad file.
        for k in range(len(self.items)):
            path, caption = self.items[(index + k) % len(self.items)]
            try:
                return {"image": load_image(path, self.resolution), "caption": caption}
            except _BAD_IMAGE_ERRORS:
                if path.name not in self.stats.skipped_unreadable:
                    self.stats.skipped_unreadable.append(path.name)
                    log.warning("unreadable image skipped: %s", path)
        raise ValueError(f"--data: no image in {str(self.root)!r} could be decoded")


class BatchOrder:
    """Deterministic, resumable batch order: batch k of process r is a pure function of (seed, k, r).

    The stream of indices is a concatenation of per-epoch permutations drawn from `seed` and
    the epoch number, cut into consecutive global batches shared out across processes. No
    iterator state has to be checkpointed: resuming at step k gives the same batches.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError("BatchOrder: the dataset is empty")
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, batch: int) -> list[int]:
        """Dataset indices of micro-batch number `batch` (counted over all updates) on this process."""
        start = (batch * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]
