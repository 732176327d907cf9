"""What a training run hands to its users: where its outputs go, the ComfyUI exports of the
trained student, ControlNet and student LoRA, and the preview grids.

No accelerate here: `train.py` decides which process writes and when the others wait.
Resumable checkpoints hold accelerate state and stay in `train.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from jdm_train import model_io
from jdm_train.config import TrainConfig
from jdm_train.denoisers import Roles, merged_student_unet, student_lora_state
from jdm_train.ldm_convert import lora_to_comfyui


def default_output_dir(config: TrainConfig) -> Path:
    """`--output-dir`, else `<comfyui-root>/models/jdm_runs/<output>`, else `jdm-output/<output>`."""
    if config.output_dir:
        return Path(config.output_dir)
    if config.comfyui_root:
        return Path(config.comfyui_root) / "models" / "jdm_runs" / config.output
    return Path("jdm-output") / config.output


def export_paths(config: TrainConfig, output_dir: Path) -> dict[str, Path]:
    """Where the exports go: the ComfyUI model folders under `--comfyui-root`, else `output_dir`."""
    name, control = config.output, config.control
    if config.comfyui_root and not config.output_dir:
        models = Path(config.comfyui_root) / "models"
        return {"student": models / "unet" / f"{name}.safetensors",
                "controlnet": models / "controlnet" / f"{name}_{control}.safetensors",
                "lora": models / "loras" / f"{name}_lora.safetensors"}
    return {"student": output_dir / f"{name}.safetensors",
            "controlnet": output_dir / f"{name}_{control}.safetensors",
            "lora": output_dir / f"{name}_lora.safetensors"}


def write_exports(config: TrainConfig, roles: Roles, base_name: str, output_dir: Path) -> dict[str, Path]:
    """Write the merged student UNet (UNETLoader), the ControlNet (ControlNetLoader) and, with a
    student LoRA, the LoRA (LoraLoaderModelOnly) with `jdm.*` metadata; returns {kind: path}.

    `base_name` is the teacher checkpoint's file name (`jdm.base`); the `extend` phase trains
    only a ControlNet, so it exports only that, as does `--objective controlnet` (its UNet is the teacher)."""
    paths = export_paths(config, output_dir)
    meta = {"jdm.control": config.control, "jdm.timestep": str(config.generator_timestep),
            "jdm.base": base_name, "jdm.config": config.to_dict()}
    written: dict[str, Path] = {}
    trains_student = config.phase == "joint" and config.objective != "controlnet"
    if trains_student:
        written["student"] = model_io.save_unet_ldm(paths["student"], merged_student_unet(roles),
                                                    {**meta, "jdm.kind": "student"})
    written["controlnet"] = model_io.save_controlnet_ldm(paths["controlnet"], roles.controlnet,
                                                         {**meta, "jdm.kind": "controlnet"})
    if trains_student and config.student_lora_rank > 0:
        state, alpha = student_lora_state(roles)
        written["lora"] = model_io.save_state_dict(paths["lora"], lora_to_comfyui(state, alpha),
                                                   model_io.export_metadata("student_lora", meta))
    return written


def write_preview_grid(path: Path, columns: list[Tensor]) -> Path:
    """PNG with the columns side by side, one row per sample; each column (n, 3, H, W) in [0, 1].

    Written to a temporary file and renamed, so a viewer never sees half an image."""
    import numpy as np
    from PIL import Image

    grid = torch.cat([torch.cat(list(col.float()), dim=1) for col in columns], dim=2)  # (3, n*H, k*W)
    array = (grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
