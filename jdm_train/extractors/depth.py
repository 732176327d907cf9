"""Monocular depth as ControlNet's depth maps: normalised inverse depth, near is bright.

Two sources of the model, both run by transformers' `DPTForDepthEstimation`:

- a transformers folder (config.json + weights; e.g. Intel/dpt-hybrid-midas, or Depth
  Anything) under the annotator folders. The preprocessing follows the folder's
  `preprocessor_config.json` (size, keep_aspect_ratio, ensure_multiple_of, image_mean/std),
  with DPT's defaults when it is absent;
- the MiDaS v3 DPT-hybrid file of ControlNet's depth annotator, `dpt_hybrid-midas-501f0c75.pt`
  (lllyasviel/Annotators, as comfyui_controlnet_aux downloads it, or a .safetensors with the
  same keys): the state dict of MiDaS's `DPTDepthModel(backbone="vitb_rn50_384",
  non_negative=True)`. Its keys are renamed to transformers' hybrid DPT (`midas_to_transformers`,
  the mapping of transformers' `convert_dpt_hybrid_to_pytorch.py`), whose BiT backbone is the
  original's timm ResNetV2 (ResNet-50's stem and first 3 stages). Input: 384 x 384 (the model's
  own size), RGB normalised with mean = std = 0.5 as in MiDaS's DPT transforms.

The prediction (relative inverse depth, non-negative) is resized back to the input size and
min-max normalised per image. The whole path is differentiable: `soft` is `extract` with gradients.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import torch
import torch.nn.functional as F

from .base import Extractor, Param, check_images, to_hint
from .weights import AnnotatorFiles, cached, find_annotator, load_state_dict

if TYPE_CHECKING:
    from transformers import DPTConfig, DPTForDepthEstimation

DEPTH_FOLDERS = ("dpt-hybrid-midas", "Intel/dpt-hybrid-midas", "depth-anything-small-hf", "Depth-Anything-V2-Small-hf")
#: ControlNet's MiDaS DPT-hybrid weights, as lllyasviel/Annotators names them (or a .safetensors conversion)
MIDAS_FILES = ("dpt_hybrid-midas-501f0c75.pt", "dpt_hybrid-midas-501f0c75.safetensors")
DEPTH_HOW_TO_GET = (
    "Put dpt_hybrid-midas-501f0c75.pt (from https://huggingface.co/lllyasviel/Annotators; comfyui_controlnet_aux "
    "keeps it in custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators/, which is searched too) into "
    "ComfyUI/models/annotators/, or a transformers depth model folder (config.json + model.safetensors "
    "[+ preprocessor_config.json]), e.g. https://huggingface.co/Intel/dpt-hybrid-midas, into "
    "ComfyUI/models/annotators/dpt-hybrid-midas/."
)
DEPTH_MODEL = AnnotatorFiles("model", DEPTH_FOLDERS, is_dir=True, what="depth model folder", how_to_get=DEPTH_HOW_TO_GET,
                             files=MIDAS_FILES)

# -- MiDaS DPT-hybrid file -> transformers ------------------------------------------------

_VIT = "pretrained.model."
_RESNET = _VIT + "patch_embed.backbone."
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
#: MiDaS name pattern -> transformers name, for every parameter of the hybrid DPT; `_split_qkv` splits `attn.qkv`.
_MIDAS_RULES: tuple[tuple[str, Callable[[re.Match], str]], ...] = (
    (r"pretrained\.model\.cls_token", lambda m: "dpt.embeddings.cls_token"),
    (r"pretrained\.model\.pos_embed", lambda m: "dpt.embeddings.position_embeddings"),
    (r"pretrained\.model\.patch_embed\.proj\.(weight|bias)", lambda m: f"dpt.embeddings.projection.{m[1]}"),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.conv\.weight",
     lambda m: "dpt.embeddings.backbone.bit.embedder.convolution.weight"),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.norm\.(weight|bias)",
     lambda m: f"dpt.embeddings.backbone.bit.embedder.norm.{m[1]}"),
    (r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.((?:downsample\.)?(?:conv|norm)\d?\.\w+)",
     lambda m: f"dpt.embeddings.backbone.bit.encoder.stages.{m[1]}.layers.{m[2]}.{m[3]}"),
    (r"pretrained\.model\.blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
     lambda m: f"dpt.encoder.layer.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"),
    (r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", lambda m: f"dpt.encoder.layer.{m[1]}.qkv.{m[2]}"),
    (r"pretrained\.model\.norm\.(weight|bias)", lambda m: f"dpt.layernorm.{m[1]}"),
    # act_postprocessN: 0 readout projection, 3 1x1 conv, 4 resampling; 1 and 2 (the ResNet stages'
    # features) are Identities in the hybrid
    (r"pretrained\.act_postprocess([34])\.0\.project\.0\.(weight|bias)",
     lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0.{m[2]}"),
    (r"pretrained\.act_postprocess([34])\.3\.(weight|bias)",
     lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection.{m[2]}"),
    (r"pretrained\.act_postprocess4\.4\.(weight|bias)", lambda m: f"neck.reassemble_stage.layers.3.resize.{m[1]}"),
    (r"scratch\.layer(\d)_rn\.weight", lambda m: f"neck.convs.{int(m[1]) - 1}.weight"),
    # refinenet4 runs first: it is transformers' fusion layer 0
    (r"scratch\.refinenet(\d)\.out_conv\.(weight|bias)",
     lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.projection.{m[2]}"),
    (r"scratch\.refinenet(\d)\.resConfUnit(\d)\.conv(\d)\.(weight|bias)",
     lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.residual_layer{m[2]}.convolution{m[3]}.{m[4]}"),
    (r"scratch\.output_conv\.(\d)\.(weight|bias)", lambda m: f"head.head.{m[1]}.{m[2]}"),
)
#: timm's ImageNet classifier of the ViT, saved in the file but not part of MiDaS's network
_MIDAS_UNUSED = re.compile(r"pretrained\.model\.head\.(weight|bias)")
#: MiDaS's `hooks` of `vitb_rn50_384`: ResNet stages 0 and 1, ViT blocks 8 and 11
MIDAS_HYBRID_HOOKS = (0, 1, 8, 11)


def _split_qkv(sd: dict[str, torch.Tensor]) -> None:
    """timm's fused `qkv` Linear (rows: query, key, value) -> transformers' three Linears, in place."""
    for key in [k for k in sd if ".qkv." in k]:
        prefix, kind = key.rsplit(".qkv.", 1)
        for name, part in zip(("query", "key", "value"), sd.pop(key).chunk(3, dim=0)):
            sd[f"{prefix}.attention.attention.{name}.{kind}"] = part


def midas_to_transformers(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Keys of MiDaS's DPT-hybrid state dict -> `DPTForDepthEstimation(DPTConfig(is_hybrid=True))` keys.

    Every key must be one of the network's (or timm's unused classifier `pretrained.model.head`);
    others raise ValueError naming them."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        for pattern, name in _MIDAS_RULES:
            m = re.fullmatch(pattern, key)
            if m:
                out[name(m)] = value
                break
        else:
            if not _MIDAS_UNUSED.fullmatch(key):
                unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: not a MiDaS DPT-hybrid state dict ({MIDAS_FILES[0]}); unexpected keys "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    _split_qkv(out)
    return out


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index captured by `pattern` among the keys (0 if none)."""
    found = [int(m[1]) for m in (re.fullmatch(pattern, k) for k in sd) if m]
    return max(found) + 1 if found else 0


