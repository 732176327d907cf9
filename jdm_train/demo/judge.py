"""Does a demo image show what its caption says? A classifier that needs no training.

The demo world draws flat shapes of known colours, kinds and orientations (`jdm_train.demo.data`),
so an image can be read back by the world's own rules instead of by a learnt network, which a
generator could fool and whose errors would be mixed into every score:

1. **Background**: every pixel goes to its nearest colour (RGB distance) among the backgrounds
   and the shape colours; the background is the background colour with the most pixels.
2. **Colours**: given the caption's background, every pixel is read as a blend of that
   background and the one shape colour whose blend line passes nearest (within `BLEND_DISTANCE`);
   the blend weight is the pixel's coverage by that colour, so that a soft edge between blue and
   grey is part-blue, not purple. A colour has a shape when at least `MIN_AREA` pixels are mostly
   (coverage >= 0.5) that colour.
3. **Kind**: the coverage of a colour is compared with a circle, a square and a triangle drawn by
   `data.render` with the same area and centroid; the kind is the template of highest soft IoU
   (sum of minima over sum of maxima), provided that is at least `MIN_IOU`, else the shape
   counts as no kind. A heavily blurred shape fades over many pixels and matches no sharp
   template, so blobs are not counted as circles.

On 256 held-out real images every score is 1.0 (the lowest IoU of a real shape is 0.92); after
the feature network's blur-and-noise augmentation kinds score 0.99 and the rest 1.0; with each
image given another image's caption, backgrounds score 0.26, colours 0.05, kinds 0.05. The first
demo teacher's VAE reconstructions score backgrounds 1.0, colours 0.21, kinds 0.06.
`caption_scores` gives the rates; `python -m jdm_train.demo.judge --teacher FILE` scores a
teacher's samples for held-out captions beside its VAE's reconstructions and the data itself.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from jdm_train.demo import data
from jdm_train.demo.features import parse_caption

BLEND_DISTANCE = 60.0  # RGB units (0..255): how far a pixel may be from a blend of a shape colour and the background
MIN_ALPHA = 0.25  # coverage below this is a tint of the background, not shape
MIN_AREA = 20  # pixels at 64x64 mostly of one colour; the smallest shape of the world covers about 68
MIN_IOU = 0.7

SHAPE_COLOURS = tuple(sorted(data.COLOURS))
BACKGROUND_NAMES = tuple(sorted(data.BACKGROUNDS))
# Area of each kind in units of size^2 and its centroid's offset below the drawn centre (see data._draw_shape).
_AREA = {"circle": math.pi, "square": 1.8 ** 2, "triangle": 2.1 * 1.8 / 2}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 0.2}


def _rgb(names: list[str], table: dict[str, tuple[int, int, int]]) -> Tensor:
    return torch.tensor([table[n] for n in names], dtype=torch.float32)


def _pixels(image: Tensor) -> Tensor:
    """(3, H, W) in [0, 1] -> (64 * 64, 3) in 0..255, resized to the world's size when needed."""
    if image.shape[-2:] != (data.IMAGE_SIZE, data.IMAGE_SIZE):
        image = F.interpolate(image[None].float(), size=(data.IMAGE_SIZE,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)[0]
    return image.float().clamp(0, 1).permute(1, 2, 0).reshape(-1, 3) * 255


def read_background(image: Tensor) -> str:
    """The background colour name of one image (3, H, W) in [0, 1]."""
    # Shape colours take part so that a yellow shape does not vote for beige; white is both a
    # shape and a background colour, and its pixels vote for the background.
    others = [c for c in SHAPE_COLOURS if c not in data.BACKGROUNDS]
    palette = torch.cat([_rgb(list(BACKGROUND_NAMES), data.BACKGROUNDS), _rgb(others, data.COLOURS)])
    labels = torch.cdist(_pixels(image), palette).argmin(1)
    counts = torch.bincount(labels, minlength=len(palette))[: len(BACKGROUND_NAMES)]
    return BACKGROUND_NAMES[int(counts.argmax())]


def _template(kind: str, cx: float, cy: float, size: float) -> Tensor:
    """Coverage (64, 64) in [0, 1] of a shape drawn by the world's renderer (anti-aliased)."""
    sc = data.Scene(0, "black", (data.Shape(kind, "white", cx, cy, size),), None)
    lo, hi = data.BACKGROUNDS["black"][0], data.COLOURS["white"][0]
    return torch.from_numpy((data.render(sc)[..., 0].astype("float32") - lo) / (hi - lo)).clamp(0, 1)


def coverages(image: Tensor, background: str) -> dict[str, Tensor]:
    """{shape colour: coverage (64, 64) in [0, 1]} of one image (3, H, W) in [0, 1] on `background`.

    Every pixel is read as a blend `background + alpha * (colour - background)` of the background
    and the one shape colour whose blend line passes nearest to it, so that the anti-aliased or
    blurred edge of a blue shape on grey counts as part-blue rather than as purple; `alpha` is its
    coverage. Pixels further than `BLEND_DISTANCE` from every line, and faint tints (alpha below
    `MIN_ALPHA`), cover nothing."""
    names = [c for c in SHAPE_COLOURS if c != background]
    bg = _rgb([background], data.BACKGROUNDS)[0]
    axes = _rgb(names, data.COLOURS) - bg  # (K, 3)
    rel = _pixels(image) - bg  # (P, 3)
    alpha = (rel @ axes.T / (axes * axes).sum(1)).clamp(0, 1)  # (P, K)
    off = (rel[:, None, :] - alpha[..., None] * axes).norm(dim=-1)
    dist, best = off.min(1)
    a = alpha.gather(1, best[:, None])[:, 0]
    a = torch.where((dist <= BLEND_DISTANCE) & (a >= MIN_ALPHA), a, torch.zeros_like(a))
    return {c: torch.where(best == k, a, torch.zeros_like(a)).reshape(data.IMAGE_SIZE, data.IMAGE_SIZE)
            for k, c in enumerate(names)}


def read_objects(image: Tensor, background: str) -> dict[str, tuple[str | None, float]]:
    """{colour: (kind or None, soft IoU with that kind's template)} for every colour with a shape in
    one image (3, H, W) in [0, 1], given its background (the caption's).

    A colour has a shape when at least `MIN_AREA` pixels are mostly that colour (coverage >= 0.5).
    The IoU is soft (sum of minima over sum of maxima of the two coverages), so a blurred shape,
    whose coverage fades over several pixels, matches no sharp template well."""
    found = {}
    ys, xs = torch.meshgrid(torch.arange(data.IMAGE_SIZE) + 0.5, torch.arange(data.IMAGE_SIZE) + 0.5, indexing="ij")
    for colour, cov in coverages(image, background).items():
        if int((cov >= 0.5).sum()) < MIN_AREA:
            continue
        area = cov.sum().item()
        cy, cx = (cov * ys).sum().item() / area, (cov * xs).sum().item() / area
        best, best_kind = -1.0, None
        for kind in data.SHAPES:
            size = math.sqrt(area / _AREA[kind])
            t = _template(kind, cx, cy - _CENTROID_DY[kind] * size, size)
            iou = torch.minimum(t, cov).sum().item() / torch.maximum(t, cov).sum().item()
            if iou > best:
                best, best_kind = iou, kind
        found[colour] = (best_kind if best >= MIN_IOU else None, best)
    return found


@torch.no_grad()
def caption_scores(images: Tensor, captions: list[str]) -> dict[str, float]:
    """How often images (B, 3, H, W) in [0, 1] show what their captions say, read by the world's rules.

    - `background`: the background colour is the caption's.
    - `colours`: the set of colours with a shape is the caption's.
    - `kinds`: every captioned shape is there in its colour and its kind.
    - `kinds_per_object`: the same per captioned shape instead of per image.
    - `all`: background, colours and kinds.
    """
    if images.shape[0] != len(captions):
        raise ValueError(f"got {images.shape[0]} images and {len(captions)} captions; expected one caption per image")
    bg_ok = colours_ok = kinds_ok = all_ok = 0
    n_obj = obj_ok = 0
    for image, cap in zip(images, captions):
        background, objs, _ = parse_caption(cap)
        b = read_background(image) == background
        found = read_objects(image, background)
        c = set(found) == {colour for colour, _ in objs}
        hits = [colour in found and found[colour][0] == kind for colour, kind in objs]
        k = all(hits)
        bg_ok += b
        colours_ok += c
        kinds_ok += k
        all_ok += b and c and k
        n_obj += len(hits)
        obj_ok += sum(hits)
    n = len(captions)
    return {"background": bg_ok / n, "colours": colours_ok / n, "kinds": kinds_ok / n,
            "kinds_per_object": obj_ok / max(1, n_obj), "all": all_ok / n}


def background_entropy(images: Tensor) -> float:
    """Entropy in bits of the backgrounds read from images (B, 3, H, W): how many of the world's
    backgrounds a set of images uses, whatever their captions (a generator that draws every image on
    white scores 0; the data, 4 backgrounds drawn uniformly, about 2)."""
    counts = torch.tensor([float(sum(read_background(im) == name for im in images)) for name in BACKGROUND_NAMES])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


@torch.no_grad()
def vae_reconstructions(vae, images: Tensor, chunk: int = 64) -> Tensor:
    """An AutoencoderKL's reconstructions (posterior mean) of images (B, 3, H, W) in [0, 1]."""
    out = []
    dtype = next(vae.parameters()).dtype
    for i in range(0, images.shape[0], chunk):
        x = (images[i : i + chunk] * 2 - 1).to(dtype)
        out.append((vae.decode(vae.encode(x).latent_dist.mean).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def teacher_quality(pipe, n: int = 128, steps: int = 25, cfgs: tuple[float, ...] = (4.0,),
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Caption scores on the first `n` held-out captions: the data, the VAE's reconstructions and,
    for each guidance scale in `cfgs`, the teacher's `steps`-step DDIM samples from seeded noise."""
    from jdm_train.evaluate import Samplers

    images, captions = data.batch(range(data.HELDOUT_START, data.HELDOUT_START + n))
    samplers = Samplers(pipe)
    noise = samplers.noise(n, data.IMAGE_SIZE, seed)
    scores = {"data": caption_scores(images, captions), "vae": caption_scores(vae_reconstructions(pipe.vae, images), captions)}
    for cfg in cfgs:
        generate = samplers.teacher(steps, cfg)
        samples = torch.cat([generate(captions[i : i + 32], None, noise[i : i + 32]) for i in range(0, n, 32)])
        scores[f"teacher {steps} steps cfg {cfg:g}"] = caption_scores(samples, captions)
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jdm_train.demo.judge",
                                description="Score a demo teacher's held-out samples and VAE against their captions.")
    p.add_argument("--teacher", type=Path, default=None, help="single-file SD1.x checkpoint (default: the shipped demo teacher)")
    p.add_argument("--n", type=int, default=128, help="held-out captions")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg", type=float, nargs="+", default=None,
                   help="guidance scales (default: the teacher's jdm.cfg metadata, else 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = p.parse_args(argv)
    from jdm_train import model_io
    from jdm_train.demo import teacher_path

    torch.set_num_threads(args.threads)
    path = args.teacher or teacher_path()
    cfgs = args.cfg if args.cfg is not None else [float(model_io.read_metadata(path).get("jdm.cfg", 4.0))]
    t0 = time.time()
    scores = teacher_quality(model_io.load_sd1_checkpoint(path), args.n, args.steps, tuple(cfgs), args.seed)
    for name, s in scores.items():
        print(f"{name:24s} " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()))
    print(f"({args.n} held-out captions, {time.time() - t0:.0f}s)")
    if args.json:
        report = {"teacher": str(path), "n": args.n, "steps": args.steps, "scores": scores}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
