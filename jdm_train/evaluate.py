"""The paper's metrics (JDM Sec. 4.1): `python -m jdm_train.evaluate`.

- FID between controlled one-step student samples and the teacher's uncontrolled multi-step
  samples for the same held-out captions. Features: the demo world's own feature network
  (`jdm_train.demo.features`, default with `--ckpt demo`; its FIDs are not Inception FIDs), the
  standard FID Inception-v3 pool features (`--inception FILE`, pytorch-fid's weights file; FIDs
  comparable with published ones), or a local CLIP model's image embeddings (`--clip DIR`, a
  transformers CLIPModel folder).
- Held-out captions and images: the demo world's, or the user's own (`--data FOLDER`, the layout
  the trainer reads), with conditions from the chosen control's extractor.
- Consistency `|| h(x) - c ||_1` (mean absolute difference per image) on held-out conditions
  `c = h(x_data)`, with the exact extractor `h` of `jdm_train.extractors`.
- NFE (network evaluations per image, counting a CFG pair as one, as the paper does) and
  wall time per image.
- CLIP score (100 x cosine of CLIP image and text embeddings) when `--clip` is given; on the
  demo world, caption agreement judged by the feature network.

Results are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from jdm_train.codec import Codec
from jdm_train.files import atomic_write
from jdm_train.schedule import NoiseSchedule

# images (B, 3, H, W) in [0, 1] for captions, control (or None) and a noise tensor: a teacher's
# multi-step sampler or the student's one step ("generator" names the student alone)
ImageSampler = Callable[[list[str], "Tensor | None", Tensor], Tensor]


# ----------------------------------------------------------------------------- FID


def feature_stats(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = features.detach().double().cpu().numpy()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(f.shape)}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance of N(mu1, cov1) and N(mu2, cov2): |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    tr((C1 C2)^(1/2)) = tr((A C2 A)^(1/2)) with A = C1^(1/2), whose argument is symmetric PSD,
    so both square roots come from symmetric eigendecompositions (no complex round-off).
    """
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}")

    def psd_sqrt(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((c + c.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    a = psd_sqrt(cov1)
    w = np.linalg.eigvalsh(a @ cov2 @ a)
    tr_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    # The distance is >= 0; round-off on (near-)identical sets can leave a tiny negative.
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt))


def fid(features_a: Tensor, features_b: Tensor) -> float:
    """FID of two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# ----------------------------------------------------------------------------- feature networks


class FeatureNet:
    """`features(images) -> (B, D)` and optional `clip_score(images, captions) -> (B,)`."""

    name = "features"

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def clip_score(self, images: Tensor, captions: list[str]) -> Tensor | None:
        return None


class DemoFeatures(FeatureNet):
    """The demo world's feature network (trained on the procedural shapes; not Inception)."""

    name = "demo-shapenet"

    def __init__(self, path: str | Path | None = None):
        from jdm_train.demo.features import load_feature_net

        self.net = load_feature_net(path)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.net.features(images.float().cpu())

    def agreement(self, images: Tensor, captions: list[str]) -> dict[str, float]:
        from jdm_train.demo.features import caption_agreement

        return caption_agreement(self.net, images.float().cpu(), captions)


class InceptionFeatures(FeatureNet):
    """The FID Inception-v3's 2048-d pool features (`jdm_train.inception`) from a local weights file."""

    name = "inception-v3-fid"

    def __init__(self, path: str | Path, batch: int = 32):
        from jdm_train.inception import load_fid_inception

        self.net = load_fid_inception(path)
        self.batch = batch

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        images = images.float().cpu()
        return torch.cat([self.net(images[i : i + self.batch]) for i in range(0, images.shape[0], self.batch)])


class PairedFeatures(FeatureNet):
    """FID features from one network and the CLIP score from another (`--inception` with `--clip`)."""

    def __init__(self, fid_net: FeatureNet, clip_net: FeatureNet):
        self.fid_net, self.clip_net = fid_net, clip_net
        self.name = f"{fid_net.name}+{clip_net.name}"

    def features(self, images: Tensor) -> Tensor:
        return self.fid_net.features(images)

    def clip_score(self, images: Tensor, captions: list[str]) -> Tensor | None:
        return self.clip_net.clip_score(images, captions)


class ClipFeatures(FeatureNet):
    """A local transformers CLIPModel folder: image embeddings for FID, and CLIP score."""

    name = "clip"

    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"--clip {folder}: expected a transformers CLIPModel folder (config.json + weights)")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError):
            from jdm_train.model_io import load_tokenizer

            self.tokenizer = load_tokenizer()
        cfg = self.model.config.vision_config
        self.size = cfg.image_size
        # OpenAI CLIP's preprocessing constants
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def _pixels(self, images: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate(images.float().cpu(), size=(self.size, self.size), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    @staticmethod
    def _tensor(out) -> Tensor:
        # transformers 5 returns a model output from get_*_features; 4.x a tensor
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=self._pixels(images)))

    @torch.no_grad()
    def clip_score(self, images: Tensor, captions: list[str]) -> Tensor:
        """100 * cos(image embedding, text embedding), per image (B,); clipped at 0 as in Hessel et al."""
        tok = self.tokenizer(captions, padding="max_length", max_length=self.model.config.text_config.max_position_embeddings,
                             truncation=True, return_tensors="pt")
        txt = self._tensor(self.model.get_text_features(input_ids=tok.input_ids))
        img = self.features(images)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return 100 * cos.clamp_min(0)


