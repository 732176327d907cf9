"""What a training run is built from: the checks that can refuse it (before any model loads), the
dataset, and the models, built by `build_models` from a config and handed to the `Trainer`
(tests hand in tiny ones built in code)."""

from __future__ import annotations

import importlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from jdm_train import model_io
from jdm_train.codec import Codec
from jdm_train.config import TrainConfig
from jdm_train.data import CaptionedImageFolder
from jdm_train.denoisers import Roles, UNetDenoiser, build_roles
from jdm_train.schedule import NoiseSchedule
from jdm_train.synthesis import is_prompt_list, read_prompts


@dataclass
class Models:
    """The models of one run. `guidance` is the guidance teacher of decoupled CFG (the real score
    itself unless `--cfg-teacher` names another checkpoint, whose text encoder is then
    `guidance_text_encoder`); `teacher_name` names the exports."""

    codec: Codec
    roles: Roles
    extractor: object
    teacher_name: str
    guidance: UNetDenoiser | None = None
    guidance_text_encoder: torch.nn.Module | None = None
    reward: Callable | None = None


def load_dataset(config: TrainConfig):
    """The training images: the demo set or a captioned folder (a prompt list is drawn by the
    teacher first: `synthesis.py`, called by the Trainer once the models are built)."""
    if config.data == "demo":
        from jdm_train.demo.data import ShapesDataset

        return ShapesDataset(resolution=config.resolution)
    if not config.data:
        raise ValueError("--data: a folder of captioned images is required (or --ckpt demo)")
    return CaptionedImageFolder(config.data, config.resolution)


def load_reward(spec: str) -> Callable:
    """`MODULE:FUNCTION` -> callable(images BCHW [0, 1], prompts) -> (B,) (JDM Eq. 9).

    The reward is used as the condition term's log-likelihood is (docs/method.md §5, §9): a
    per-image log-probability of the whole image, so a per-pixel reward is summed over pixels,
    never averaged, and `--reward-weight` 1 keeps Eq. 9's scale."""
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--reward: cannot import {spec!r} ({exc}); expected MODULE:FUNCTION") from exc
    if not callable(fn):
        raise ValueError(f"--reward: {spec!r} is not callable")
    return fn


def make_extractor(config: TrainConfig):
    from jdm_train.extractors import extractor_params, get_extractor

    # HED/depth annotator weights are searched in the same ComfyUI root as the models.
    takes_root = any(p.name == "comfyui_root" for p in extractor_params(config.control))
    return get_extractor(config.control, **({"comfyui_root": config.comfyui_root}
                                            if takes_root and config.comfyui_root else {}))


def build_models(config: TrainConfig, device: torch.device, weight_dtype: torch.dtype,
                 schedule: NoiseSchedule) -> Models:
    """Teacher checkpoint -> codec and the roles on its UNet; frozen student; guidance teacher;
    condition extractor and reward. Frozen weights are stored in `weight_dtype` (the autocast
    precision: they are never updated), trained ones in fp32."""
    teacher_path = model_io.resolve_checkpoint(config.ckpt, config.comfyui_root)
    pipe = model_io.load_sd1_checkpoint(teacher_path, allow_pickle=config.allow_pickle, comfyui_root=config.comfyui_root)
    frozen = dict(device=device, dtype=weight_dtype)
    text_encoder = pipe.text_encoder.to(**frozen).requires_grad_(False).eval()
    vae = pipe.vae.to(**frozen).requires_grad_(False).eval()
    decoder = None
    if config.cond_decoder == "taesd":
        decoder = model_io.load_taesd_decoder(model_io.resolve_model(config.taesd, "vae_approx", config.comfyui_root),
                                              device, weight_dtype)
    codec = Codec(pipe.tokenizer, text_encoder, vae, decoder)
    if codec.vae_scale_factor != 8:
        raise ValueError(f"--ckpt {config.ckpt}: its VAE downsamples {codec.vae_scale_factor}x; the exported "
                         "ControlNet (ComfyUI's cldm layout) needs SD1.x's 8x VAE")
    roles = _build_roles(config, pipe.unet, schedule, device, weight_dtype, codec.vae_scale_factor)
    models = Models(codec, roles, make_extractor(config), teacher_path.name,
                    reward=load_reward(config.reward) if config.reward else None)
    if config.cfg_scale != 1.0:
        models.guidance = roles.teacher
        if config.cfg_teacher:
            gpipe = model_io.load_sd1_checkpoint(model_io.resolve_model(config.cfg_teacher, "checkpoints",
                                                                        config.comfyui_root),
                                                 allow_pickle=config.allow_pickle)
            models.guidance_text_encoder = gpipe.text_encoder.to(**frozen).requires_grad_(False)
            models.guidance = UNetDenoiser(gpipe.unet.to(**frozen).requires_grad_(False), schedule)
    return models


