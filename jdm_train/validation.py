"""Validation grids of a run: one row per prompt, condition | student one step | teacher multi-step.

The rows are the user's own (`--validation-prompt` with `--validation-image`, the control image
itself, as ComfyUI's ControlNet nodes take it) or, without prompts, the first training items with
conditions extracted from their images. The noise is fixed, so grids of one run compare across
steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from jdm_train.config import TrainConfig, pair_prompts
from jdm_train.denoisers import Cond
from jdm_train.sampling import ddim_reference, generate_one_step


@dataclass
class ValidationSet:
    captions: list[str]
    control: Tensor  # (n, 3, H, W) in [0, 1]


def load_control_image(path: str | Path, resolution: int) -> Tensor:
    """(3, R, R) in [0, 1]: a control image sized as training images are (`data.load_image`)."""
    from jdm_train.data import load_image

    try:
        return load_image(Path(path), resolution)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--validation-image {path}: not a readable image ({exc})") from None


def validation_set(config: TrainConfig, dataset, extractor, count: int = 4) -> ValidationSet:
    """The user's prompts and control images, or the first `count` training items."""
    pairs = pair_prompts(list(config.validation_prompt or []), list(config.validation_image or []))
    if pairs and all(image is not None for _, image in pairs):
        control = torch.stack([load_control_image(image, config.resolution) for _, image in pairs])
        return ValidationSet([p for p, _ in pairs], control)
    items = [dataset[i] for i in range(min(max(count, len(pairs)), len(dataset)))]
    images = torch.stack([it["image"] for it in items])
    with torch.no_grad():
        control = extractor.extract(images)
    captions = [p for p, _ in pairs] or [it["caption"] for it in items]
    # Prompts without images: each prompt drawn under a training item's condition.
    return ValidationSet(captions, control[torch.arange(len(captions)) % len(control)])


@torch.no_grad()
def validation_columns(models, schedule, config: TrainConfig, vset: ValidationSet, autocast) -> list[Tensor]:
    """[condition, student one step, teacher multi-step (`--validation-teacher-steps`, CFG)], each
    (n, 3, H, W) in [0, 1] on the CPU."""
    codec, roles = models.codec, models.roles
    device = codec.device
    control = vset.control.to(device)
    cond = Cond(codec.encode_text(vset.captions), control)
    uncond = Cond(codec.encode_text([config.negative_prompt] * len(vset.captions)))
    gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    noise = torch.randn(codec.latent_shape(len(vset.captions), config.resolution), generator=gen, device=device)
    with autocast():
        student = generate_one_step(roles.student, noise, config.generator_timestep, cond).float()
        teacher = ddim_reference(roles.teacher, noise, cond, uncond, config.validation_teacher_steps,
                                 max(config.cfg_scale, 1.0), schedule).float()
    return [control.float().cpu(), codec.decode(student).cpu(), codec.decode(teacher).cpu()]


def write_validation(path: Path, columns: list[Tensor], tracker=None, step: int = 0) -> Path:
    """The grid as a PNG (`export.write_column_grid`) and, given a tensorboard tracker, as its image log."""
    from jdm_train.export import write_column_grid

    write_column_grid(path, columns)
    if tracker is not None:
        import numpy as np
        from PIL import Image

        grid = np.asarray(Image.open(path).convert("RGB"))
        tracker.log_images({"validation": grid[None]}, step=step, dataformats="NHWC")
    return path
