"""Input checks shared by the JDM nodes: user errors name the node input that caused them."""

from __future__ import annotations

import torch

CATEGORY = "JDM"


def check_conditioning(cond, name: str) -> None:
    if not isinstance(cond, list) or len(cond) == 0:
        raise ValueError(f"{name}: missing conditioning; connect a CONDITIONING (e.g. CLIP Text Encode) to '{name}'")
    for c in cond:
        if not (isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[1], dict)):
            raise ValueError(f"{name}: not a CONDITIONING list of [tensor, dict] pairs")


def check_latent(model, samples: torch.Tensor, name: str) -> None:
    expected = model.get_model_object("latent_format").latent_channels
    if samples.ndim != 4 or samples.shape[1] != expected:
        raise ValueError(f"{name}: latent has shape {tuple(samples.shape)} ({samples.shape[1] if samples.ndim > 1 else '?'} "
                         f"channels); the model expects a (B, {expected}, H/8, W/8) latent, e.g. from Empty Latent Image")


def check_image(image: torch.Tensor, name: str) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected an IMAGE (B, H, W, 3) in [0, 1], got {shape}")