# ----------------------------------------------------------------------------- held-out set and samplers


@dataclass
class EvalSet:
    """Held-out captions, data images (N, 3, H, W) in [0, 1] and conditions `c = h(x_data)`."""

    captions: list[str]
    images: Tensor
    control: Tensor
    control_name: str


def demo_eval_set(n: int, control: str, **extractor_params) -> EvalSet:
    """The first `n` held-out images of the demo world and their `control` conditions."""
    from jdm_train.demo import data
    from jdm_train.extractors import get_extractor

    images, captions = data.batch(range(data.HELDOUT_START, data.HELDOUT_START + n))
    return EvalSet(captions, images, get_extractor(control, **extractor_params).extract(images), control)


def folder_eval_set(folder: str | Path, n: int, control: str, resolution: int, **extractor_params) -> EvalSet:
    """The first `n` (sorted) captioned images of the user's held-out `folder` (`data.CaptionedImageFolder`'s
    layout: a .txt beside each image or a metadata.jsonl) at `resolution`, and their `control` conditions."""
    from jdm_train.data import CaptionedImageFolder
    from jdm_train.extractors import get_extractor

    dataset = CaptionedImageFolder(folder, resolution)
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    if len(items) < 2:
        raise ValueError(f"--data {folder}: {len(items)} captioned image(s); FID needs at least 2")
    images = torch.stack([it["image"] for it in items])
    return EvalSet([it["caption"] for it in items], images, get_extractor(control, **extractor_params).extract(images),
                   control)


