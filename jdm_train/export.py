"""What a training run hands to its users: where its outputs go, the ComfyUI exports of the
trained student, ControlNet and student LoRA, and image grids of columns side by side.

No accelerate here: `train.py` decides which process writes and when the others wait.
`python -m jdm_train.export CHECKPOINT_DIR` writes the exports of any training checkpoint, so a
run can be tried in ComfyUI before it ends (or after it crashed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from jdm_train import model_io
from jdm_train.config import TrainConfig
from jdm_train.denoisers import Roles, merged_student_unet, student_lora_state
from jdm_train.files import save_image_grid
from jdm_train.ldm_convert import lora_to_comfyui


#: `--save-precision`: the dtype of exported weights.
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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

    The files are one `model_io.ExportSet`: all are written as temporaries first and renamed
    together, so a reader sees the previous set or the new one, and each carries the set's
    `jdm.export_id`. `base_name` is the teacher checkpoint's file name (`jdm.base`); the `extend`
    phase trains only a ControlNet, so it exports only that, as does `--objective controlnet`
    (its UNet is the teacher)."""
    paths = export_paths(config, output_dir)
    meta = {"jdm.control": config.control, "jdm.timestep": str(config.generator_timestep),
            "jdm.base": base_name, "jdm.config": config.to_dict()}
    trains_student = config.phase == "joint" and config.objective != "controlnet"
    dtype = SAVE_DTYPES[config.save_precision]
    kinds = ["controlnet"]
    if trains_student:
        kinds = ["student", "controlnet"] + (["lora"] if config.student_lora_rank > 0 else [])
    with model_io.ExportSet({k: paths[k] for k in kinds}) as exports:
        if trains_student:
            exports.write("student", *model_io.unet_ldm_export(merged_student_unet(roles),
                                                               {**meta, "jdm.kind": "student"}, dtype=dtype))
        exports.write("controlnet", *model_io.controlnet_ldm_export(roles.controlnet,
                                                                    {**meta, "jdm.kind": "controlnet"}, dtype=dtype))
        if "lora" in kinds:
            state, alpha = student_lora_state(roles)
            lora = {k: v.to(dtype) for k, v in lora_to_comfyui(state, alpha).items()}
            exports.write("lora", lora, model_io.export_metadata("student_lora", meta))
    return exports.paths


def clean_export_leftovers(config: TrainConfig, output_dir: Path) -> list[Path]:
    """Before training: finish an export set a kill interrupted between its renames and delete
    leftover export temporaries (a full-size student's is gigabytes); returns the files removed."""
    return model_io.recover_export_set(export_paths(config, output_dir).values())


def write_column_grid(path: Path, columns: list[Tensor]) -> Path:
    """PNG with the columns side by side, one row per sample; each column (n, 3, H, W) in [0, 1].
    Written atomically (`files.save_image_grid`), so a viewer never sees half an image."""
    rows = torch.stack([col.float().cpu() for col in columns], dim=1)  # (n, k, 3, H, W)
    return save_image_grid(path, rows.flatten(0, 1), ncol=len(columns))


def export_checkpoint(checkpoint: Path, output_dir: Path | None = None, save_precision: str | None = None,
                      comfyui_root: str | None = None, device: str = "cpu") -> dict[str, Path]:
    """The exports of a `checkpoint-N/` folder, with its generator EMA when it has one: the run's
    config is read back from the checkpoint and its models rebuilt from the teacher."""
    import json

    from jdm_train.build import build_models
    from jdm_train.checkpoint import load_average
    from jdm_train.optim import generator_params
    from jdm_train.schedule import NoiseSchedule

    if not (checkpoint / "trainer_state.json").is_file():
        raise ValueError(f"{checkpoint}: not a training checkpoint (no trainer_state.json); expected a checkpoint-N folder")
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    config = TrainConfig.from_dict(saved["config"], source=str(checkpoint / "trainer_state.json"))
    config.resume = None
    if comfyui_root is not None:
        config.comfyui_root = comfyui_root
    if save_precision is not None:
        config.save_precision = save_precision
    models = build_models(config, torch.device(device), torch.float32, NoiseSchedule())
    weights, _ = model_io.read_state_dict(checkpoint / "trainable.safetensors")
    models.roles.load_trainable_state(weights)
    params = generator_params(models.roles.groups)
    if (checkpoint / "ema.safetensors").is_file():
        load_average(params, checkpoint / "ema.safetensors")
    if output_dir is not None:  # export_paths would otherwise choose the ComfyUI folders of --comfyui-root
        config.output_dir = str(output_dir)
    out = default_output_dir(config)
    return write_exports(config, models.roles, models.teacher_name, out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from jdm_train.config import SAVE_PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m jdm_train.export",
                                     description="Write the ComfyUI files (student, ControlNet, LoRA) of a training "
                                                 "checkpoint, with its EMA weights when the run kept an average.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint-N folder of a run")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where to write (default: where the run exports: the ComfyUI model folders of its "
                             "--comfyui-root, else its output folder)")
    parser.add_argument("--comfyui-root", default=None, help="resolve the teacher and export in this ComfyUI folder")
    parser.add_argument("--save-precision", choices=SAVE_PRECISIONS, default=None,
                        help="precision of the written weights (default: the run's)")
    parser.add_argument("--device", default="cpu", help="device to rebuild the models on (default: cpu)")
    args = parser.parse_args(argv)
    try:
        written = export_checkpoint(args.checkpoint, args.output_dir, args.save_precision, args.comfyui_root, args.device)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
