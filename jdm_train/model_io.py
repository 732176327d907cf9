"""The model files ComfyUI and the trainer share: finding them, reading SD1.x checkpoints, writing exports.

(Not every weight file: annotator weights are read by `extractors.weights`, the trainer's resumable
state is written with accelerate by `train`, the demo scripts keep caches of their own.)

* `resolve_model` finds a name the way ComfyUI does (``<root>/models/<folder>/`` and
  ``extra_model_paths.yaml``); `resolve_checkpoint` also knows ``demo``, the shipped demo teacher.
* `load_sd1_checkpoint` turns an SD1.x single-file checkpoint (original LDM keys) into
  diffusers / transformers modules offline; the architecture is read from the weights
  (`ldm_convert.infer_unet_config` and friends) and diffusers' own LDM->diffusers
  converters do the key mapping.
* `save_unet_ldm`, `save_controlnet_ldm`, `save_sd1_checkpoint` write the reverse
  (diffusers->LDM, `ldm_convert`) layouts that ComfyUI's UNETLoader, ControlNetLoader and
  CheckpointLoaderSimple read, as safetensors with ``jdm.*`` metadata, atomically, with the
  umask's file mode; a full disk is a `NoSpaceError` naming the folder and the size needed.
* `ExportSet` writes several exports (student, ControlNet, LoRA) as one set: a reader sees the
  old set or the new one, `recover_export_set` finishes or cleans one a kill interrupted, and
  `export_set_mismatch` tells a mixed set by the shared ``jdm.export_id``.

Pickled files (.ckpt/.pt/.pth/.bin) are refused unless ``allow_pickle=True``, and then
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import glob
import gzip
import importlib.util
import json
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_write, fsync_dir, new_temp, remove_temp
from .ldm_convert import (CLDM_HINT_CHANNELS, CLIP_PREFIX, CONTROL_PREFIX, SD1_ATTENTION_HEADS, UNET_PREFIX,
                          VAE_PREFIX, clip_diffusers_to_ldm, context_dim, controlnet_diffusers_to_ldm,
                          convert_clip_keys, infer_clip_config, infer_controlnet_config, infer_unet_config,
                          infer_vae_config, strip_prefix, taesd_from_diffusers, taesd_to_diffusers,
                          unet_diffusers_to_ldm, vae_diffusers_to_ldm)
from .ldm_convert import clip_heads_for  # noqa: F401  (fixtures.py reaches it through model_io)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
METADATA_KEYS = ("jdm.kind", "jdm.control", "jdm.timestep", "jdm.base", "jdm.config")

# ComfyUI folder names -> subfolders of <root>/models and keys of extra_model_paths.yaml.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "unet": ("unet", "diffusion_models"),
    "diffusion_models": ("unet", "diffusion_models"),
    "controlnet": ("controlnet", "t2i_adapter"),
    "vae": ("vae",),
    "vae_approx": ("vae_approx",),
    "loras": ("loras",),
    "annotators": ("annotators",),
}


@dataclass
class SD1Pipeline:
    """The parts of an SD1.x checkpoint, as diffusers / transformers modules."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL (AutoencoderTiny for a TAESD-VAE checkpoint)
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: Any  # diffusers.DDPMScheduler
    path: Path


# --------------------------------------------------------------------------- resolving


def comfyui_roots(comfyui_root: str | os.PathLike | None = None) -> list[Path]:
    """ComfyUI roots in search order: argument, ``COMFYUI_PATH``, the ComfyUI holding this pack."""
    roots: list[Path] = []
    for cand in (comfyui_root, os.environ.get("COMFYUI_PATH") or None, _enclosing_comfyui()):
        if cand is not None:
            p = Path(cand).expanduser().resolve()
            if p not in roots:
                roots.append(p)
    return roots


def _enclosing_comfyui() -> Path | None:
    # this file is <root>/custom_nodes/<pack>/jdm_train/model_io.py when installed as a
    # pack; the unresolved path first, since packs are often symlinked into custom_nodes
    for here in (Path(os.path.abspath(__file__)), Path(__file__).resolve()):
        if len(here.parents) > 3 and here.parents[2].name == "custom_nodes":
            return here.parents[3]
    return None


