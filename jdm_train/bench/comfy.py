"""`python -m jdm_train.bench comfy`: the JDM One-Step Sampler vs KSampler 20 steps + ControlNet.

Both run in one ComfyUI process (``COMFYUI_PATH``, loaded in-process on the CPU) on the same
random-weight, full-size SD1.5 UNet and ControlNet (written by `jdm_train.fixtures`), with the
same text conditioning and control image. Only the sampling is timed (the model is loaded
once, a warm-up run first). The latent is small (64x64 px -> 8x8 latent by default) so the
20-step run stays feasible on a shared CPU; the ratio is what the table is about (goal >= 18x:
20 UNet+ControlNet evaluations against one).

ComfyUI is loaded by the test harness `tools.comfyui` (run from the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jdm_train.bench comfy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size/8)")
    ap.add_argument("--steps", type=int, default=20, help="teacher KSampler steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    from tools.comfyui import comfyui_path, import_comfyui

    root = comfyui_path()
    if root is None:
        print("COMFYUI_PATH is not set: nothing to benchmark (point it at a ComfyUI checkout with its requirements "
              "installed; README, Tests and CI)", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from jdm_train import fixtures, model_io

    with tempfile.TemporaryDirectory(prefix="jdm-bench-comfy-") as base:
        nodes = import_comfyui(root, base)
        import comfy.controlnet
        import comfy.sd

        from diffusers import UNet2DConditionModel

        cfg = json.loads((model_io.CONFIG_DIR / "sd15_unet_config.json").read_text())
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg).eval()
        unet_path = model_io.save_unet_ldm(Path(base) / "models" / "unet" / "jdm.safetensors", unet,
                                           {"jdm.base": "bench"}, dtype=torch.float16)
        cn_path = model_io.save_controlnet_ldm(Path(base) / "models" / "controlnet" / "jdm_canny.safetensors",
                                               fixtures.make_controlnet(unet, seed=1), {"jdm.control": "canny"},
                                               dtype=torch.float16)
        del unet
        model = comfy.sd.load_diffusion_model(str(unet_path), model_options={"dtype": torch.float32})
        controlnet = comfy.controlnet.load_controlnet(str(cn_path))
        g = torch.Generator().manual_seed(0)
        text = torch.randn(1, 77, 768, generator=g)
        hint = (torch.rand(1, args.size, args.size, 3, generator=g) > 0.5).float()
        positive = [[text, {}]]
        negative = [[torch.zeros_like(text), {}]]
        pos_c, neg_c = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, hint,
                                                                        1.0, 0.0, 1.0)
        latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
        one_step = nodes.NODE_CLASS_MAPPINGS["JDM_OneStepSampler"]
        with torch.inference_mode():
            run_one = lambda: one_step.execute(model, pos_c, latent, 0, 999)  # noqa: E731
            run_teacher = lambda: nodes.common_ksampler(model, 0, args.steps, 7.5, "euler", "normal",  # noqa: E731
                                                        pos_c, neg_c, latent)
            run_one()
            t_one = _timed(run_one, args.repeats)
            run_teacher()
            t_teacher = _timed(run_teacher, max(1, args.repeats - 1))
    print(f"ComfyUI {root}, full-size SD1.5 UNet + ControlNet (random weights, fp32 on CPU, "
          f"{torch.get_num_threads()} threads), latent {args.size // 8}x{args.size // 8} ({args.size} px), batch 1")
    print("| sampler | UNet+ControlNet forward passes | best time (s) | ratio |")
    print("|---|---|---|---|")
    print(f"| JDM One-Step Sampler (t=999) | 1 | {t_one:.3f} | 1.0x |")
    print(f"| KSampler euler/normal {args.steps} steps, cfg 7.5 + ControlNet | {args.steps} (batch 2: cond+uncond) | "
          f"{t_teacher:.3f} | {t_teacher / t_one:.1f}x |")
    print(f"speed-up of the one-step node: {t_teacher / t_one:.1f}x (goal >= 18x)")
    return 0