def _build_roles(config: TrainConfig, unet, schedule: NoiseSchedule, device, weight_dtype, vae_scale_factor: int) -> Roles:
    frozen_student = None
    if config.objective == "controlnet":
        frozen_student = unet  # the teacher itself: only the ControlNet learns
    elif config.phase == "extend":
        frozen_student = model_io.load_unet(model_io.resolve_model(config.student, "unet", config.comfyui_root),
                                            allow_pickle=config.allow_pickle)
    torch.manual_seed(config.seed)  # one seed for every randomly initialised weight, identical on every process
    roles = build_roles(
        unet, schedule, student_lora_rank=config.student_lora_rank, fake_lora_rank=config.fake_lora_rank,
        consistency_lora_rank=config.consistency_lora_rank, frozen_student=frozen_student,
        discriminator=config.divergence != "rkl" or config.gan_weight > 0, vae_scale_factor=vae_scale_factor,
        gradient_checkpointing=config.gradient_checkpointing)
    trained = {id(p) for ps in roles.groups.values() for p in ps}
    for module in roles.modules.values():
        module.to(device)
        for p in module.parameters():
            if id(p) not in trained:
                p.data = p.data.to(weight_dtype)
    return roles


# ---------------------------------------------------------------------- before the first step

#: What a resumed run must share with its checkpoint: the weights and optimiser state only fit these.
#: Learning rates, run length, cadences and outputs may change (learning rates are applied and logged).
RESUME_FIXED = ("ckpt", "control", "objective", "phase", "student", "divergence", "student_lora_rank",
                "fake_lora_rank", "consistency_lora_rank", "cfg_teacher")


def preflight(config: TrainConfig, output_dir: Path) -> Path | None:
    """The checks that can refuse a run and need no model, in seconds (ValueError / FileNotFoundError,
    one line each): every output folder writable, the control's annotator weights present, and the
    resume target found and trained for the same model, control and objective. Returns that target."""
    from jdm_train.checkpoint import find_checkpoint
    from jdm_train.export import export_paths

    for folder in sorted({output_dir, *(p.parent for p in export_paths(config, output_dir).values())}):
        _check_writable(folder)
    if is_prompt_list(config.data):
        read_prompts(config.data)
    extractor = make_extractor(config)
    for locate in ("weights_path", "model_path"):  # HED / depth: raise MissingWeightsError naming where to put them
        if hasattr(extractor, locate):
            getattr(extractor, locate)()
    if not config.resume:
        return None
    path = find_checkpoint(output_dir, config.resume)
    saved = json.loads((path / "trainer_state.json").read_text()).get("config", {})
    differs = [k for k in RESUME_FIXED if k in saved and _resume_value(k, saved[k]) != _resume_value(k, getattr(config, k))]
    if differs:
        then = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r}" for k in differs)
        now = ", ".join(f"{getattr(config, k)!r}" for k in differs)
        raise ValueError(f"--resume {path}: that checkpoint was trained with {then}; this run asks for {now}. "
                         "Resume with the same values, or start a new run with another --output")
    return path


def _resume_value(key: str, value):
    # A checkpoint given as a name or as a path to the same file is the same model.
    return Path(value).name if key in ("ckpt", "student", "cfg_teacher") and value else value


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jdm-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"output folder {folder} is not writable ({exc.strerror or exc}); "
                         "choose another with --output-dir / --comfyui-root") from None