def _extra_model_dirs(root: Path, keys: tuple[str, ...]) -> list[Path]:
    """Folders for ``keys`` listed in ``<root>/extra_model_paths.yaml``.

    Mirrors ComfyUI's ``utils/extra_config.py``: each section may have ``base_path``
    (relative to the yaml's folder, ``~`` and ``$VARS`` expanded) and folder entries that
    are newline-separated lists; without ``base_path`` relative entries are taken from
    the yaml's folder.
    """
    yaml_path = root / "extra_model_paths.yaml"
    if not yaml_path.is_file():
        return []
    import yaml

    with open(yaml_path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    out: list[Path] = []
    for conf in config.values():
        if not isinstance(conf, dict):
            continue
        base = conf.get("base_path")
        if base is not None:
            base = os.path.expandvars(os.path.expanduser(str(base)))
            if not os.path.isabs(base):
                base = os.path.join(root, base)
        for key, value in conf.items():
            if key in ("base_path", "is_default") or key not in keys or value is None:
                continue
            for entry in str(value).split("\n"):
                entry = entry.strip()
                if not entry:
                    continue
                full = os.path.join(base, entry) if base else (
                    entry if os.path.isabs(entry) else os.path.join(root, entry))
                out.append(Path(os.path.normpath(full)))
    return out


def model_search_dirs(folder: str, comfyui_root: str | os.PathLike | None = None) -> list[Path]:
    """All directories searched for ``folder`` (see `resolve_model`), in order."""
    if folder not in MODEL_FOLDERS:
        raise ValueError(f"unknown model folder {folder!r}; expected one of {sorted(MODEL_FOLDERS)}")
    keys = MODEL_FOLDERS[folder]
    dirs: list[Path] = []
    for root in comfyui_roots(comfyui_root):
        dirs += [root / "models" / k for k in keys]
        dirs += _extra_model_dirs(root, keys)
    return list(dict.fromkeys(dirs))


def _inside(path: Path, dirs: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in dirs)


def resolve_model(
    name: str | os.PathLike,
    folder: str,
    comfyui_root: str | os.PathLike | None = None,
    from_node: bool = False,
) -> Path:
    """Find a model file by ComfyUI name or by path.

    ``name`` is looked up in ``<root>/models/<folder>/`` (``unet`` also searches
    ``diffusion_models``) and in the ``extra_model_paths.yaml`` entries of each root,
    where the roots are, in order: ``comfyui_root``, ``$COMFYUI_PATH``, the ComfyUI that
    contains this pack. Otherwise a plain path (absolute or relative to the working
    directory) is accepted. With ``from_node=True`` (names typed into a node) ``..`` and
    paths outside the model folders are refused. Raises ValueError listing where it looked.
    """
    dirs = model_search_dirs(folder, comfyui_root)
    raw = str(name)
    if not raw.strip():
        raise ValueError(f"empty model name for folder {folder!r}")
    p = Path(raw).expanduser()
    if from_node and ".." in Path(raw.replace("\\", "/")).parts:
        raise ValueError(f"model name {raw!r} contains '..'; names from a node must stay inside the model folders")
    # containment is judged on normalised, unresolved paths: model files are often
    # symlinks to a shared disk, and that must not count as leaving the folder
    if p.is_absolute():
        ap = Path(os.path.normpath(p))
        if from_node and not (_inside(ap, [Path(os.path.normpath(d.absolute())) for d in dirs])
                              or _inside(ap.resolve(), [d.resolve() for d in dirs])):
            raise ValueError(
                f"absolute path {raw!r} is outside the {folder} model folders "
                f"{[str(d) for d in dirs]}; names from a node must stay inside them")
        if ap.is_file():
            return ap
        raise ValueError(f"model file {raw!r} does not exist")
    for d in dirs:
        base = Path(os.path.normpath(d.absolute()))
        cand = Path(os.path.normpath(base / p))
        if _inside(cand, [base]) and cand.is_file():
            return cand
    if not from_node and p.is_file():
        return Path(os.path.normpath(p.absolute()))
    looked = [str(d) for d in dirs] + ([] if from_node else [f"{Path.cwd()} (working directory)"])
    hint = "" if dirs else " (no ComfyUI root known: pass --comfyui-root or set COMFYUI_PATH)"
    raise ValueError(f"{folder} model {raw!r} not found; looked in: {', '.join(looked)}{hint}")


def resolve_checkpoint(name: str | os.PathLike, comfyui_root: str | os.PathLike | None = None) -> Path:
    """The SD1.x teacher checkpoint a ``--ckpt`` value names: ``demo`` is the demo teacher shipped in
    `jdm_train/demo/assets/`, anything else a name in ComfyUI's ``checkpoints`` folders or a path
    (`resolve_model`)."""
    if str(name) == "demo":
        from .demo import teacher_path

        return teacher_path()
    return resolve_model(name, "checkpoints", comfyui_root)


# --------------------------------------------------------------------------- raw files


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a weight file (tensors on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file does not exist")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(
                f"{path}: refusing to unpickle a {suffix} file (pickles can run code); convert it to "
                ".safetensors, or opt in explicitly (allow_pickle=True / --allow-pickle) to load it "
                "with torch.load(weights_only=True)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated archive, or objects weights_only refuses
            raise ValueError(f"{path}: could not load pickled weights with weights_only=True: {e}") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: found a {type(obj).__name__}; expected a dict of tensors")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}; "
            f"expected a complete .safetensors file") from e
    return sd, meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The safetensors metadata of ``path`` (strings), with ``jdm.config`` decoded from JSON."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    if "jdm.config" in meta:
        try:
            meta["jdm.config"] = json.loads(meta["jdm.config"])
        except json.JSONDecodeError:
            pass
    return meta


def export_metadata(kind: str, metadata: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata for an export: every ``jdm.*`` key present (empty when unknown),
    ``jdm.kind`` defaulting to ``kind``, non-string values JSON-encoded (``jdm.config``)."""
    meta = {"jdm.kind": kind, "jdm.control": "", "jdm.timestep": "", "jdm.base": "", "jdm.config": "{}"}
    for k, v in {**(metadata or {}), **(extra or {})}.items():
        if v is None:
            continue
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return meta


class NoSpaceError(OSError):
    """A write ran out of disk space (or quota); the message names the folder and the size needed."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` reports a full disk or quota: an OSError, or the text of safetensors' own error."""
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    if isinstance(exc, OSError) and exc.errno in codes:
        return True
    return any(s in str(exc) for s in ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122"))


def no_space_error(folder: str | os.PathLike, needed_bytes: int) -> NoSpaceError:
    """The error to raise for a full disk: ``no space left in <folder>, needed about N GB``."""
    try:
        free = f"; {shutil.disk_usage(folder).free / 1e9:.3g} GB free now"
    except OSError:
        free = ""
    return NoSpaceError(errno.ENOSPC, f"no space left in {folder}, needed about {needed_bytes / 1e9:.3g} GB{free}; "
                                      "free some space or write to another disk")


def _write_temp(path: Path, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
    """``sd`` as a complete, fsynced file ``.<name>.<random>.tmp/<name>`` beside ``path``.

    The private folder also catches the temporary file safetensors (>= 0.8) writes beside its
    target, so a kill leaves one thing to clean. The file gets the mode a plain ``open()`` gives
    (0666 less the umask): safetensors' own is 0600, which hides exports from a ComfyUI run by
    another user. On failure nothing is left behind; a full disk is a `NoSpaceError`."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: exports are written as .safetensors; got suffix {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    folder = new_temp(path, folder=True)
    tmp = folder / path.name
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what a plain open() creates
        save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in metadata.items()})
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as exc:
        remove_temp(folder)
        if is_disk_full(exc):
            raise no_space_error(path.parent, sum(t.numel() * t.element_size() for t in tensors.values())) from exc
        raise
    return tmp


def _place(tmp: Path, final: Path) -> None:
    """Rename a `_write_temp` file into place and drop its private folder."""
    os.replace(tmp, final)
    remove_temp(tmp.parent)


def save_state_dict(path: str | os.PathLike, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write safetensors atomically: temp file in the same folder, fsync, ``os.replace``.

    The file gets the mode a plain ``open()`` would give (0666 less the umask). A full disk raises
    `NoSpaceError` ("no space left in <folder>, needed about N GB") and leaves no temp file."""
    path = Path(path)
    tmp = _write_temp(path, sd, metadata)
    try:
        os.replace(tmp, path)
    finally:
        remove_temp(tmp.parent)
    fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------- export sets


def _journal(path: Path) -> Path:
    return path.with_name(f".{path.name}.export-set.json")


def _temps_of(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


class ExportSet:
    """Files of one export (student, ControlNet, LoRA) that a reader sees as a set: old or new.

    Each `write` puts a complete temporary file beside its target, so only one state dict is in
    memory at a time. Leaving the ``with`` block normally renames them all in the planned order
    after recording the renames in a journal beside the first file; an exception deletes the
    temporaries and leaves the previous set untouched. A kill between the renames leaves the
    journal, and `recover_export_set` (run before the next export) completes them. Every file
    carries ``jdm.export_id`` (shared by the set) and ``jdm.export_set`` (JSON {kind: file name}),
    so a loader can tell a mixed set (`export_set_mismatch`).

        with ExportSet({"student": p1, "controlnet": p2}) as exports:
            exports.write("student", sd1, meta1)
            exports.write("controlnet", sd2, meta2)
    """

    def __init__(self, paths: Mapping[str, str | os.PathLike]):
        self.paths = {kind: Path(p) for kind, p in paths.items()}
        if not self.paths:
            raise ValueError("ExportSet: no files planned")
        self.export_id = uuid.uuid4().hex
        self.members = json.dumps({kind: p.name for kind, p in self.paths.items()}, sort_keys=True)
        self.temps: dict[str, Path] = {}

    def write(self, kind: str, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
        if kind not in self.paths or kind in self.temps:
            raise ValueError(f"ExportSet: {kind!r} is not a planned file or was written already; planned {list(self.paths)}")
        meta = {**metadata, "jdm.export_id": self.export_id, "jdm.export_set": self.members}
        self.temps[kind] = _write_temp(self.paths[kind], sd, meta)

    def discard(self) -> None:
        for tmp in self.temps.values():
            remove_temp(tmp.parent)
        self.temps.clear()

    def commit(self) -> dict[str, Path]:
        missing = [k for k in self.paths if k not in self.temps]
        if missing:
            self.discard()
            raise ValueError(f"ExportSet: {missing} planned but not written; nothing was replaced")
        pairs = [(str(self.temps[k]), str(self.paths[k])) for k in self.paths]
        journal = _journal(next(iter(self.paths.values())))
        if len(pairs) > 1:
            try:
                with atomic_write(journal) as tmp:
                    tmp.write_text(json.dumps(pairs), encoding="utf-8")
            except BaseException as exc:
                self.discard()
                if is_disk_full(exc):
                    raise no_space_error(journal.parent, 4096) from exc
                raise
        _finish_renames(pairs, journal)  # a failure here keeps journal and temps for recover_export_set
        self.temps.clear()
        return dict(self.paths)

    def __enter__(self) -> ExportSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _finish_renames(pairs: list[tuple[str, str]], journal: Path) -> None:
    for tmp, final in pairs:
        if os.path.exists(tmp):
            _place(Path(tmp), Path(final))
    for folder in dict.fromkeys(Path(final).parent for _, final in pairs):
        fsync_dir(folder)
    journal.unlink(missing_ok=True)
    fsync_dir(journal.parent)


def recover_export_set(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Make the exports at ``paths`` a consistent set after a kill; returns the temp files removed.

    An export killed between its renames left a journal: its remaining (complete, fsynced)
    temporaries are renamed into place, finishing the new set. Any other leftover temporary
    of these files (a kill while writing) is deleted. Run it before an export starts."""
    paths = [Path(p) for p in paths]
    for path in paths:
        journal = _journal(path)
        if not journal.is_file():
            continue
        try:
            pairs = [(str(t), str(f)) for t, f in json.loads(journal.read_text(encoding="utf-8"))]
        except (ValueError, TypeError):
            pairs = []
        finals = {str(p) for p in paths}
        # only renames of a temp of one of these files onto that file: the journal is not trusted further
        if all(f in finals and Path(t).name == Path(f).name and Path(t).parent.parent == Path(f).parent
               and Path(t).parent.name.startswith(f".{Path(f).name}.") for t, f in pairs):
            _finish_renames(pairs, journal)
        else:
            journal.unlink(missing_ok=True)
    removed = []
    for path in paths:
        for tmp in _temps_of(path) + _temps_of(_journal(path)):
            remove_temp(tmp)
            removed.append(tmp)
    return removed


def export_set_mismatch(files: Mapping[str, str | os.PathLike]) -> str | None:
    """Why the exports ``{kind: path}`` are not one set (``jdm.export_id`` differs), else None.

    Files without an export id (older exports, other tools) are not judged."""
    ids = {}
    for kind, path in files.items():
        export_id = read_metadata(path).get("jdm.export_id")
        if export_id:
            ids[kind] = export_id
    if len(set(ids.values())) > 1:
        return "mixed export set: " + ", ".join(f"{k} {Path(files[k]).name} is export {v[:8]}" for k, v in ids.items())
    return None


# --------------------------------------------------------------------------- family checks


def _describe(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Name a non-SD1 model family recognised from its keys, else None."""
    keys = list(sd)
    if any(("lora_up" in k or "lora_down" in k or "lora_A" in k or "lora_B" in k) for k in keys):
        return "a LoRA (lora_up/lora_down or lora_A/lora_B keys)"
    if any(k.startswith("conditioner.embedders") for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in sd:
        return "an SDXL checkpoint (conditioner.embedders / label_emb keys)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "an SD2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.* keys)"
    if any("zero_convs" in k or "controlnet_cond_embedding" in k or k.startswith(CONTROL_PREFIX) for k in keys):
        return "a ControlNet"
    return None


def _check_sd1_unet(unet_sd: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    ctx = context_dim(unet_sd)
    if ctx == 2048 or "label_emb.0.0.weight" in unet_sd:
        raise ValueError(f"{path}: found an SDXL UNet (context dim {ctx}); expected an SD1.x {what} (context dim 768)")
    if ctx == 1024:
        raise ValueError(
            f"{path}: found an SD2.x UNet (context dim 1024, usually v-prediction); "
            f"expected an SD1.x {what} (context dim 768)")
    needed = ["input_blocks.0.0.weight"] + ([] if what == "ControlNet" else ["out.2.weight"])
    if any(k not in unet_sd for k in needed):
        raise ValueError(f"{path}: found no LDM UNet keys ({', '.join(needed)}); expected an SD1.x {what}")


# --------------------------------------------------------------------------- building modules


def _load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path, what: str,
                 assign: bool = False) -> None:
    """Load every tensor and fail loudly on anything missing, unexpected or misshapen."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(
            f"{path}: {what} weights do not match the inferred architecture: "
            f"{len(set(own) & set(sd))}/{len(own)} keys loaded; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in sd.items()}, strict=True, assign=assign)


def _instantiate(cls, config: dict, sd: Mapping[str, torch.Tensor], path: Path, what: str, dtype=None):
    """``cls(**config)`` holding ``sd``, built on the meta device so the weights are not
    randomly initialised first (13 s for the SD1.5 UNet on one core)."""
    with torch.device("meta"):
        model = cls(**config)
    if any(b.is_meta for b in model.buffers()):  # buffers are not in the state dict
        model = cls(**config)
        _load_strict(model, sd, path, what)
        return model
    target = dtype or torch.float32
    _load_strict(model, {k: v.to(target) for k, v in sd.items()}, path, what, assign=True)
    return model


def _finish(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    if device is not None:
        model.to(device)
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    return model.eval().requires_grad_(False)


def build_unet(unet_sd: Mapping[str, torch.Tensor], path: Path, config: dict | None = None, device=None, dtype=None):
    """A diffusers UNet from bare LDM UNet keys, converted by diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = dict(config or infer_unet_config(unet_sd))
    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in unet_sd.items()}, config)
    unet = _instantiate(UNet2DConditionModel, config, converted, path, "UNet", dtype)
    return _finish(unet, device, dtype)


def build_vae(vae_sd: Mapping[str, torch.Tensor], path: Path, device=None, dtype=None):
    """AutoencoderKL from LDM VAE keys, or AutoencoderTiny from a TAESD-shaped VAE."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith("taesd_decoder.") for k in vae_sd):
        vae = AutoencoderTiny(latent_channels=int(vae_sd["taesd_decoder.1.weight"].shape[1]))
        _load_strict(vae, taesd_to_diffusers(vae_sd), path, "TAESD VAE")
        return _finish(vae, device, dtype)
    if "encoder.conv_in.weight" not in vae_sd:
        raise ValueError(f"{path}: found no VAE (first_stage_model.encoder.*); expected an SD1.x checkpoint with its VAE")
    config = infer_vae_config(vae_sd)
    converted = convert_ldm_vae_checkpoint(vae_sd, config)
    vae = _instantiate(AutoencoderKL, config, converted, path, "VAE", dtype)
    return _finish(vae, device, dtype)


def build_text_encoder(clip_sd: Mapping[str, torch.Tensor], path: Path, heads: int | None = None, device=None, dtype=None):
    """transformers CLIPTextModel from ``text_model.*`` keys.

    transformers 5 dropped the ``text_model.`` level from CLIPTextModel, so the prefix is
    matched to whatever the installed version expects before a strict load.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_sd = {k: v for k, v in clip_sd.items() if not k.endswith("position_ids")}
    model = CLIPTextModel(CLIPTextConfig(**infer_clip_config(clip_sd, heads)))
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    _load_strict(model, clip_sd, path, "CLIP text encoder")
    return _finish(model, device, dtype)


def load_scheduler():
    """The SD1.5 training schedule as a diffusers DDPMScheduler (shipped config, offline)."""
    from diffusers import DDPMScheduler

    cfg = json.loads((CONFIG_DIR / "sd15_scheduler.json").read_text())
    cfg.pop("_class_name", None)
    return DDPMScheduler(**cfg)


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP reversible byte->unicode table (same as openai-clip's simple_tokenizer)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _make_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from transformers import CLIPTokenizer

    # vocab=/merges= objects, not vocab_file=/merges_file= paths: in transformers 5 the
    # path form silently builds an empty BPE that maps every word to <unk>.
    eot = "<|endoftext|>"
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=eot, bos_token="<|startoftext|>",
                         eos_token=eot, pad_token=eot, model_max_length=77)


def _tokenizer_from_folder(folder: Path):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return _make_tokenizer(vocab, merges)


def openai_clip_bpe_path() -> Path | None:
    """The BPE file shipped by ``openai-clip`` (found without importing ``clip``, which needs pkg_resources)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return p if p.is_file() else None


def _tokenizer_from_bpe(bpe: Path):
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return _make_tokenizer({t: i for i, t in enumerate(tokens)}, merges)


def load_tokenizer(checkpoint_path: str | os.PathLike | None = None, comfyui_root: str | os.PathLike | None = None):
    """CLIP tokenizer, offline, from the first that exists: ``tokenizer/`` beside the
    checkpoint, ComfyUI's ``comfy/sd1_tokenizer``, the BPE vocabulary of ``openai-clip``."""
    candidates = []
    if checkpoint_path is not None:
        candidates.append(Path(checkpoint_path).parent / "tokenizer")
    candidates += [root / "comfy" / "sd1_tokenizer" for root in comfyui_roots(comfyui_root)]
    for folder in candidates:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _tokenizer_from_folder(folder)
    bpe = openai_clip_bpe_path()
    if bpe is None:
        raise ValueError(
            f"no CLIP tokenizer found: looked in {[str(c) for c in candidates]} and for the "
            "openai-clip package (pip install openai-clip)")
    return _tokenizer_from_bpe(bpe)


# --------------------------------------------------------------------------- loading


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids (B, 77) as SD1.x pipelines feed the text encoder: padded to the tokenizer's
    ``model_max_length`` and truncated."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids

def load_sd1_checkpoint(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None,
                        allow_pickle: bool = False, comfyui_root: str | os.PathLike | None = None) -> SD1Pipeline:
    """Load an SD1.x single-file checkpoint (LDM keys) offline into diffusers modules.

    Expects ``model.diffusion_model.*``, ``first_stage_model.*`` and
    ``cond_stage_model.transformer.*``; the architecture of each part is read from the
    weights, so full-size SD1.5 and tiny test checkpoints take the same path. Modules come
    back in eval mode with ``requires_grad=False``.
    """
    path = Path(path)
    sd, meta = read_state_dict(path, allow_pickle)
    expected = ("expected an SD1.x single-file checkpoint (model.diffusion_model.*, first_stage_model.*, "
                "cond_stage_model.transformer.*)")
    family = _describe(sd)
    if family:
        raise ValueError(f"{path}: found {family}; {expected}")
    unet_sd = strip_prefix(sd, UNET_PREFIX)
    if not unet_sd:
        if "input_blocks.0.0.weight" in sd:
            raise ValueError(f"{path}: found a UNet-only file (bare LDM UNet keys); {expected}. "
                             "Load it with load_unet, or pass it as a UNet/student")
        if "conv_in.weight" in sd and any(k.startswith("down_blocks.") for k in sd):
            raise ValueError(f"{path}: found a diffusers-layout UNet; {expected}")
        raise ValueError(f"{path}: found no model.diffusion_model.* keys; {expected}")
    _check_sd1_unet(unet_sd, path, "checkpoint")
    clip_sd = convert_clip_keys(sd)
    if not any(k.startswith(VAE_PREFIX) for k in sd) or not clip_sd:
        present = ((VAE_PREFIX, any(k.startswith(VAE_PREFIX) for k in sd)), (CLIP_PREFIX, bool(clip_sd)))
        missing = [p for p, ok in present if not ok]
        raise ValueError(f"{path}: found a UNet-only checkpoint (no {' / '.join(missing)} keys); {expected}")
    heads = int(meta["jdm.text_heads"]) if "jdm.text_heads" in meta else None
    unet_heads = int(meta.get("jdm.unet_heads", SD1_ATTENTION_HEADS))
    try:
        unet = build_unet(unet_sd, path, infer_unet_config(unet_sd, unet_heads), device, dtype)
        vae = build_vae(strip_prefix(sd, VAE_PREFIX), path, device, dtype)
        text_encoder = build_text_encoder(clip_sd, path, heads, device, dtype)
    except KeyError as e:  # a part whose layout is not SD1.x LDM
        raise ValueError(f"{path}: missing key {e}; {expected}") from e
    return SD1Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(path, comfyui_root),
                       scheduler=load_scheduler(), path=path)


def load_unet(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, allow_pickle: bool = False):
    """A diffusers UNet from an LDM-layout file (bare keys, or ``model.diffusion_model.*``
    as in a checkpoint or our `save_unet_ldm` export), as ComfyUI's UNETLoader reads it."""
    path = Path(path)
    sd, meta = read_state_dict(path, allow_pickle)
    family = _describe(sd)
    if family:
        raise ValueError(f"{path}: found {family}; expected an SD1.x UNet in LDM layout")
    unet_sd = strip_prefix(sd, UNET_PREFIX) or sd
    _check_sd1_unet(unet_sd, path, "UNet")
    config = json.loads(meta["jdm.unet_config"]) if "jdm.unet_config" in meta else None
    return build_unet(unet_sd, path, config, device, dtype)


def load_controlnet(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, allow_pickle: bool = False):
    """A diffusers ControlNetModel from a cldm/LDM file (``control_model.*`` or bare
    ``zero_convs.*``, including our exports) or a diffusers-layout file."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    path = Path(path)
    sd, meta = read_state_dict(path, allow_pickle)
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        sd = controlnet_diffusers_to_ldm(sd)
    cn_sd = strip_prefix(sd, CONTROL_PREFIX) or sd
    if "zero_convs.0.0.weight" not in cn_sd or "input_hint_block.0.weight" not in cn_sd:
        family = _describe(sd) if not any("zero_convs" in k for k in sd) else None
        found = family if family and "ControlNet" not in family else "no ControlNet keys (zero_convs, input_hint_block)"
        raise ValueError(f"{path}: found {found}; expected an SD1.x ControlNet")
    _check_sd1_unet(cn_sd, path, "ControlNet")
    config = infer_controlnet_config(cn_sd, int(meta.get("jdm.unet_heads", SD1_ATTENTION_HEADS)))
    converted = convert_controlnet_checkpoint(cn_sd, config)
    model = _instantiate(ControlNetModel, config, converted, path, "ControlNet", dtype)
    return _finish(model, device, dtype)


def load_taesd_decoder(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None):
    """diffusers AutoencoderTiny with the decoder of a ComfyUI ``taesd_decoder.safetensors``
    (bare ``1.weight``, ``3.conv.0.weight``, ... keys, or ``taesd_decoder.*``); the encoder
    keeps its random initialisation and is not meant to be used."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    sd, _ = read_state_dict(path)
    if not any(k.startswith("taesd_decoder.") for k in sd):
        sd = {f"taesd_decoder.{k}": v for k, v in sd.items()}
    sd = {k: v for k, v in taesd_to_diffusers(sd).items() if k.startswith("decoder.")}
    if "decoder.layers.0.weight" not in sd:
        raise ValueError(f"{path} is not a TAESD decoder (expected keys '1.weight', '3.conv.0.weight', ...)")
    model = AutoencoderTiny(latent_channels=int(sd["decoder.layers.0.weight"].shape[1]))
    missing = [k for k in model.load_state_dict(sd, strict=False).missing_keys if k.startswith("decoder.")]
    if missing:
        raise ValueError(f"{path} lacks TAESD decoder weights {missing[:3]}")
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


# --------------------------------------------------------------------------- exports


def _unet_config_json(unet) -> str:
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if not k.startswith("_")}
    return json.dumps(cfg, sort_keys=True)


def _check_unet_exportable(unet) -> None:
    cfg = unet.config
    bad = {k: cfg.get(k) for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim")
           if cfg.get(k) is not None}
    if bad:
        raise ValueError(f"UNet config {bad} has no SD1.x LDM layout; expected a plain SD1.x UNet2DConditionModel")


def unet_ldm_export(unet, metadata: Mapping[str, Any] | None = None, prefix: str = UNET_PREFIX,
                    dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of `save_unet_ldm`, for writing it as part of an `ExportSet`."""
    _check_unet_exportable(unet)
    sd = {prefix + k: (v.to(dtype) if dtype else v) for k, v in unet_diffusers_to_ldm(unet.state_dict()).items()}
    meta = export_metadata("student", metadata, {"jdm.unet_config": _unet_config_json(unet),
                                           "jdm.unet_heads": str(_heads(unet))})
    return sd, meta


def save_unet_ldm(path: str | os.PathLike, unet, metadata: Mapping[str, Any] | None = None,
                  prefix: str = UNET_PREFIX, dtype: torch.dtype | None = None) -> Path:
    """Export a diffusers UNet in LDM layout for ComfyUI's "Load Diffusion Model" (UNETLoader).

    Keys get ``prefix`` (``model.diffusion_model.`` by default; UNETLoader strips it, and
    ``prefix=""`` writes bare keys). Metadata: ``jdm.kind`` (default "student"),
    ``jdm.control``, ``jdm.timestep``, ``jdm.base``, ``jdm.config`` (JSON) and
    ``jdm.unet_config`` (the diffusers config, so `load_unet` rebuilds it exactly).
    """
    return save_state_dict(path, *unet_ldm_export(unet, metadata, prefix, dtype))


def _heads(model) -> int:
    h = model.config.attention_head_dim
    return int(h if isinstance(h, int) else h[0])


def controlnet_ldm_export(controlnet, metadata: Mapping[str, Any] | None = None,
                          dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of `save_controlnet_ldm`, for writing it as part of an `ExportSet`."""
    emb = tuple(controlnet.config.conditioning_embedding_out_channels)
    if emb != CLDM_HINT_CHANNELS:
        raise ValueError(
            f"ControlNet conditioning_embedding_out_channels={emb}: ComfyUI's cldm ControlNet "
            f"hard-codes {CLDM_HINT_CHANNELS}; expected that")
    sd = {k: (v.to(dtype) if dtype else v) for k, v in controlnet_diffusers_to_ldm(controlnet.state_dict()).items()}
    return sd, export_metadata("controlnet", metadata, {"jdm.unet_heads": str(_heads(controlnet))})


def save_controlnet_ldm(path: str | os.PathLike, controlnet, metadata: Mapping[str, Any] | None = None,
                        dtype: torch.dtype | None = None) -> Path:
    """Export a diffusers ControlNetModel in the cldm layout (``control_model.*``) that
    ComfyUI's ControlNetLoader reads at any width. Metadata as in `save_unet_ldm`
    (``jdm.kind`` defaults to "controlnet")."""
    return save_state_dict(path, *controlnet_ldm_export(controlnet, metadata, dtype))


def save_sd1_checkpoint(path: str | os.PathLike, unet, vae, text_encoder, metadata: Mapping[str, Any] | None = None,
                        dtype: torch.dtype | None = None) -> Path:
    """Export a single-file SD1.x checkpoint (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.transformer.*``) for ComfyUI's CheckpointLoaderSimple and
    `load_sd1_checkpoint`. ``vae`` may be an AutoencoderKL or a TAESD-shaped AutoencoderTiny."""
    _check_unet_exportable(unet)
    vae_sd = vae.state_dict()
    if any(k.startswith("encoder.layers.") for k in vae_sd):
        vae_ldm = taesd_from_diffusers(vae_sd)
    else:
        vae_ldm = vae_diffusers_to_ldm(vae_sd)
    sd = {UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(unet.state_dict()).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae_ldm.items()})
    sd.update(clip_diffusers_to_ldm(text_encoder.state_dict()))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    extra = {"jdm.text_heads": str(text_encoder.config.num_attention_heads), "jdm.unet_heads": str(_heads(unet))}
    return save_state_dict(path, sd, export_metadata("checkpoint", metadata, extra))
