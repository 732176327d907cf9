"""Finding and caching annotator weights where ComfyUI users keep them.

Search order of the trainer (`find_annotator`): an explicit path; `models_dir`; every ComfyUI
root's `models/annotators/` (and its `extra_model_paths.yaml` entries, via `model_io`);
comfyui_controlnet_aux's `custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators/`;
`$AUX_ANNOTATOR_CKPTS_PATH` (and its `lllyasviel/Annotators/`); `./models/annotators/` of the
working directory.

Names typed into a ComfyUI node are never paths: `list_annotators` offers what the annotator
folders hold and `resolve_node_annotator` finds a name only inside them, so a node reads no
other file on the server, and its refusal does not depend on whether an outside file exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterable, Sequence, TypeVar

import torch

from ..model_io import comfyui_roots, model_search_dirs

T = TypeVar("T")
_CACHE: dict[tuple, object] = {}


class MissingWeightsError(FileNotFoundError):
    """Annotator weights were not found; the message lists where we looked and what to get."""


@dataclass(frozen=True)
class AnnotatorFiles:
    """The annotator weights an extractor reads: the parameter naming them, the accepted names
    (the first is the default and stands for all of them), a file or a model folder, and what to
    tell a user who lacks them."""

    param: str
    names: tuple[str, ...]
    is_dir: bool
    what: str
    how_to_get: str
    #: with `is_dir`: single weight files, by these file names, also accepted in place of a model folder
    files: tuple[str, ...] = ()

    def candidates(self, name: str) -> list[str]:
        return list(self.names + self.files) if name == self.names[0] else [name]

    def accepts(self, path: Path) -> bool:
        """Whether `path` is one of these: a model folder (`is_dir`) or a weight file (named in `files`
        when `is_dir`)."""
        if path.is_file():
            return not self.is_dir or path.name in self.files
        return self.is_dir and path.is_dir()


#: Suffixes of annotator weight files offered by `list_annotators`.
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def controlnet_aux_dirs(custom_nodes_dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """comfyui_controlnet_aux's weight folders: under each custom_nodes folder, and `$AUX_ANNOTATOR_CKPTS_PATH`."""
    dirs = [Path(d) / "comfyui_controlnet_aux" / "ckpts" / "lllyasviel" / "Annotators" for d in custom_nodes_dirs]
    aux = os.environ.get("AUX_ANNOTATOR_CKPTS_PATH")
    if aux:
        dirs += [Path(aux).expanduser() / "lllyasviel" / "Annotators", Path(aux).expanduser()]
    return dirs


def annotator_dirs(comfyui_root: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for annotator weights, in order."""
    dirs: list[Path] = [Path(models_dir).expanduser()] if models_dir else []
    dirs += model_search_dirs("annotators", comfyui_root)
    dirs += controlnet_aux_dirs(root / "custom_nodes" for root in comfyui_roots(comfyui_root))
    dirs.append(Path.cwd() / "models" / "annotators")
    return list(dict.fromkeys(dirs))


def list_annotators(files: AnnotatorFiles, dirs: Sequence[str | os.PathLike], max_depth: int = 4) -> list[str]:
    """What a node offers for `files`: the default name first, then the names ('/'-separated,
    relative to one of `dirs`) of the weight files, or model folders (holding a config.json) and
    the weight files named in `files.files`, found there. Files inside model folders are not
    offered as weight files."""
    found: set[str] = set()
    for d in dirs:
        base = Path(d)
        if not base.is_dir():
            continue
        for here, subdirs, names in os.walk(base, followlinks=True):
            rel = Path(here).relative_to(base)
            if "config.json" in names and rel.parts:
                if files.is_dir:
                    found.add(rel.as_posix())
                subdirs.clear()
                continue
            subdirs[:] = [s for s in subdirs if not s.startswith(".")] if len(rel.parts) < max_depth else []
            if not files.is_dir:
                found.update((rel / n).as_posix() for n in names if n.lower().endswith(WEIGHT_SUFFIXES))
            else:
                found.update((rel / n).as_posix() for n in names if n in files.files)
    return [files.names[0]] + sorted(found - {files.names[0]})


def _plain_name(name: str) -> bool:
    """A relative name without '..', '~' or a drive: it cannot leave the folder it is joined to."""
    posix, windows = PurePosixPath(name.replace("\\", "/")), PureWindowsPath(name)
    return bool(name.strip()) and not (posix.anchor or windows.anchor or windows.drive or ".." in posix.parts
                                       or name.startswith("~") or "\0" in name)


def resolve_node_annotator(files: AnnotatorFiles, name: str, dirs: Sequence[str | os.PathLike]) -> Path:
    """The annotator file (or folder) a node named, found only inside `dirs`.

    `name` is a name relative to one of `dirs` (as `list_annotators` offers), never a path:
    absolute paths, '..' and '~' are refused before anything is looked up, with the same
    message whether or not such a file exists. A name not found there raises
    MissingWeightsError listing the folders and what to download."""
    folders = "\n  ".join(str(d) for d in dirs)
    if not isinstance(name, str) or not _plain_name(name):
        raise ValueError(f"{files.param}: {name!r} is not a name in the annotator folders; pick one of the files "
                         f"offered (found in:\n  {folders})")
    for d in dirs:
        base = Path(os.path.normpath(os.path.abspath(d)))
        for n in files.candidates(name):
            cand = Path(os.path.normpath(base / n))
            if base in cand.parents and files.accepts(cand):
                return cand
    raise MissingWeightsError(f"{files.param}: {files.what} {name!r} not found. Looked in:\n  {folders}\n"
                              f"{files.how_to_get}")


def find_annotator(
    names: Sequence[str],
    *,
    is_dir: bool,
    what: str,
    how_to_get: str,
    comfyui_root: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
    or_file: bool = False,
) -> Path:
    """First existing `names[i]` (a file, or with `is_dir` a folder, or with `or_file` too a file)
    in `annotator_dirs`.

    A name that is itself an existing path (absolute or relative) wins. Raises
    MissingWeightsError naming every folder searched and the file to download.
    """

    def exists(p: Path) -> bool:
        return (p.is_dir() or (or_file and p.is_file())) if is_dir else p.is_file()

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
