"""Monocular depth as ControlNet's depth maps: normalised inverse depth, near is bright.

A transformers depth model (`DPTForDepthEstimation`, e.g. Intel/dpt-hybrid-midas, the
MiDaS model of ControlNet's depth annotator; or Depth Anything) is read from a local
folder (config.json + weights) under the annotator folders. The preprocessing follows
the folder's `preprocessor_config.json` (size, keep_aspect_ratio, ensure_multiple_of,
image_mean/std) with DPT's defaults when it is absent; the prediction (relative
inverse depth) is resized back to the input size and min-max normalised per image.
The whole path is differentiable: `soft` is `extract` with gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Extractor, Param, check_images, to_hint
from .weights import AnnotatorFiles, cached, find_annotator

DEPTH_FOLDERS = ("dpt-hybrid-midas", "Intel/dpt-hybrid-midas", "depth-anything-small-hf", "Depth-Anything-V2-Small-hf")
DEPTH_HOW_TO_GET = (
    "Put a transformers depth model folder (config.json + model.safetensors [+ preprocessor_config.json]), "
    "e.g. https://huggingface.co/Intel/dpt-hybrid-midas, into ComfyUI/models/annotators/dpt-hybrid-midas/."
)
DEPTH_MODEL = AnnotatorFiles("model", DEPTH_FOLDERS, is_dir=True, what="depth model folder", how_to_get=DEPTH_HOW_TO_GET)


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


class DepthModel:
    """A frozen transformers depth model with its preprocessing, on one device/dtype."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForDepthEstimation

        self.model = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True)
        self.model.requires_grad_(False).eval().to(device=device, dtype=dtype)
        self.pre = _preprocessor(folder)
        self.mean = torch.tensor(self.pre["mean"], device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(self.pre["std"], device=device, dtype=dtype).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, resolution: int = 0) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised inverse depth (B, 1, H, W) in [0, 1]."""
        h, w = images.shape[-2:]
        pre = dict(self.pre, height=resolution, width=resolution) if resolution else self.pre
        size = model_input_size(h, w, pre)
        mode = "bicubic" if pre["bicubic"] else "bilinear"
        x = F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=size[0] < h or size[1] < w)
        depth = self.model(pixel_values=(x - self.mean) / self.std).predicted_depth[:, None]
        depth = F.interpolate(depth, size=(h, w), mode="bicubic", align_corners=False)
        lo = depth.amin((2, 3), keepdim=True)
        hi = depth.amax((2, 3), keepdim=True)
        return (depth - lo) / (hi - lo).clamp_min(torch.finfo(depth.dtype).tiny ** 0.5)


def load_depth(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DepthModel:
    """DepthModel from a transformers folder, cached per (folder, device, dtype)."""
    stamp = max((p.stat().st_mtime_ns for p in folder.iterdir()), default=0)
    key = ("depth", str(folder), stamp, str(torch.device(device)), dtype)
    return cached(key, lambda: DepthModel(folder, torch.device(device), dtype))


class Depth(Extractor):
    """Normalised inverse depth (near = bright), as ControlNet's depth annotator."""

    name = "depth"
    distance = "l1"
    extract_is_differentiable = True
    #: the model folder a ComfyUI node offers as a list of the annotator folders' model folders
    ANNOTATOR = DEPTH_MODEL
    PARAMS = (
        Param("resolution", 0, 0, 2048, 32, tooltip="model input size; 0 = the model's own (384 for DPT)"),
        Param("model", DEPTH_FOLDERS[0], tooltip="folder name or path of a transformers depth model", widget=False),
        Param("comfyui_root", "", tooltip="ComfyUI folder to search models/annotators in", widget=False),
        Param("chunk", 4, 1, 256, 1, tooltip="images per forward pass in extract (memory bound)", widget=False),
    )

    def model_path(self) -> Path:
        """Resolve the model folder (raises MissingWeightsError listing where it looked)."""
        name = self.params["model"]
        path = find_annotator(DEPTH_MODEL.candidates(name), is_dir=True, what=DEPTH_MODEL.what,
                              how_to_get=DEPTH_MODEL.how_to_get, comfyui_root=self.params["comfyui_root"] or None)
        if not (path / "config.json").is_file():
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
