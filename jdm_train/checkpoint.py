"""Training checkpoints: `checkpoint-N/` folders a run resumes from exactly.

A checkpoint holds what `RunState` names (step, non-finite count, the clipping history), the
trained weights (`trainable.safetensors`), the EMAs (`Trainer.averages`) and accelerate's
optimiser and RNG state. It is written into a hidden folder and renamed, so a kill at any
moment leaves the previous set of checkpoints or the new one, never a truncated folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from jdm_train import model_io
from jdm_train.files import atomic_write

if TYPE_CHECKING:
    from jdm_train.train import Trainer

log = logging.getLogger("jdm_train")
PREFIX = "checkpoint-"


@dataclass
class RunState:
    """The counters of a run a checkpoint keeps. `grad_norms` (last 100 per player) and
    `clipped` ([clipped, applied] per player) are the outlier clipper's history."""

    step: int = 0
    nonfinite_total: int = 0
    grad_norms: dict[str, list[float]] = field(default_factory=dict)
    clipped: dict[str, list[int]] = field(default_factory=dict)


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete `checkpoint-N/` folders of `output_dir`, oldest first."""
    found = []
    for p in output_dir.glob(f"{PREFIX}*"):
        suffix = p.name[len(PREFIX):]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(suffix), p))
    return sorted(found)


def find_checkpoint(output_dir: Path, spec: str) -> Path:
    """`latest` (the newest complete `checkpoint-N/` in `output_dir`) or an explicit folder."""
    if spec == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume latest: no checkpoint-N folder in {output_dir}")
        return found[-1][1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"--resume: {spec!r} is not a checkpoint folder (no trainer_state.json); "
                         "expected 'latest' or a checkpoint-N folder")
    return path


def remove_partial(output_dir: Path) -> None:
    """Hidden temporary checkpoint folders left by a kill -9 mid-save."""
    if not output_dir.is_dir():
        return
    for stale in output_dir.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_bytes(trainer: "Trainer") -> int:
    """About what one checkpoint and one export set take on disk: trained weights, two Adam moments
    and the EMAs in float32, plus the exported student and ControlNet."""
    trained = sum(p.numel() for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"])
    averaged = sum(p.numel() for ema, _ in trainer.averages().values() for p in ema.shadow_params)
    roles = trainer.roles
    exported = sum(p.numel() for p in roles.student.unet.parameters()) + sum(p.numel() for p in roles.controlnet.parameters())
    return 4 * (3 * trained + averaged + exported)


def weights_digest(roles) -> str:
    """sha256 of every trained tensor: replicas whose digests differ have drifted apart."""
    h = hashlib.sha256()
    for key, value in sorted(roles.trainable_state().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(trainer: "Trainer") -> Path:
    """`checkpoint-N/` of the trainer's current step; a full disk raises `model_io.NoSpaceError`."""
    acc, output_dir = trainer.accelerator, trainer.output_dir
    final = output_dir / f"{PREFIX}{trainer.step}"
    tmp = output_dir / f".{PREFIX}{trainer.step}.tmp"
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    digests = trainer.replica_digests()
    try:
        _write(trainer, tmp, final, digests)
    except Exception as exc:
        # torch's zip writer reports a full disk as "unexpected pos": look at the disk before cleaning up.
        full = model_io.is_disk_full(exc) or shutil.disk_usage(output_dir).free < 2**26
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint would keep the disk full
        if full:
            raise model_io.no_space_error(output_dir, checkpoint_bytes(trainer)) from None
        raise
    acc.wait_for_everyone()
    return final


def _write(trainer: "Trainer", tmp: Path, final: Path, digests: list[str]) -> None:
    acc = trainer.accelerator
    acc.save_state(str(tmp))
    if not acc.is_main_process:
        return
    model_io.save_state_dict(tmp / "trainable.safetensors", trainer.roles.trainable_state(),
                             {"jdm.kind": "trainer_checkpoint", "jdm.config": trainer.config.to_json()})
    for file, (ema, _) in trainer.averages().items():
        # In the optimizer's parameter order; the step sets where the warm-up is.
        model_io.save_state_dict(tmp / file, {f"{i:05d}": p for i, p in enumerate(ema.shadow_params)},
                                 {"jdm.kind": "trainer_ema", "jdm.ema_step": str(ema.optimization_step)})
    state = {**asdict(trainer.state), "config": trainer.config.to_dict(), "num_processes": acc.num_processes,
             "replica_digests": digests}
    with atomic_write(tmp / "trainer_state.json") as part:
        part.write_text(json.dumps(state, indent=1, sort_keys=True))
    # Re-saving a step (a resume from an older checkpoint): the old folder is moved aside, not
    # deleted, until the new one is in place.
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    limit = trainer.config.checkpoints_total_limit
    if limit:
        for _, stale in checkpoints(trainer.output_dir)[:-limit]:
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(trainer: "Trainer", path: Path) -> None:
    """Restore weights, optimizers, EMAs and `RunState` from `path` (see `save_checkpoint`)."""
    saved = json.loads((path / "trainer_state.json").read_text())
    weights, _ = model_io.read_state_dict(path / "trainable.safetensors")
    trainer.roles.load_trainable_state({k: v.to(trainer.device) for k, v in weights.items()})
    with _messages("accelerate.checkpointing") as notes:
        trainer.accelerator.load_state(str(path))
    if any("Could not load random states" in m for m in notes):  # accelerate says so at INFO only
        log.warning("%s: random_states_%d.pkl could not be read; training goes on, but not bit-for-bit as an "
                    "uninterrupted run would", path, trainer.accelerator.process_index)
    for file, (ema, params) in trainer.averages().items():
        _load_ema(ema, params, path / file)
    state = trainer.state
    state.grad_norms.update(saved.get("grad_norms", {}))
    state.clipped.update(saved.get("clipped", {}))
    state.step = int(saved["step"])
    state.nonfinite_total = int(saved.get("nonfinite_total", 0))
    log.info("resumed from %s at step %d", path, state.step)


@contextmanager
def _messages(logger_name: str):
    """The messages a library logs (INFO and up) inside the block, as a list."""
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _load_ema(ema, params: list, path: Path) -> None:
    if not path.is_file():
        log.warning("%s has no %s; that average starts from the resumed weights", path.parent, path.name)
        ema.shadow_params = [p.detach().clone() for p in params]
        return
    ema.optimization_step = load_average(ema.shadow_params, path)


def load_average(tensors: list, path: Path) -> int:
    """Copy an EMA file's averages into `tensors` (same order); returns the EMA's step."""
    shadows, meta = model_io.read_state_dict(path)
    if len(shadows) != len(tensors):
        raise ValueError(f"{path}: {len(shadows)} EMA tensors, the model has {len(tensors)}")
    with torch.no_grad():
        for i, s in enumerate(tensors):
            s.copy_(shadows[f"{i:05d}"])
    return int(meta["jdm.ema_step"])
