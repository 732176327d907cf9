"""Deterministic SD1.x-family weight files for tests and benchmarks (no downloads).

Every writer builds real diffusers / transformers modules with random weights from a
seed and saves them through `jdm_train.model_io`, so the files have the real LDM layout:

* `write_tiny_sd1_checkpoint`: a few-MB single-file SD1.x checkpoint (narrow UNet and VAE,
  small CLIP text encoder with the real 49408-token vocabulary) for fast tests.
* `write_full_sd1_checkpoint`: the full-size SD1.5 architecture, for ``slow`` tests.
* `write_comfy_detectable_sd15` / `write_comfy_detectable_controlnet`: files ComfyUI
  itself loads and detects as SD1.5 (UNet with model_channels 320, context 768, one level,
  one res block; a TAESD-shaped VAE; a full-size CLIP-L text encoder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import model_io
from .ldm_convert import SD1_LATENT_SCALE

TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64)
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
TINY_CLIP = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
# ComfyUI matches SD1.5 on model_channels 320, context 768, in_channels 4, conv projections.
COMFY_SD15_UNET = dict(block_out_channels=(320,), layers_per_block=1, cross_attention_dim=768)


def _seeded(seed: int):
    torch.manual_seed(seed)


def make_unet(block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 1,
              cross_attention_dim: int = 64, attention_heads: int = model_io.SD1_ATTENTION_HEADS,
              transformer_layers_per_block: int = 1, seed: int = 0, attention_levels: Sequence[bool] | None = None):
    """A random SD1-style diffusers UNet2DConditionModel (attention at every level but the
    deepest, as in SD1.5, unless ``attention_levels`` says otherwise; one level: attention)."""
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    if attention_levels is None:
        attention_levels = [True] * n if n == 1 else [True] * (n - 1) + [False]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    _seeded(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_heads,
        transformer_layers_per_block=transformer_layers_per_block)
    _perturb(unet, seed)
    return unet.eval()


def make_vae(block_out_channels: Sequence[int] = (32, 32, 32, 32), layers_per_block: int = 1, seed: int = 0):
    """A random diffusers AutoencoderKL (4 levels: 8x downscale like SD's VAE)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    _seeded(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=tuple(block_out_channels),
                        layers_per_block=layers_per_block, latent_channels=4, sample_size=512,
                        scaling_factor=SD1_LATENT_SCALE)
    _perturb(vae, seed + 1)
    return vae.eval()


def make_taesd_vae(seed: int = 0):
    """A random TAESD-shaped diffusers AutoencoderTiny (ComfyUI loads it from a checkpoint's
    ``first_stage_model.taesd_encoder/decoder`` keys as a small VAE)."""
    from diffusers import AutoencoderTiny

    _seeded(seed)
    vae = AutoencoderTiny()
    _perturb(vae, seed + 1)
    return vae.eval()


