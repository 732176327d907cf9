"""`python -m jdm_train.bench paper`: rows of JDM's Tables 1-2 on the demo world.

Every row is trained by the same trainer (`python -m jdm_train`) on the shipped demo teacher
with the same seed and step budget, then scored by `jdm_train.evaluate` on the same held-out
conditions and noise: FID against the teacher's uncontrolled multi-step samples (demo
feature network), consistency `||h(x) - c||_1`, NFE and time per image. Rows:

- teacher, multi-step DDIM without control (the FID reference; consistency shows what
  ignoring the control costs);
- DSM one-step ControlNet (`--objective dsm`);
- implicit VSD (`--objective vsd`: fidelity only, no condition term);
- JDM (`--objective jdm --divergence rkl`);
- JDM with Jensen-Shannon weighting (`--divergence js`, f-distill);
- the JDM student with its control image blanked, and given another held-out image's control
  (scored against each image's own condition: does the student draw what it is given?);
- teacher + ControlNet trained by the ordinary denoising loss on the frozen teacher
  (`--objective controlnet`), sampled with the teacher's multi-step DDIM;
- DI + ControlNet: the implicit-VSD run's one-step UNet (distilled with no control signal)
  given that ControlNet (scored when both rows are run).

Writes `table.md`, `results.json` and one sample grid per row into `--out`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

TEACHER_CONTROLNET = "teacher + ControlNet trained by denoising"
DI_CONTROLNET = "DI + ControlNet"
ROWS = {
    TEACHER_CONTROLNET: ["--objective", "controlnet"],  # sampled multi-step, like the teacher
    "DSM one-step ControlNet": ["--objective", "dsm"],
    "implicit VSD": ["--objective", "vsd"],
    "JDM (reverse KL)": ["--objective", "jdm", "--divergence", "rkl"],
    # batch-normalised f-weights need two samples per micro-batch (TrainConfig.validate)
    "JDM (Jensen-Shannon)": ["--objective", "jdm", "--divergence", "js"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jdm_train.bench paper", description=__doc__.split("\n")[0])
    p.add_argument("--control", default="canny", help="control to learn (canny or lowres need no weights)")
    p.add_argument("--steps", type=int, default=300, help="generator updates per trained row")
    p.add_argument("--controlnet-steps", type=int, default=None,
                   help="updates of the denoising ControlNet row (default --steps): the cheap denoising loss needs "
                        "more of them to obey the map (3000 at batch 4 on the demo teacher)")
    p.add_argument("--batch-size", type=int, default=4, help="trainer batch size")
    p.add_argument("--n", type=int, default=128, help="held-out conditions scored per row")
    p.add_argument("--teacher-steps", type=int, default=25, help="DDIM steps of the teacher reference")
    p.add_argument("--cfg", type=float, default=4.0, help="CFG scale of the teacher reference")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--out", type=Path, default=Path("bench_paper"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the evaluation noise")
    p.add_argument("--train-arg", action="append", default=[],
                   help="extra trainer flag (repeatable), e.g. --train-arg=--cfg-scale=2")
    return p.parse_args(argv)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def train_row(name: str, flags: list[str], args: argparse.Namespace) -> tuple[Path, Path, float]:
    """Run the trainer for one row; returns (student UNet, ControlNet, seconds)."""
    from jdm_train import cli

    run_dir = args.out / "runs" / _slug(name)
    batch = max(args.batch_size, 2) if "--divergence" in flags and "rkl" not in flags else args.batch_size
    steps = args.controlnet_steps if name == TEACHER_CONTROLNET and args.controlnet_steps else args.steps
    argv = ["--ckpt", "demo", "--control", args.control, "--resolution", "64", "--max-steps", str(steps),
            "--batch-size", str(batch), "--seed", str(args.seed), "--output-dir", str(run_dir),
            "--output", "student", *flags, *args.train_arg]
    t0 = time.perf_counter()
    rc = cli.main(argv)
    if rc not in (0, None):
        raise RuntimeError(f"trainer failed for row {name!r} (exit {rc}): python -m jdm_train {' '.join(argv)}")
    return run_dir / "student.safetensors", run_dir / f"student_{args.control}.safetensors", time.perf_counter() - t0


def save_row_grid(path: Path, control: torch.Tensor, images: torch.Tensor, count: int = 8) -> Path:
    """Two rows: the control images, then the samples."""
    from jdm_train.files import save_image_grid

    k = min(count, images.shape[0])
    return save_image_grid(path, torch.cat([control[:k].float(), images[:k].float()]), ncol=k, gap=2, scale=2)


def main(argv=None) -> int:
    from jdm_train import evaluate, model_io
    from jdm_train.demo import teacher_path

    args = parse_args(argv)
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown {unknown}; expected some of {list(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    samplers = evaluate.Samplers(model_io.load_sd1_checkpoint(teacher_path()))
    feature_net = evaluate.DemoFeatures()
    eval_set = evaluate.demo_eval_set(args.n, args.control)
    noise = samplers.noise(args.n, eval_set.images.shape[-1], args.seed)

    rows: dict[str, dict] = {}
    ref, sec = evaluate.run_sampler(samplers.teacher(args.teacher_steps, args.cfg), eval_set, noise)
    ref_features = feature_net.features(ref)
    name = f"teacher, {args.teacher_steps}-step DDIM, no control"
    rows[name] = evaluate.score(ref, eval_set, ref_features, feature_net, args.teacher_steps, sec)
    save_row_grid(args.out / "grid_teacher.png", eval_set.control, ref)
    trained = {}
    for name in names:
        student, controlnet, train_seconds = train_row(name, ROWS[name], args)
        trained[name] = (student, controlnet)
        if name == TEACHER_CONTROLNET:
            sampler = samplers.teacher(args.teacher_steps, args.cfg, controlnet=model_io.load_controlnet(controlnet))
            nfe = args.teacher_steps
        else:
            sampler = samplers.student(model_io.load_unet(student), model_io.load_controlnet(controlnet))
            nfe = 1
        imgs, sec = evaluate.run_sampler(sampler, eval_set, noise)
        rows[name] = {**evaluate.score(imgs, eval_set, ref_features, feature_net, nfe, sec), "train_seconds": train_seconds}
        save_row_grid(args.out / f"grid_{_slug(name)}.png", eval_set.control, imgs)
        if TEACHER_CONTROLNET in trained and "implicit VSD" in trained and DI_CONTROLNET not in rows:
            # DI: a one-step student distilled without a control signal (the implicit-VSD run's UNet),
            # given the ControlNet trained by denoising on the teacher.
            sampler = samplers.student(model_io.load_unet(trained["implicit VSD"][0]),
                                   model_io.load_controlnet(trained[TEACHER_CONTROLNET][1]))
            imgs, sec = evaluate.run_sampler(sampler, eval_set, noise)
            rows[DI_CONTROLNET] = evaluate.score(imgs, eval_set, ref_features, feature_net, 1, sec)
            save_row_grid(args.out / f"grid_{_slug(DI_CONTROLNET)}.png", eval_set.control, imgs)
        if name == "JDM (reverse KL)":
            for mode, label in (("blank", "control blanked"), ("shuffled", "another image's control")):
                imgs, sec = evaluate.run_sampler(sampler, eval_set, noise, control_mode=mode)
                rows[f"JDM (reverse KL), {label}"] = evaluate.score(imgs, eval_set, ref_features, feature_net, 1, sec)
        print(evaluate.format_table(rows), flush=True)

    table = evaluate.format_table(rows)
    command = "python -m jdm_train.bench paper " + " ".join(argv if argv is not None else [])
    (args.out / "table.md").write_text(f"`{command.strip()}`\n\n{table}\n")
    (args.out / "results.json").write_text(json.dumps({"command": command.strip(), "steps": args.steps,
                                                       "controlnet_steps": args.controlnet_steps or args.steps, "n": args.n,
                                                       "control": args.control, "rows": rows}, indent=2) + "\n")
    print(table)
    print(f"wrote {args.out / 'table.md'}")
    return 0