class Samplers:
    """The teacher's multi-step sampler and the student's one-step generator over one SD1.x pipeline
    (`model_io.SD1Pipeline`: its UNet is the teacher, its text encoder and VAE the shared `Codec`)."""

    def __init__(self, pipe, schedule: NoiseSchedule | None = None, codec: Codec | None = None):
        self.pipe = pipe
        self.schedule = schedule or NoiseSchedule()
        self.codec = codec or Codec.from_pipe(pipe)

    @property
    def vae_scale_factor(self) -> int:
        return self.codec.vae_scale_factor

    def noise(self, n: int, image_size: int, seed: int) -> Tensor:
        """Seeded latent noise (n, C, image_size / f, image_size / f), shared by all samplers of a comparison."""
        return torch.randn(self.codec.latent_shape(n, image_size), generator=torch.Generator().manual_seed(seed))

    def teacher(self, steps: int, cfg: float, negative: str = "", controlnet=None) -> ImageSampler:
        """The teacher's DDIM sampler with CFG; NFE = `steps`. Without `controlnet` it ignores the
        control (the reference of FID); with one, the ControlNet sees the control in both CFG branches."""
        from jdm_train.denoisers import Cond, UNetDenoiser
        from jdm_train.sampling import ddim_reference

        denoise = UNetDenoiser(self.pipe.unet, self.schedule, controlnet=controlnet)

        @torch.no_grad()
        def sample(captions: list[str], control: Tensor | None, noise: Tensor) -> Tensor:
            control = control if controlnet is not None else None
            cond = Cond(self.codec.encode_text(captions), control)
            uncond = Cond(self.codec.encode_text([negative] * len(captions)), control)
            return self.codec.decode(ddim_reference(denoise, noise, cond, uncond, steps, cfg, self.schedule))

        return sample

    def student(self, unet, controlnet=None, t_g: int = 999) -> ImageSampler:
        """The student `G(z, text, c)`: one evaluation at `t_g` of `unet` (+ `controlnet`) read as x0; NFE = 1."""
        from jdm_train.denoisers import Cond, UNetDenoiser
        from jdm_train.sampling import generate_one_step

        denoise = UNetDenoiser(unet, self.schedule, controlnet=controlnet)

        @torch.no_grad()
        def generate(captions: list[str], control: Tensor | None, noise: Tensor) -> Tensor:
            cond = Cond(self.codec.encode_text(captions), control if controlnet is not None else None)
            return self.codec.decode(generate_one_step(denoise, noise, t_g, cond))

        return generate


CONTROL_MODES = ("given", "blank", "shuffled")


def run_sampler(sample: ImageSampler, eval_set: EvalSet, noise: Tensor, batch: int = 32,
                  control_mode: str = "given") -> tuple[Tensor, float]:
    """All images of `eval_set` through `sample` in batches; returns (images, seconds per image).

    control_mode: "given" feeds each image its own condition; "blank" feeds zeros; "shuffled" feeds
    the next held-out image's condition (scored against the image's own, it shows whether the
    student draws what it is given: a canny map of a flat image is blank, so for edges "blank" is
    itself a valid condition and a student that obeys it draws nothing there).
    """
    if control_mode not in CONTROL_MODES:
        raise ValueError(f"control_mode must be one of {CONTROL_MODES}, got {control_mode!r}")
    source = eval_set.control.roll(-1, dims=0) if control_mode == "shuffled" else eval_set.control
    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(eval_set.captions), batch):
        control = source[i : i + batch]
        if control_mode == "blank":
            control = torch.zeros_like(control)
        outs.append(sample(eval_set.captions[i : i + batch], control, noise[i : i + batch]))
    seconds = (time.perf_counter() - t0) / len(eval_set.captions)
    return torch.cat(outs), seconds


def edge_f1(edges: Tensor, cond: Tensor) -> float:
    """F1 of two binary edge maps (B, C, H, W) with a 1-pixel tolerance (3x3 dilation of the other map).
    For thin edges at 64 px L1 favours flat images (a blank image scores the edge density of c); F1
    does not."""
    import torch.nn.functional as F

    dilate = lambda m: F.max_pool2d(m, 3, 1, 1)  # noqa: E731
    precision = (edges * dilate(cond)).sum() / edges.sum().clamp_min(1)
    recall = (cond * dilate(edges)).sum() / cond.sum().clamp_min(1)
    return float(2 * precision * recall / (precision + recall).clamp_min(1e-8))