def make_text_encoder(hidden_size: int = 64, num_hidden_layers: int = 2, intermediate_size: int = 128,
                      num_attention_heads: int | None = None, seed: int = 0):
    """A random transformers CLIPTextModel with the real 49408-token vocabulary and 77 positions
    (full CLIP-L with ``hidden_size=768, num_hidden_layers=12, intermediate_size=3072``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((model_io.CONFIG_DIR / "clip_l_text_config.json").read_text())
    cfg.pop("model_type", None)
    cfg.update(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, intermediate_size=intermediate_size,
               num_attention_heads=num_attention_heads or model_io.clip_heads_for(hidden_size), projection_dim=hidden_size)
    _seeded(seed)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def make_controlnet(unet, seed: int = 0, conditioning_channels: int = 3):
    """A diffusers ControlNetModel.from_unet(unet) with random (not zero) output convolutions,
    so it changes the UNet's output and a wrong key mapping shows."""
    from diffusers import ControlNetModel

    _seeded(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels)
    _perturb(cn, seed + 2)
    return cn.eval()


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    # diffusers zero-initialises ControlNet zero convs and some projections; random values
    # everywhere make every tensor distinguishable in round-trip tests.
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def write_tiny_sd1_checkpoint(path: str | os.PathLike, *, seed: int = 0, unet: Mapping[str, Any] | None = None,
                              vae: Mapping[str, Any] | None = None, clip: Mapping[str, Any] | None = None,
                              metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a tiny SD1.x single-file checkpoint in the real LDM layout and return its path.

    Defaults: UNet ``block_out_channels=(32, 64)``, 1 res block, context 64; VAE 4 levels
    of 32 channels (8x downscale); CLIP text encoder hidden 64, 2 layers, 49408 tokens.
    ``unet``, ``vae``, ``clip`` override those (kwargs of `make_unet`, `make_vae`,
    `make_text_encoder`). Same seed, same bytes.
    """
    clip_kw = {**TINY_CLIP, **(clip or {})}
    unet_kw = {**TINY_UNET, "cross_attention_dim": clip_kw["hidden_size"], **(unet or {})}
    return model_io.save_sd1_checkpoint(
        path, make_unet(**unet_kw, seed=seed), make_vae(**{**TINY_VAE, **(vae or {})}, seed=seed + 1),
        make_text_encoder(**clip_kw, seed=seed + 2), {"jdm.base": "tiny-sd1-fixture", **(metadata or {})}, dtype=dtype)


def write_full_sd1_checkpoint(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write a random checkpoint with the full SD1.5 architecture (~1.1B parameters; slow tests only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _seeded(seed)
    unet = UNet2DConditionModel(**json.loads((model_io.CONFIG_DIR / "sd15_unet_config.json").read_text()))
    vae = AutoencoderKL(**json.loads((model_io.CONFIG_DIR / "sd15_vae_config.json").read_text()))
    te = make_text_encoder(768, 12, 3072, seed=seed + 2)
    return model_io.save_sd1_checkpoint(path, unet, vae, te, {"jdm.base": "full-sd15-fixture"}, dtype=dtype)


def make_comfy_sd15_unet(seed: int = 0):
    """The smallest UNet ComfyUI detects as SD1.5 (model_channels 320, context 768, one
    level, one res block; ~26M parameters)."""
    return make_unet(**COMFY_SD15_UNET, seed=seed)


def write_comfy_detectable_sd15(path: str | os.PathLike, *, seed: int = 0, dtype: torch.dtype | None = torch.float16,
                                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint ComfyUI's CheckpointLoaderSimple loads as SD1.5: the
    `make_comfy_sd15_unet` UNet, a TAESD-shaped VAE and a full-size random CLIP-L (fp16 by
    default: ~300 MB). `jdm_train.model_io.load_sd1_checkpoint` loads it too (VAE as AutoencoderTiny)."""
    te = make_text_encoder(768, 12, 3072, seed=seed + 2)
    return model_io.save_sd1_checkpoint(
        path, make_comfy_sd15_unet(seed), make_taesd_vae(seed + 1), te,
        {"jdm.base": "comfy-detectable-sd15-fixture", **(metadata or {})}, dtype=dtype)


def write_comfy_detectable_unet(path: str | os.PathLike, *, seed: int = 0, metadata: Mapping[str, Any] | None = None,
                                dtype: torch.dtype | None = None) -> Path:
    """Write the `make_comfy_sd15_unet` UNet as an LDM export (a student for UNETLoader)."""
    return model_io.save_unet_ldm(path, make_comfy_sd15_unet(seed), {"jdm.base": "comfy-detectable-sd15-fixture",
                                                                     **(metadata or {})}, dtype=dtype)


def write_comfy_detectable_controlnet(path: str | os.PathLike, *, seed: int = 0,
                                      metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a cldm-layout ControlNet matching `make_comfy_sd15_unet` (for ControlNetLoader)."""
    cn = make_controlnet(make_comfy_sd15_unet(seed), seed=seed + 3)
    return model_io.save_controlnet_ldm(path, cn, {"jdm.base": "comfy-detectable-sd15-fixture", **(metadata or {})},
                                        dtype=dtype)
