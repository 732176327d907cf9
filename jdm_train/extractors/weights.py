"""Finding and caching annotator weights where ComfyUI users keep them.

Search order: an explicit path; `models_dir`; every ComfyUI root's `models/annotators/`
(and its `extra_model_paths.yaml` entries, via `model_io`); comfyui_controlnet_aux's
`custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators/`; `$AUX_ANNOTATOR_CKPTS_PATH`
(and its `lllyasviel/Annotators/`); `./models/annotators/` of the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from ..model_io import comfyui_roots, model_search_dirs

T = TypeVar("T")
_CACHE: dict[tuple, object] = {}


class MissingWeightsError(FileNotFoundError):
    """Annotator weights were not found; the message lists where we looked and what to get."""


def annotator_dirs(comfyui_root: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for annotator weights, in order."""
    dirs: list[Path] = [Path(models_dir).expanduser()] if models_dir else []
    dirs += model_search_dirs("annotators", comfyui_root)
    for root in comfyui_roots(comfyui_root):
        dirs.append(root / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts" / "lllyasviel" / "Annotators")
    aux = os.environ.get("AUX_ANNOTATOR_CKPTS_PATH")
    if aux:
        dirs += [Path(aux).expanduser() / "lllyasviel" / "Annotators", Path(aux).expanduser()]
    dirs.append(Path.cwd() / "models" / "annotators")
    return list(dict.fromkeys(dirs))


def find_annotator(
    names: Sequence[str],
    *,
    is_dir: bool,
    what: str,
    how_to_get: str,
    comfyui_root: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
) -> Path:
    """First existing `names[i]` (a file, or with `is_dir` a folder) in `annotator_dirs`.

    A name that is itself an existing path (absolute or relative) wins. Raises
    MissingWeightsError naming every folder searched and the file to download.
    """
    exists = Path.is_dir if is_dir else Path.is_file
    for name in names:
        p = Path(name).expanduser()
        if exists(p):
            return p.resolve()
    dirs = annotator_dirs(comfyui_root, models_dir)
    for d in dirs:
        for name in names:
            if exists(d / name):
                return (d / name).resolve()
    looked = "\n  ".join(str(d) for d in dirs)
    raise MissingWeightsError(
        f"{what} not found (tried {', '.join(repr(n) for n in names)}). Looked in:\n  {looked}\n{how_to_get}"
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a pickle (.pth/.pt/.ckpt) with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only refuses arbitrary objects: annotator .pth files are plain tensor dicts.
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def cached(key: tuple, build: Callable[[], T]) -> T:
    """Build once per key (path, device, dtype, ...); models are eval-mode and frozen."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]  # type: ignore[return-value]


def clear_cache() -> None:
    """Drop every cached annotator model (frees their memory)."""
    _CACHE.clear()
