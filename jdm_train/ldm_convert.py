"""State-dict key conversion between diffusers and the original LDM (Stable Diffusion) layout.

Pure functions over dicts of tensors: nothing here reads or writes a file (that is
`model_io`'s job). Covers

* architecture inference from LDM weights (`infer_unet_config`, `infer_vae_config`,
  `infer_clip_config`, `infer_controlnet_config`), fed to diffusers' own LDM->diffusers
  converters by `model_io`;
* diffusers->LDM for the UNet, VAE, CLIP text encoder and ControlNet (cldm), the layouts
  ComfyUI's UNETLoader, CheckpointLoaderSimple and ControlNetLoader read;
* ComfyUI's TAESD <-> diffusers AutoencoderTiny, and kohya LoRA naming (`lora_to_comfyui`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

# SD1.x UNets (and ComfyUI's SD15 model config) always use 8 attention heads.
SD1_ATTENTION_HEADS = 8
SD1_CONTEXT_DIM = 768
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CONTROL_PREFIX = "control_model."
# diffusers' ControlNet conditioning embedding that ComfyUI's cldm ControlNet hard-codes.
CLDM_HINT_CHANNELS = (16, 32, 96, 256)
# SD1.x VAE latents times this have about unit variance (diffusers' `scaling_factor`; ComfyUI's
# LATENT holds the unscaled latents).
SD1_LATENT_SCALE = 0.18215
# SD1's CLIP-L text config; its shape fields are replaced by those read off the weights.
_CLIP_L_CONFIG = Path(__file__).resolve().parent / "configs" / "clip_l_text_config.json"


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``sd`` whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def context_dim(unet_sd: Mapping[str, torch.Tensor]) -> int | None:
    """Cross-attention context width of bare LDM UNet keys (768 for SD1.x), None without cross-attention."""
    for k, v in unet_sd.items():
        if k.endswith("attn2.to_k.weight"):
            return int(v.shape[1])
    return None


# --------------------------------------------------------------------------- architecture from weights


def infer_unet_config(unet_sd: Mapping[str, torch.Tensor], attention_heads: int = SD1_ATTENTION_HEADS) -> dict:
    """diffusers ``UNet2DConditionModel`` config read off bare LDM UNet keys.

    Levels, widths, res blocks per level, attention levels, transformer depths, context
    dim and linear/conv projections come from the weights; the head count cannot (it does
    not change any shape) and defaults to SD1's 8.
    """
    w = unet_sd["input_blocks.0.0.weight"]
    levels: list[dict] = [{"res": 0, "ch": None, "depth": 0}]
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in unet_sd:
            levels.append({"res": 0, "ch": None, "depth": 0})
        elif f"input_blocks.{i}.0.in_layers.0.weight" in unet_sd:
            lv = levels[-1]
            lv["res"] += 1
            lv["ch"] = int(unet_sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
            depth = len({k.split(".")[4] for k in unet_sd if k.startswith(f"input_blocks.{i}.1.transformer_blocks.")})
            lv["depth"] = max(lv["depth"], depth)
        else:
            break
        i += 1
    n = levels[0]["res"]
    if n == 0 or any(lv["res"] != n or lv["ch"] is None for lv in levels):
        raise ValueError(f"irregular UNet: res blocks per level {[lv['res'] for lv in levels]}")
    if "middle_block.1.proj_in.weight" not in unet_sd:
        raise ValueError("UNet has no cross-attention middle block (middle_block.1); not an SD1.x UNet")
    mid_depth = len({k.split(".")[3] for k in unet_sd if k.startswith("middle_block.1.transformer_blocks.")})
    depths = [lv["depth"] or 1 for lv in levels]
    if levels[-1]["depth"] == 0:
        depths[-1] = mid_depth  # diffusers takes the mid block depth from the last level
    elif levels[-1]["depth"] != mid_depth:
        raise ValueError(f"middle block depth {mid_depth} != last level depth {levels[-1]['depth']}")
    down = ["CrossAttnDownBlock2D" if lv["depth"] else "DownBlock2D" for lv in levels]
    up = ["CrossAttnUpBlock2D" if lv["depth"] else "UpBlock2D" for lv in reversed(levels)]
    return {
        "sample_size": 64,
        "in_channels": int(w.shape[1]),
        "out_channels": int(unet_sd["out.2.weight"].shape[0]) if "out.2.weight" in unet_sd else int(w.shape[1]),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [lv["ch"] for lv in levels],
        "layers_per_block": n,
        "cross_attention_dim": context_dim(unet_sd),
        "attention_head_dim": attention_heads,
        "use_linear_projection": unet_sd["middle_block.1.proj_in.weight"].ndim == 2,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
    }


def infer_vae_config(vae_sd: Mapping[str, torch.Tensor]) -> dict:
    """diffusers ``AutoencoderKL`` config read off bare LDM VAE keys (``encoder.*``, ``decoder.*``)."""
    ch = int(vae_sd["encoder.conv_in.weight"].shape[0])
    nlev = len({k.split(".")[2] for k in vae_sd if k.startswith("encoder.down.")})
    nres = len({k.split(".")[4] for k in vae_sd if k.startswith("encoder.down.0.block.")})
    widths = [int(vae_sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(nlev)]
    return {
        "sample_size": 512,
        "in_channels": int(vae_sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae_sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * nlev,
        "up_block_types": ["UpDecoderBlock2D"] * nlev,
        "block_out_channels": widths if widths[0] == ch else [ch] + widths[1:],
        "latent_channels": int(vae_sd["decoder.conv_in.weight"].shape[1]),
        "layers_per_block": nres,
        "scaling_factor": SD1_LATENT_SCALE,
    }


def clip_heads_for(hidden: int) -> int:
    """Head count for a CLIP text encoder of width ``hidden``.

    CLIP-L (768) and OpenCLIP use 64-dim heads; widths below 64 (test models) get one head.
    A ``jdm.text_heads`` metadata entry, written by `save_sd1_checkpoint`, overrides this.
    """
    return max(1, hidden // 64) if hidden % 64 == 0 else 1


def infer_clip_config(clip_sd: Mapping[str, torch.Tensor], heads: int | None = None) -> dict:
    """transformers ``CLIPTextConfig`` kwargs read off ``text_model.*`` keys."""
    tok = clip_sd["text_model.embeddings.token_embedding.weight"]
    pos = clip_sd["text_model.embeddings.position_embedding.weight"]
    layers = len({k.split(".")[3] for k in clip_sd if k.startswith("text_model.encoder.layers.")})
    hidden = int(tok.shape[1])
    cfg = json.loads(_CLIP_L_CONFIG.read_text())
    cfg.update(
        vocab_size=int(tok.shape[0]), hidden_size=hidden, max_position_embeddings=int(pos.shape[0]),
        num_hidden_layers=layers, num_attention_heads=heads or clip_heads_for(hidden),
        intermediate_size=int(clip_sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        projection_dim=hidden)
    cfg.pop("model_type", None)
    return cfg


def infer_controlnet_config(cn_sd: Mapping[str, torch.Tensor], attention_heads: int = SD1_ATTENTION_HEADS) -> dict:
    """diffusers ``ControlNetModel`` config read off bare cldm keys (``input_hint_block.*``,
    ``zero_convs.*`` and the UNet encoder keys), in the form diffusers' converter takes."""
    ucfg = infer_unet_config(cn_sd, attention_heads)
    convs = sorted(int(k.split(".")[1]) for k in cn_sd if re.fullmatch(r"input_hint_block\.\d+\.weight", k))
    blocks = convs[1:-1]
    # conv_in, then pairs of (same-width conv, strided conv to the next width)
    hint = [int(cn_sd["input_hint_block.0.weight"].shape[0])] + [
        int(cn_sd[f"input_hint_block.{b}.weight"].shape[0]) for b in blocks[1::2]]
    config = {k: ucfg[k] for k in ("in_channels", "down_block_types", "block_out_channels", "layers_per_block",
                                   "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                                   "transformer_layers_per_block")}
    config["conditioning_channels"] = int(cn_sd["input_hint_block.0.weight"].shape[1])
    config["conditioning_embedding_out_channels"] = tuple(hint)
    return config


# --------------------------------------------------------------------------- LDM -> diffusers


def convert_clip_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``text_model.*`` keys of the CLIP-L encoder in an LDM checkpoint (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    clip = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)})
    # checkpoints saved with transformers < 4.0 lack the text_model. level
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip.items()}


