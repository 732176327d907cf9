"""The demo world's feature network: a small CNN trained on the procedural shapes.

It plays two roles that Inception / CLIP play for real images:
- FID features: the 64-d penultimate activations (`ShapeNet.features`), on which
  `jdm_train.evaluate` computes the Frechet distance. This is a feature network of the
  demo world only, trained here on that world (`python -m jdm_train.demo.features`); its
  FIDs are not comparable to Inception FIDs.
- A caption checker: heads for the background colour and, for every colour, which shape of
  that colour is present (or none), so that "do the teacher's samples follow their captions"
  is a number (`caption_agreement`).

Training uses mild blur and noise so that generated (slightly soft) images are judged by
what they show rather than by their sharpness.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from jdm_train.demo import FEATURES_PATH as ASSET
from jdm_train.demo import data

COLOUR_NAMES = tuple(sorted(data.COLOURS))
# Per colour: which shape of that colour is present, if any (the world never repeats a colour in an image).
SHAPE_CLASSES = ("none",) + data.SHAPES
BACKGROUND_NAMES = tuple(sorted(data.BACKGROUNDS))
FEATURE_DIM = 64

_CAPTION = re.compile(
    r"^a (\w+) (\w+)(?: (above|below|to the left of|to the right of) a (\w+) (\w+))? on a (\w+) background$")


def parse_caption(caption: str) -> tuple[str, list[tuple[str, str]], str | None]:
    """(background, [(colour, shape), ...], relation) of a demo-world caption."""
    m = _CAPTION.match(caption.strip())
    if m is None:
        raise ValueError(f"not a demo-world caption: {caption!r}; "
                         "expected e.g. 'a red circle above a blue square on a grey background'")
    c0, k0, rel, c1, k1, bg = m.groups()
    objs = [(c0, k0)] + ([(c1, k1)] if rel else [])
    for c, k in objs:
        if c not in data.COLOURS or k not in data.SHAPES:
            raise ValueError(f"unknown object '{c} {k}' in caption {caption!r}")
    if bg not in data.BACKGROUNDS:
        raise ValueError(f"unknown background {bg!r} in caption {caption!r}")
    return bg, objs, rel


def caption_targets(captions: list[str]) -> tuple[Tensor, Tensor]:
    """Background class (B,) and, per colour, the shape class (B, len(COLOUR_NAMES)) (0 = none)."""
    bgs, objs = [], torch.zeros(len(captions), len(COLOUR_NAMES), dtype=torch.long)
    for i, cap in enumerate(captions):
        bg, present, _ = parse_caption(cap)
        bgs.append(BACKGROUND_NAMES.index(bg))
        for colour, kind in present:
            objs[i, COLOUR_NAMES.index(colour)] = SHAPE_CLASSES.index(kind)
    return torch.tensor(bgs), objs


class ShapeNet(nn.Module):
    """64x64 RGB in [0, 1] -> 64-d features -> background logits (4), per-colour shape logits (6, 4)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),          # 32
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),      # 16
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),  # 8
            nn.Conv2d(2 * w, FEATURE_DIM, 3, stride=2, padding=1), nn.SiLU(),  # 4
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.background = nn.Linear(FEATURE_DIM, len(BACKGROUND_NAMES))
        self.objects = nn.Linear(FEATURE_DIM, len(COLOUR_NAMES) * len(SHAPE_CLASSES))

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 64). Other sizes are resized to 64x64 first."""
        if images.shape[-2:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
            images = F.interpolate(images, size=(data.IMAGE_SIZE, data.IMAGE_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.body(images * 2 - 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(images)
        return self.background(f), self.objects(f).unflatten(1, (len(COLOUR_NAMES), len(SHAPE_CLASSES)))


def load_feature_net(path: str | Path | None = None, device=None) -> ShapeNet:
    """The shipped (or given) feature network, in eval mode without gradients."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSET
    if not path.is_file():
        raise ValueError(f"feature network {path} not found; train it with `python -m jdm_train.demo.features --out {path}`")
    net = ShapeNet()
    net.load_state_dict(load_file(str(path)))
    return net.to(device or "cpu").eval().requires_grad_(False)


@torch.no_grad()
def caption_agreement(net: ShapeNet, images: Tensor, captions: list[str]) -> dict[str, float]:
    """How often images (B, 3, 64, 64) show what their captions say, as judged by `net`.

    - `background`: predicted background class equals the caption's.
    - `colours`: the set of colours with a shape is the caption's (shape kinds not compared:
      they are the first thing the small VAE blurs away).
    - `objects`: for every colour, the predicted shape of that colour (or none) is the caption's.
    - `all`: background and objects.
    """
    bg_t, obj_t = caption_targets(captions)
    bg_logits, obj_logits = net(images.float())
    pred = obj_logits.argmax(-1)
    bg_ok = bg_logits.argmax(1) == bg_t
    colour_ok = ((pred > 0) == (obj_t > 0)).all(1)
    obj_ok = (pred == obj_t).all(1)
    return {"background": bg_ok.float().mean().item(), "colours": colour_ok.float().mean().item(),
            "objects": obj_ok.float().mean().item(), "all": (bg_ok & obj_ok).float().mean().item()}


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random blur and noise, so generated images are judged by content, not sharpness."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=gen) * 0.8
    k = torch.arange(-3, 4, dtype=x.dtype)
    ker = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # (B, 7)
    xs = x.reshape(1, b * 3, *x.shape[-2:])
    kh = ker.repeat_interleave(3, 0)[:, None, None, :]
    xs = F.conv2d(F.pad(xs, (3, 3, 0, 0), mode="replicate"), kh, groups=b * 3)
    xs = F.conv2d(F.pad(xs, (0, 0, 3, 3), mode="replicate"), kh.transpose(-1, -2), groups=b * 3)
    x = xs.reshape_as(x)
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) * 0.05)
    return (x + noise).clamp(0, 1)


def train_feature_net(n_train: int = 5000, steps: int = 2500, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                      log=print) -> ShapeNet:
    """Cross-entropy on the background and on every colour's shape class."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    imgs, caps = data.batch(range(data.TRAIN_START, data.TRAIN_START + n_train))
    bg_t, obj_t = caption_targets(caps)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        bg_logits, obj_logits = net(_augment(imgs[idx], gen))
        loss = F.cross_entropy(bg_logits, bg_t[idx]) + F.cross_entropy(obj_logits.flatten(0, 1), obj_t[idx].flatten()) * 3
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"features step {step}/{steps} loss {loss.item():.4f}")
    return net.eval().requires_grad_(False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jdm_train.demo.features", description="Train the demo world's feature network.")
    p.add_argument("--out", type=Path, default=ASSET, help="safetensors file to write")
    p.add_argument("--n-train", type=int, default=5000, help="training images (indices from TRAIN_START)")
    p.add_argument("--steps", type=int, default=2500, help="optimisation steps")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    net = train_feature_net(args.n_train, args.steps, seed=args.seed)
    imgs, caps = data.batch(range(data.HELDOUT_START, data.HELDOUT_START + 1000))
    print(f"held-out agreement on real images: {caption_agreement(net, imgs, caps)} ({time.time() - t0:.0f}s)")
    from jdm_train import model_io

    model_io.save_state_dict(args.out, net.state_dict(),
                             {"jdm.kind": "demo_features",
                              "jdm.train_command": "python -m jdm_train.demo.features " + " ".join(argv or [])})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