def midas_hybrid_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> DPTConfig:
    """The `DPTConfig(is_hybrid=True)` of a MiDaS DPT-hybrid state dict, read off its tensor shapes.

    Fixed by the architecture, not by the file: patch stride 16 (the ResNet's), 64 channels per
    attention head (ViT-B/16), 32 GroupNorm groups and bottleneck blocks (timm's ResNetV2), LayerNorm
    eps 1e-6 (timm's ViT), MiDaS's hooks, readout 'project', reassemble factors (1, 1, 1, 0.5) and
    fusion units without batch norm."""
    from transformers import BitConfig, DPTConfig

    def shape(key: str) -> torch.Size:
        if key not in sd:
            raise ValueError(f"{source}: not a MiDaS DPT-hybrid state dict ({MIDAS_FILES[0]}); missing {key!r}")
        return sd[key].shape

    hidden = shape(_VIT + "cls_token")[-1]
    layers = _count(sd, r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.weight")
    stages = _count(sd, r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\..*")
    patches = shape(_VIT + "pos_embed")[1] - 1
    grid = math.isqrt(patches)
    if layers != 12 or stages != 3 or grid * grid != patches or hidden % 64:
        raise ValueError(f"{source}: not a MiDaS DPT-hybrid (12 ViT blocks, 3 ResNet stages, a square grid of "
                         f"patches, 64 channels per head); found {layers} blocks, {stages} stages, {patches} patches, "
                         f"width {hidden}")
    depths = [_count(sd, rf"pretrained\.model\.patch_embed\.backbone\.stages\.{s}\.blocks\.(\d+)\..*")
              for s in range(stages)]
    widths = [shape(f"{_RESNET}stages.{s}.blocks.0.conv3.weight")[0] for s in range(stages)]
    backbone = BitConfig(layer_type="bottleneck", global_padding="same", embedding_dynamic_padding=True,
                         embedding_size=shape(_RESNET + "stem.conv.weight")[0], depths=depths, hidden_sizes=widths,
                         num_groups=32, out_features=[f"stage{s + 1}" for s in range(stages)])
    return DPTConfig(
        is_hybrid=True, backbone_config=backbone, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, intermediate_size=shape(_VIT + "blocks.0.mlp.fc1.weight")[0],
        image_size=16 * grid, patch_size=16, layer_norm_eps=1e-6, backbone_out_indices=list(MIDAS_HYBRID_HOOKS),
        readout_type="project", reassemble_factors=[1, 1, 1, 0.5],
        neck_hidden_sizes=[shape(f"scratch.layer{i}_rn.weight")[1] for i in range(1, 5)],
        fusion_hidden_size=shape("scratch.layer1_rn.weight")[0], backbone_featmap_shape=[1, widths[-1], grid, grid],
        use_batch_norm_in_fusion_residual=False, use_auxiliary_head=False,
    )


def load_midas_hybrid(path: Path) -> DPTForDepthEstimation:
    """`DPTForDepthEstimation` holding the weights of a MiDaS DPT-hybrid file (.pt/.pth or .safetensors)."""
    from transformers import DPTForDepthEstimation

    sd = load_state_dict(path)
    if isinstance(sd.get("model"), dict):  # MiDaS's training checkpoints: {"model": ..., "optimizer": ...}
        sd = sd["model"]
    config = midas_hybrid_config(sd, str(path))
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = DPTForDepthEstimation(config)
    weights = midas_to_transformers(sd, str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: not a MiDaS DPT-hybrid state dict; in transformers' names, missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, of other shapes {wrong[:5]}")
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def _preprocessor(folder: Path) -> dict:
    """Resize/normalise settings of DPTImageProcessor, from the folder or DPT's defaults."""
    cfg = {}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
    size = cfg.get("size", {"height": 384, "width": 384})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    return {
        "height": int(size.get("height", size.get("shortest_edge", 384))),
        "width": int(size.get("width", size.get("shortest_edge", 384))),
        "keep_aspect_ratio": bool(cfg.get("keep_aspect_ratio", False)),
        "multiple": int(cfg.get("ensure_multiple_of", 1)),
        "mean": tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
        "std": tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
        "bicubic": int(cfg.get("resample", 3)) == 3,  # PIL: 2 bilinear, 3 bicubic
    }


def _multiple(x: float, m: int) -> int:
    return max(m, int(round(x / m) * m))


def model_input_size(h: int, w: int, pre: dict) -> tuple[int, int]:
    """DPTImageProcessor's output size for an (h, w) image (`get_resize_output_image_size`)."""
    sh, sw = pre["height"] / h, pre["width"] / w
    if pre["keep_aspect_ratio"]:
        # scale as little as possible: keep the factor that is closer to 1
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh
    return _multiple(sh * h, pre["multiple"]), _multiple(sw * w, pre["multiple"])


def _midas_preprocessor(image_size: int) -> dict:
    """MiDaS's DPT input: the model's square size, bicubic, RGB normalised with mean = std = 0.5."""
    return {"height": image_size, "width": image_size, "keep_aspect_ratio": False, "multiple": 1,
            "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "bicubic": True}


class DepthModel:
    """A frozen transformers depth model with its preprocessing, on one device/dtype; from a
    transformers folder or a MiDaS DPT-hybrid file."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        if path.is_file():
            self.model = load_midas_hybrid(path)
            self.pre = _midas_preprocessor(self.model.config.image_size)
        else:
            from transformers import AutoModelForDepthEstimation

            self.model = AutoModelForDepthEstimation.from_pretrained(str(path), local_files_only=True)
            self.pre = _preprocessor(path)
        self.model.requires_grad_(False).eval().to(device=device, dtype=dtype)
        self.mean = torch.tensor(self.pre["mean"], device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(self.pre["std"], device=device, dtype=dtype).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, resolution: int = 0) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised inverse depth (B, 1, H, W) in [0, 1]."""
        h, w = images.shape[-2:]
        if getattr(self.model.config, "is_hybrid", False) and resolution not in (0, self.model.config.image_size):
            # transformers' hybrid DPT refuses any other input size (it does not resize its position embeddings)
            size = self.model.config.image_size
            raise ValueError(f"depth: resolution={resolution}, but a DPT-hybrid model takes {size} x {size} images "
                             f"only; use 0 (its own size) or {size}")
        pre = dict(self.pre, height=resolution, width=resolution) if resolution else self.pre
        size = model_input_size(h, w, pre)
        mode = "bicubic" if pre["bicubic"] else "bilinear"
        x = F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=size[0] < h or size[1] < w)
        depth = self.model(pixel_values=(x - self.mean) / self.std).predicted_depth[:, None]
        depth = F.interpolate(depth, size=(h, w), mode="bicubic", align_corners=False)
        lo = depth.amin((2, 3), keepdim=True)
        hi = depth.amax((2, 3), keepdim=True)
        return (depth - lo) / (hi - lo).clamp_min(torch.finfo(depth.dtype).tiny ** 0.5)


def load_depth(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DepthModel:
    """DepthModel from a transformers folder or a MiDaS DPT-hybrid file, cached per (path, device, dtype)."""
    files = [path] if path.is_file() else list(path.iterdir())
    stamp = max((p.stat().st_mtime_ns for p in files), default=0)
    key = ("depth", str(path), stamp, str(torch.device(device)), dtype)
    return cached(key, lambda: DepthModel(path, torch.device(device), dtype))


class Depth(Extractor):
    """Normalised inverse depth (near = bright), as ControlNet's depth annotator."""

    name = "depth"
    distance = "l1"
    #: the model folder a ComfyUI node offers as a list of the annotator folders' model folders
    ANNOTATOR = DEPTH_MODEL
    PARAMS = (
        Param("resolution", 0, 0, 2048, 32, tooltip="model input size; 0 = the model's own (384 for DPT)"),
        Param("model", DEPTH_FOLDERS[0], tooltip=f"folder name or path of a transformers depth model, or {MIDAS_FILES[0]}"),
        Param("comfyui_root", "", tooltip="ComfyUI folder to search models/annotators in"),
        Param("chunk", 4, 1, 256, 1, tooltip="images per forward pass in extract (memory bound)"),
    )

    def model_path(self) -> Path:
        """Resolve the model folder or MiDaS file (raises MissingWeightsError listing where it looked)."""
        name = self.params["model"]
        path = find_annotator(DEPTH_MODEL.candidates(name), is_dir=True, or_file=True, what=DEPTH_MODEL.what,
                              how_to_get=DEPTH_MODEL.how_to_get, comfyui_root=self.params["comfyui_root"] or None)
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a transformers model folder: no config.json")
        return path

    def network(self, like: torch.Tensor) -> DepthModel:
        return load_depth(self.model_path(), like.device, like.dtype)

    def soft(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "depth")
        return to_hint(self.network(x)(x, self.params["resolution"]))

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "depth")
        net = self.network(x)
        with torch.no_grad():
            return to_hint(torch.cat([net(c, self.params["resolution"]) for c in x.split(self.params["chunk"])]))