def score(images: Tensor, eval_set: EvalSet, reference_features: Tensor, feature_net: FeatureNet,
          nfe: int, seconds_per_image: float) -> dict:
    """FID (vs. the reference features), consistency (and edge F1 for canny), NFE, time, CLIP score /
    caption agreement."""
    from jdm_train.extractors import get_extractor

    h = get_extractor(eval_set.control_name)
    out = {
        "fid": fid(feature_net.features(images), reference_features),
        "consistency": h.consistency(images, eval_set.control).mean().item(),
        "edge_f1": edge_f1(h.extract(images), eval_set.control) if eval_set.control_name == "canny" else None,
        "nfe": nfe,
        "seconds_per_image": seconds_per_image,
        "n": int(images.shape[0]),
    }
    clip = feature_net.clip_score(images, eval_set.captions)
    if clip is not None:
        out["clip_score"] = clip.mean().item()
    if isinstance(feature_net, DemoFeatures):
        from jdm_train.demo import judge

        agree = feature_net.agreement(images, eval_set.captions)
        out["caption_agreement"] = {k: agree[k] for k in ("background", "colours", "all")}
        judged = judge.caption_scores(images.float().cpu(), eval_set.captions)
        out["judge"] = {k: judged[k] for k in ("background", "colours", "kinds")}
        out["background_bits"] = judge.background_entropy(images.float().cpu())
    return out


def format_table(rows: dict[str, dict]) -> str:
    """Markdown table of result rows: FID, consistency, NFE, time per image (+ optional columns)."""
    cols = [("FID", "fid", "{:.2f}"), ("consistency (L1)", "consistency", "{:.4f}"), ("edge F1", "edge_f1", "{:.3f}"),
            ("NFE", "nfe", "{}"),
            ("s / image", "seconds_per_image", "{:.3f}")]
    extra = [("CLIP score", "clip_score", "{:.2f}"), ("caption agreement bg / colours / all", "caption_agreement", ""),
             ("judge: bg / colours / kinds right", "judge", ""), ("backgrounds used (bits)", "background_bits", "{:.2f}")]
    cols += [c for c in extra if any(c[1] in r for r in rows.values())]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]

    def cell(value, fmt: str) -> str:
        if isinstance(value, dict):
            return " / ".join(f"{v:.2f}" for v in value.values())
        return fmt.format(value)

    for name, r in rows.items():
        cells = [cell(r[key], fmt) if key in r and r[key] is not None else "-" for _, key, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jdm_train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="demo", help="teacher SD1.x checkpoint (path or 'demo' for the shipped demo teacher)")
    p.add_argument("--student", type=Path,
                   help="student UNet (LDM layout, as exported by the trainer); default: the teacher UNet")
    p.add_argument("--controlnet", type=Path, help="the student's ControlNet (cldm layout, as exported by the trainer)")
    p.add_argument("--control", default="canny", help="condition extractor name (canny, hed, depth, lowres)")
    p.add_argument("--data", type=Path,
                   help="folder of the user's held-out captioned images (the trainer's --data layout); default: the demo set")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size of --data images, resized and center-cropped (default: 64 with the demo teacher, else 512)")
    p.add_argument("--n", type=int, default=256, help="number of held-out images / conditions (at most, with --data)")
    p.add_argument("--teacher-steps", type=int, default=25, help="DDIM steps of the teacher's reference samples")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale of the teacher's reference samples (default: 4 for the "
                        "demo teacher, its own scale; 7.5 otherwise, SD1.5's usual)")
    p.add_argument("--timestep", type=int, default=None,
                   help="the student's timestep t_g (default: jdm.timestep metadata or 999)")
    p.add_argument("--inception", type=Path,
                   help="FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or a .safetensors "
                        "with its keys): standard FID features, comparable with published FIDs")
    p.add_argument("--clip", type=Path,
                   help="local transformers CLIPModel folder: CLIP score, and CLIP features for FID unless --inception")
    p.add_argument("--features", type=Path, help="demo feature network weights (default: the shipped one)")
    p.add_argument("--blank-control", action="store_true", help="also score the student with blank (zero) control images")
    p.add_argument("--shuffled-control", action="store_true",
                   help="also score the student given another held-out image's control (against each image's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise shared by all samplers")
    p.add_argument("--batch", type=int, default=32, help="generation batch size")
    p.add_argument("--out", type=Path, default=Path("jdm_eval.json"), help="JSON file to write")
    return p.parse_args(argv)