# --------------------------------------------------------------------------- diffusers -> LDM
# diffusers ships only LDM->diffusers converters; these are their inverses, checked by
# round trip through diffusers' own converters in tests/test_model_io.py.

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP_TO_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_to_ldm(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_TO_LDM.get(head, head)}.{tail}"


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _down_mid_to_ldm(k: str, n: int) -> str | None:
    """LDM key of a diffusers down-block / mid-block / stem key (shared by UNet and ControlNet)."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * (n + 1) + j
        return f"input_blocks.{idx}.0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", k):
        return f"middle_block.{2 * int(m[1])}.{_resnet_to_ldm(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k):
        return f"middle_block.1.{m[1]}"
    head, _, param = k.rpartition(".")
    if head in _UNET_TOP_TO_LDM and head != "conv_norm_out" and head != "conv_out":
        return f"{_UNET_TOP_TO_LDM[head]}.{param}"
    return None


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare LDM UNet keys (``input_blocks.*``, ...) from a diffusers UNet2DConditionModel state dict."""
    n = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    up_attn = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = _down_mid_to_ldm(k, n)
        if new is None:
            if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
                i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
                idx = i * (n + 1) + j
                new = f"output_blocks.{idx}.0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
            elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
                i = int(m[1])
                new = f"output_blocks.{i * (n + 1) + n}.{2 if i in up_attn else 1}.conv.{m[2]}"
            elif k.rpartition(".")[0] in ("conv_norm_out", "conv_out"):
                head, _, param = k.rpartition(".")
                new = f"{_UNET_TOP_TO_LDM[head]}.{param}"
            else:
                raise ValueError(f"UNet key {k!r} has no SD1.x LDM equivalent (class/addition embeddings are not SD1.x)")
        out[new] = v
    return out


