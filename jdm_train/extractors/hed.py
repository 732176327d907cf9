"""HED soft edges with the `ControlNetHED.pth` annotator weights (lllyasviel/Annotators).

The network is the Apache-2.0 re-implementation ControlNet 1.1 ships
(`annotator/hed`, `ControlNetHED_Apache2`): a learnt per-channel offset `norm`
subtracted from the RGB 0-255 input, then five VGG-like blocks (`block1`..`block5`,
each `convs.N` 3x3 conv + ReLU layers after a 2x2 max-pool from block 2 on) whose
1x1 `projection` gives a side output. The edge map is the sigmoid of the mean of the
five side outputs, bilinearly resized to the input size. Parameter names are kept so
the published weights load as they are.

`extract` is this map (optionally with ControlNet's `safe` quantisation), without the
annotator's final rounding to 8 bits (at most 1/255 apart); `soft` is the same map
with gradients, and `log_likelihood` uses BCE on its logits.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Extractor, Param, check_images, to_hint
from .weights import AnnotatorFiles, cached, find_annotator, load_state_dict

#: (output channels, conv layers) of block1..block5 in ControlNetHED.pth
HED_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
HED_FILES = ("ControlNetHED.pth", "ControlNetHED.safetensors")
HED_HOW_TO_GET = (
    "Download ControlNetHED.pth from https://huggingface.co/lllyasviel/Annotators "
    "(or a .safetensors conversion) into ComfyUI/models/annotators/."
)
HED_WEIGHTS = AnnotatorFiles("weights", HED_FILES, is_dir=False, what="HED weights", how_to_get=HED_HOW_TO_GET)


class DoubleConvBlock(nn.Module):
    """`layers` 3x3 conv + ReLU, and a 1x1 `projection` to one side-output channel."""

    def __init__(self, cin: int, cout: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if down_sampling:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNetwork(nn.Module):
    """`ControlNetHED_Apache2` with the same parameter names; `blocks` may be narrowed for tests."""

    def __init__(self, blocks: tuple[tuple[int, int], ...] = HED_BLOCKS) -> None:
        super().__init__()
        if len(blocks) != 5:
            raise ValueError(f"HED has 5 blocks, got {len(blocks)}")
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        cin = 3
        for i, (cout, layers) in enumerate(blocks, start=1):
            self.add_module(f"block{i}", DoubleConvBlock(cin, cout, layers))
            cin = cout

    def forward(self, rgb255: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) RGB in 0..255 -> five side outputs (B, 1, H / 2^k, W / 2^k)."""
        h = rgb255 - self.norm
        sides = []
        for i in range(1, 6):
            h, side = getattr(self, f"block{i}")(h, down_sampling=i > 1)
            sides.append(side)
        return sides

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> edge logits (B, 1, H, W): mean of the resized side outputs."""
        size = images.shape[-2:]
        sides = self(images * 255)
        # align_corners=False is cv2.resize's INTER_LINEAR, which the annotator uses.
        return torch.stack(
            [s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides]
        ).mean(0)

    @staticmethod
    def blocks_from_state_dict(sd: dict[str, torch.Tensor]) -> tuple[tuple[int, int], ...]:
        """Read (channels, layers) of each block from ControlNetHED.pth-style keys."""
        blocks = []
        for i in range(1, 6):
            idx = [int(m.group(1)) for k in sd if (m := re.fullmatch(rf"block{i}\.convs\.(\d+)\.weight", k))]
            if not idx:
                raise ValueError(f"not a ControlNetHED state dict: no block{i}.convs.N.weight keys")
            blocks.append((int(sd[f"block{i}.convs.0.weight"].shape[0]), max(idx) + 1))
        return tuple(blocks)


def load_hed(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> HEDNetwork:
    """HEDNetwork from a ControlNetHED.pth / .safetensors file, frozen, cached per (path, device, dtype)."""

    def build() -> HEDNetwork:
        sd = load_state_dict(path)
        net = HEDNetwork(HEDNetwork.blocks_from_state_dict(sd))
        net.load_state_dict(sd, strict=True)
        return net.requires_grad_(False).eval().to(device=device, dtype=dtype)

    stamp = Path(path).stat().st_mtime_ns  # a rewritten file is a new model
    return cached(("hed", str(path), stamp, str(torch.device(device)), dtype), build)


def safe_step(edges: torch.Tensor, step: int = 2) -> torch.Tensor:
    """ControlNet's `safe_step`: quantise to `step` levels (hides faint textures); clipped to 1."""
    return (torch.floor(edges * (step + 1)) / step).clamp(max=1)


class HED(Extractor):
    """HED soft edges (white edges on black), as ControlNet's `hed`/`softedge` annotator."""

    name = "hed"
    distance = "bce"
    #: the weight file a ComfyUI node offers as a list of the annotator folders' files
    ANNOTATOR = HED_WEIGHTS
    PARAMS = (
        Param("safe", False, tooltip="quantise the edge map as ControlNet's 'safe' HED (exact face only)"),
        Param("weights", HED_FILES[0], tooltip="file name or path of ControlNetHED.pth / .safetensors"),
        Param("comfyui_root", "", tooltip="ComfyUI folder to search models/annotators in"),
        Param("chunk", 4, 1, 256, 1, tooltip="images per forward pass in extract (memory bound)"),
    )

    def weights_path(self):
        """Resolve the weight file (raises MissingWeightsError listing where it looked)."""
        name = self.params["weights"]
        names = [name] if name not in HED_FILES else list(HED_FILES)
        return find_annotator(names, is_dir=False, what=HED_WEIGHTS.what, how_to_get=HED_WEIGHTS.how_to_get,
                              comfyui_root=self.params["comfyui_root"] or None)

    def network(self, like: torch.Tensor) -> HEDNetwork:
        return load_hed(self.weights_path(), like.device, like.dtype)

    def soft_logits(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "hed")
        return to_hint(self.network(x).logits(x))

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, "hed")
        net = self.network(x)
        with torch.no_grad():
            edges = torch.cat([torch.sigmoid(net.logits(c)) for c in x.split(self.params["chunk"])])
        if self.params["safe"]:
            edges = safe_step(edges)
        return to_hint(edges)
