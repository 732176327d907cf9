"""`python -m jdm_train.bench extractors`: condition-extractor speed on a batch of photos.

Prints, for a batch of scikit-image's bundled photos resized to --size: each
extractor's exact `extract` time per image; `canny_edges` on the float batch against
OpenCV's per-image `cv2.Canny` loop on the same 8-bit photos, with its default CPU
backend (OpenCV) and with the batched tensor port GPU tensors take (also on --device),
with the time ratio and whether the edges are identical; and the forward + backward
time of each differentiable face. HED and depth
run with random weights at their real sizes (ControlNetHED.pth layout;
Intel/dpt-hybrid-midas architecture), written to a temporary models folder and
loaded through the extractors, on --model-images images (they take seconds each).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field", "camera")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jdm_train.bench extractors", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="photos in the batch (default 16)")
    p.add_argument("--size", type=int, default=512, help="photo side in pixels (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats; the best is reported (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch/OpenCV threads; 0 keeps the defaults")
    p.add_argument("--model-images", type=int, default=2, help="images for the HED / depth rows (default 2)")
    p.add_argument("--skip-models", action="store_true", help="skip the HED and depth rows")
    p.add_argument("--device", default="cpu", help="also time the canny tensor port on this device, e.g. cuda")
    return p.parse_args(argv)


def photos(batch: int, size: int) -> tuple[list[np.ndarray], torch.Tensor]:
    import cv2
    from skimage import data

    imgs = []
    for name in PHOTOS:
        im = getattr(data, name)()
        im = np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3]
        imgs.append(cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA))
    imgs = [imgs[i % len(imgs)] for i in range(batch)]
    return imgs, torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def best_time(fn, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Best wall-clock and best process CPU time (s) over `repeats` calls.

    CPU time is the steadier number on a shared machine: wall time also counts the
    time other processes hold the cores (with intra-op threads it also counts spinning).
    """
    if warmup:
        fn()  # lazy loading, allocator
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def synced(fn, device: torch.device):
    """`fn` followed by a wait for the device, so that wall time counts its kernels."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def fwd_bwd(ext, x: torch.Tensor, cond: torch.Tensor):
    def run():
        xi = x.clone().requires_grad_(True)
        ext.log_likelihood(xi, cond).sum().backward()
        return xi.grad

    return run


def write_models(root: Path) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation

    from jdm_train.extractors import HEDNetwork

    ann = root / "models" / "annotators"
    ann.mkdir(parents=True)
    torch.save(HEDNetwork().state_dict(), ann / "ControlNetHED.pth")
    cfg = DPTConfig(
        is_hybrid=True, neck_hidden_sizes=[256, 512, 768, 768], reassemble_factors=[1, 1, 1, 0.5],
        backbone_out_indices=[2, 5, 8, 11], use_auxiliary_head=False,
    )
    DPTForDepthEstimation(cfg).save_pretrained(ann / "dpt-hybrid-midas")


def main(argv: list[str] | None = None) -> int:
    import cv2

    from jdm_train.extractors import canny_edges, get_extractor

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    imgs, x = photos(args.batch, args.size)
    n = args.batch
    print(f"batch {n} x {args.size}px photos, torch threads {torch.get_num_threads()}, "
          f"OpenCV threads {cv2.getNumThreads()}, best of {args.repeats}")
    rows: list[tuple[str, int, tuple[float, float], str]] = []
    ref = torch.from_numpy(np.stack([cv2.Canny(im, 100, 200) > 0 for im in imgs]))
    device = torch.device(args.device)
    xd = x.to(device)
    runs = {"auto (OpenCV on CPU)": lambda: canny_edges(x, 100, 200),
            "tensor port": lambda: canny_edges(x, 100, 200, backend="tensor")}
    if device.type != "cpu":
        runs[f"tensor port on {device}"] = synced(lambda: canny_edges(xd, 100, 200), device)
    same = {name: "identical" if torch.equal(fn().cpu(), ref) else "DIFFERENT" for name, fn in runs.items()}
    threads = torch.get_num_threads(), cv2.getNumThreads()
    for k in sorted({1, threads[0]}):
        torch.set_num_threads(k)
        cv2.setNumThreads(k)
        t_cv = best_time(lambda: [cv2.Canny(im, 100, 200) for im in imgs], args.repeats)
        rows.append((f"canny, {k} thread(s): cv2.Canny loop on uint8", n, t_cv, "reference"))
        for name, fn in runs.items():
            t = best_time(fn, args.repeats)
            ratio = f"{t[0] / t_cv[0]:.2f}x OpenCV wall, {t[1] / t_cv[1]:.2f}x CPU"
            rows.append((f"canny, {k} thread(s): canny_edges {name}", n, t, f"{ratio}; edges {same[name]}"))
    torch.set_num_threads(threads[0])
    cv2.setNumThreads(threads[1])

    for name in ("canny", "lowres"):
        ext = get_extractor(name)
        rows.append((f"{name} extract", n, best_time(lambda: ext.extract(x), args.repeats), ""))
        cond = ext.extract(x)
        rows.append((f"{name} soft fwd+bwd", n, best_time(fwd_bwd(ext, x, cond), args.repeats), ""))

    if not args.skip_models:
        with tempfile.TemporaryDirectory() as tmp:
            write_models(Path(tmp))
            xm = x[: args.model_images]
            k = xm.shape[0]
            for name in ("hed", "depth"):
                ext = get_extractor(name, comfyui_root=tmp)
                cond = ext.extract(xm)  # loads the model; the timed calls below are not repeated
                rows.append((f"{name} extract (random weights)", k, best_time(lambda: ext.extract(xm), 1, False), ""))
                rows.append((f"{name} soft fwd+bwd", k, best_time(fwd_bwd(ext, xm, cond), 1, False), ""))

    print(f"{'what':56s} {'images':>6s} {'wall ms':>9s} {'ms/image':>9s} {'CPU ms':>9s}  note")
    for what, k, (wall, cpu), note in rows:
        print(f"{what:56s} {k:6d} {wall * 1e3:9.1f} {wall * 1e3 / k:9.2f} {cpu * 1e3:9.1f}  {note}")
    return 0