def feature_net_from_args(args: argparse.Namespace) -> FeatureNet:
    """--inception and/or --clip, else the demo feature network (the demo teacher or --features)."""
    fid_net = InceptionFeatures(args.inception, args.batch) if args.inception is not None else None
    clip_net = ClipFeatures(args.clip) if args.clip is not None else None
    if fid_net is not None and clip_net is not None:
        return PairedFeatures(fid_net, clip_net)
    if fid_net is not None or clip_net is not None:
        return fid_net or clip_net
    if args.ckpt == "demo" or args.features is not None:
        return DemoFeatures(args.features)
    raise ValueError("--inception FILE or --clip DIR is required outside the demo world (no feature network for FID)")


def eval_set_from_args(args: argparse.Namespace) -> EvalSet:
    """The user's --data folder, else the demo world's held-out set."""
    if args.data is not None:
        from jdm_train.demo.data import IMAGE_SIZE

        resolution = args.resolution or (IMAGE_SIZE if args.ckpt == "demo" else 512)
        return folder_eval_set(args.data, args.n, args.control, resolution)
    return demo_eval_set(args.n, args.control)


def main(argv=None) -> int:
    from jdm_train import model_io

    args = parse_args(argv)
    if args.n < 2:
        raise ValueError(f"--n must be >= 2 for a covariance, got {args.n}")
    ckpt = model_io.resolve_checkpoint(args.ckpt)
    if args.cfg is None:
        args.cfg = 4.0 if args.ckpt == "demo" else 7.5
    feature_net = feature_net_from_args(args)
    eval_set = eval_set_from_args(args)
    samplers = Samplers(model_io.load_sd1_checkpoint(ckpt))
    n = len(eval_set.captions)
    if n < args.n:
        print(f"--data {args.data}: {n} captioned images, fewer than --n {args.n}; evaluating on all {n}")
    noise = samplers.noise(n, eval_set.images.shape[-1], args.seed)

    rows: dict[str, dict] = {}
    ref, sec = run_sampler(samplers.teacher(args.teacher_steps, args.cfg), eval_set, noise, args.batch)
    ref_features = feature_net.features(ref)
    rows[f"teacher ({args.teacher_steps}-step DDIM, no control)"] = score(ref, eval_set, ref_features, feature_net,
                                                                         args.teacher_steps, sec)
    rows["data (held-out images)"] = score(eval_set.images, eval_set, ref_features, feature_net, 0, 0.0)
    if args.student is not None or args.controlnet is not None:
        unet = model_io.load_unet(args.student) if args.student is not None else samplers.pipe.unet
        controlnet = model_io.load_controlnet(args.controlnet) if args.controlnet is not None else None
        meta = model_io.read_metadata(args.student) if args.student is not None else {}
        t_g = args.timestep if args.timestep is not None else int(meta.get("jdm.timestep", 999))
        gen = samplers.student(unet, controlnet, t_g)
        imgs, sec = run_sampler(gen, eval_set, noise, args.batch)
        rows["student (1 step, control)"] = score(imgs, eval_set, ref_features, feature_net, 1, sec)
        for mode in ("blank", "shuffled"):
            if getattr(args, f"{mode}_control"):
                imgs, sec = run_sampler(gen, eval_set, noise, args.batch, control_mode=mode)
                rows[f"student (1 step, {mode} control)"] = score(imgs, eval_set, ref_features, feature_net, 1, sec)

    print(format_table(rows))
    payload = {"ckpt": str(ckpt), "data": str(args.data) if args.data is not None else "demo", "control": args.control,
               "feature_net": feature_net.name, "n": n,
               "teacher_steps": args.teacher_steps, "cfg": args.cfg, "seed": args.seed, "rows": rows}
    with atomic_write(args.out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