def controlnet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cldm keys (``control_model.*``: input_hint_block, zero_convs, middle_block_out) from a
    diffusers ControlNetModel state dict."""
    n = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    nb = _count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = _down_mid_to_ldm(k, n)
        if new is None:
            if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", k):
                new = f"zero_convs.{m[1]}.0.{m[2]}"
            elif m := re.fullmatch(r"controlnet_mid_block\.(.+)", k):
                new = f"middle_block_out.0.{m[1]}"
            elif m := re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(.+)", k):
                new = f"input_hint_block.0.{m[1]}"
            elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", k):
                new = f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
            elif m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.+)", k):
                new = f"input_hint_block.{2 * (nb + 1)}.{m[1]}"
            else:
                raise ValueError(f"ControlNet key {k!r} has no SD1.x cldm equivalent")
        out[CONTROL_PREFIX + new] = v
    return out


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare LDM VAE keys (``encoder.down.*``, ``decoder.up.*``, ...) from a diffusers AutoencoderKL
    state dict; attention projections become 1x1 convs as in the original checkpoints."""
    nlev = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = None
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            new = f"decoder.up.{nlev - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
            new = f"decoder.up.{nlev - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", k):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", k):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN_TO_LDM[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and v.ndim == 2:
                v = v[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", k):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)|(post_)?quant_conv\.(.+)", k):
            new = k
        else:
            raise ValueError(f"VAE key {k!r} has no LDM equivalent")
        if "nin_shortcut" not in new:
            new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[new] = v
    return out


def taesd_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderTiny keys from ComfyUI's TAESD (``taesd_encoder.*``, ``taesd_decoder.*``).

    ComfyUI's decoder starts with a parameter-free Clamp module, so its indices are one
    above diffusers' ``decoder.layers``.
    """
    out = {}
    for k, v in sd.items():
        if k.startswith("taesd_encoder."):
            out["encoder.layers." + k[len("taesd_encoder."):]] = v
        elif k.startswith("taesd_decoder."):
            idx, _, rest = k[len("taesd_decoder."):].partition(".")
            out[f"decoder.layers.{int(idx) - 1}.{rest}"] = v
    return out


def taesd_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `taesd_to_diffusers`, plus ComfyUI's ``vae_scale``/``vae_shift`` set for SD1 latents."""
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder.layers."):
            out["taesd_encoder." + k[len("encoder.layers."):]] = v
        elif k.startswith("decoder.layers."):
            idx, _, rest = k[len("decoder.layers."):].partition(".")
            out[f"taesd_decoder.{int(idx) + 1}.{rest}"] = v
        else:
            raise ValueError(f"AutoencoderTiny key {k!r} has no TAESD equivalent")
    # ComfyUI hands TAESD unscaled latents; TAESD works on scaled ones
    out["vae_scale"] = torch.tensor(SD1_LATENT_SCALE)
    out["vae_shift"] = torch.tensor(0.0)
    return out


def clip_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cond_stage_model.transformer.text_model.*`` keys from a CLIPTextModel state dict
    (with or without transformers 4's ``text_model.`` level)."""
    return {CLIP_PREFIX + "text_model." + k.removeprefix("text_model."): v
            for k, v in sd.items() if not k.endswith("position_ids")}


# --------------------------------------------------------------------------- LoRA


def lora_to_comfyui(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """kohya naming (`lora_unet_<diffusers module with _>.lora_down/lora_up/alpha`), which ComfyUI's
    `model_lora_keys_unet` maps onto the LDM UNet (LoraLoaderModelOnly).

    ``state`` holds diffusers-named ``<module>.lora_down.weight`` / ``<module>.lora_up.weight``
    tensors (`denoisers.student_lora_state`); every module gets the same ``alpha``."""
    out = {}
    for key, value in state.items():
        module, _, kind = key.partition(".lora_")
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.lora_{kind}"] = value
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out
