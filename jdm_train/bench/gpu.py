"""`python -m jdm_train.bench gpu`: the CUDA path measured once, in one prepared script (issue 15).

One run (at most 8 minutes on one recent GPU) prints one markdown table and writes it as JSON
(`--json PATH`, rewritten after every section, so a run cut short keeps what it measured):

- canny: the exact tensor port (`canny_edges(..., backend="tensor")`) on the device for 16 x 512 px
  photos against OpenCV's per-image `cv2.Canny` loop on the CPU (a time ratio), and whether the
  device's edges equal OpenCV's bit for bit;
- sampling: the one-step student (SD1.5-size UNet + ControlNet, random weights, fp16 on CUDA) at
  512 px in images per second, against 20-step DDIM with classifier-free guidance of the same UNet +
  ControlNet (`jdm_train.sampling`), latents only (no VAE decode);
- fp16: 20 `Trainer.train_step()`s with `--mixed-precision fp16` on the tiny fixture checkpoint:
  losses finite, steps skipped by accelerate's GradScaler (`optimizer.step_was_skipped`);
- train: one JDM step (`Trainer.train_step()`: generator_step + fake_score_step, optimizers
  included) on a random-weight checkpoint in the full SD1.5 architecture (`jdm_train.fixtures`) at
  512 px, in full-weight mode (the trainer's defaults: full fp32 copies) and in low-memory mode
  (LoRA ranks 64, gradient checkpointing, bf16, TAESD condition decoder): seconds per step after a
  warm-up and peak CUDA memory (`torch.cuda.max_memory_allocated`) at batch 1 and at the largest
  batch of 1, 2, 4, ... that fits `--cap-gib` (24): the search stops at an out-of-memory error, a
  peak above the cap, `--max-batch`, or when the next size would overrun `--budget-s`.

`--device cpu --tiny` runs every section at tiny size on the CPU (tests/test_bench_gpu.py);
`--device cuda --tiny` is the same smoke run on a GPU (seconds).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

MODES = {
    # The trainer's defaults: student and fake score as full fp32 copies of the UNet.
    "full-weight": dict(gradient_checkpointing=False, student_lora_rank=0, fake_lora_rank=0),
    "low-memory": dict(gradient_checkpointing=True, student_lora_rank=64, fake_lora_rank=64, mixed_precision="bf16",
                       cond_decoder="taesd"),
}
SECTIONS = ("canny", "sampling", "fp16", "train")
COLUMNS = ("benchmark", "setting", "result", "peak memory", "note")
TINY = dict(resolution=64, warmup=1, steps=2, max_batch=2, fp16_steps=3, photo_size=64, repeats=2)
FULL = dict(resolution=512, warmup=1, steps=3, max_batch=64, fp16_steps=20, photo_size=512, repeats=5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jdm_train.bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to measure (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny fixtures at 64 px, 2 steps, batch search capped at 2")
    p.add_argument("--json", type=Path, default=None, help="also write the table and details to this JSON file")
    p.add_argument("--cap-gib", type=float, default=24.0, help="GPU memory the batch search must fit (default 24)")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="seconds from the start after which no larger batch is tried (default 400: the run ends "
                        "within 8 minutes)")
    p.add_argument("--modes", default="full-weight,low-memory", help=f"training modes, of {', '.join(MODES)}")
    p.add_argument("--sections", default=",".join(SECTIONS), help="sections to run, comma-separated")
    for name, value in FULL.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {value}, with --tiny {TINY[name]}")
    args = p.parse_args(argv)
    for name, value in (TINY if args.tiny else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag, value, known in (("modes", args.modes, MODES), ("sections", args.sections, SECTIONS)):
        unknown = set(value.split(",")) - set(known)
        if unknown:
            p.error(f"--{flag}: unknown {sorted(unknown)}; expected some of {', '.join(known)}")
    return args


def device_error(device: str) -> str | None:
    """Why `device` cannot be measured here, in one line (None: it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return ("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}); run on a GPU machine, or use --device cpu --tiny")
    return None


# ----------------------------------------------------------------------------- memory and time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _peak_reserved(device: torch.device) -> int | None:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gib(nbytes: int | None) -> str:
    return "n/a (cpu)" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def row(benchmark: str, setting: str, result: str, memory: str = "", note: str = "") -> dict:
    return dict(zip(COLUMNS, (benchmark, setting, result, memory, note)))


# ----------------------------------------------------------------------------- canny


def bench_canny(device: torch.device, args) -> tuple[list[dict], dict]:
    """The exact canny port on `device` against OpenCV's CPU loop on the same 8-bit photos."""
    import cv2
    import numpy as np

    from jdm_train.bench.extractors import best_time, photos, synced
    from jdm_train.extractors.canny import canny_edges

    imgs, x = photos(16, args.photo_size)
    xd = x.to(device)
    port = synced(lambda: canny_edges(xd, 100, 200, backend="tensor"), device)
    ref = torch.from_numpy(np.stack([cv2.Canny(im, 100, 200) > 0 for im in imgs]))
    exact = torch.equal(port().cpu(), ref)
    t_cv = best_time(lambda: [cv2.Canny(im, 100, 200) for im in imgs], args.repeats)[0]
    t_port = best_time(port, args.repeats)[0]
    out = dict(images=len(imgs), size=args.photo_size, opencv_s=t_cv, port_s=t_port, speedup=t_cv / t_port,
               bit_exact=exact, opencv_threads=cv2.getNumThreads())
    setting = f"{len(imgs)} x {args.photo_size} px photos"
    return [row("canny: cv2.Canny loop (CPU, uint8)", setting, f"{t_cv * 1e3:.1f} ms", "",
                f"reference, {cv2.getNumThreads()} OpenCV threads"),
            row(f"canny: tensor port on {device.type}", setting, f"{t_port * 1e3:.1f} ms", "",
                f"{t_cv / t_port:.2f}x OpenCV's speed; edges {'bit-exact' if exact else 'DIFFERENT'}")], out


# ----------------------------------------------------------------------------- sampling


def _student(device: torch.device, dtype: torch.dtype, tiny: bool):
    """The student's denoiser: a random UNet (SD1.5 architecture, or the tiny fixture) + a new ControlNet."""
    from diffusers import UNet2DConditionModel

    from jdm_train import fixtures, model_io
    from jdm_train.denoisers import UNetDenoiser, new_controlnet
    from jdm_train.schedule import NoiseSchedule

    torch.manual_seed(0)
    unet = fixtures.make_unet() if tiny else UNet2DConditionModel(
        **json.loads((model_io.CONFIG_DIR / "sd15_unet_config.json").read_text()))
    controlnet = new_controlnet(unet)
    unet, controlnet = (m.to(device, dtype).eval().requires_grad_(False) for m in (unet, controlnet))
    return UNetDenoiser(unet, NoiseSchedule(), controlnet=controlnet)


def time_sampling(device: torch.device, args) -> dict:
    """Seconds of the one-step student and of 20-step CFG DDIM on the same UNet + ControlNet, batch 1."""
    from jdm_train.bench.extractors import best_time, synced
    from jdm_train.denoisers import Cond
    from jdm_train.sampling import ddim_reference, generate_one_step

    dtype = torch.float16 if device.type == "cuda" else torch.float32  # what ComfyUI runs SD1.5 in
    student = _student(device, dtype, args.tiny)
    g = torch.Generator(device).manual_seed(0)
    size, dim = args.resolution, student.unet.config.cross_attention_dim
    z = torch.randn(1, 4, size // 8, size // 8, generator=g, device=device, dtype=dtype)
    control = (torch.rand(1, 3, size, size, generator=g, device=device) > 0.9).to(dtype)
    cond = Cond(torch.randn(1, 77, dim, generator=g, device=device, dtype=dtype), control)
    uncond = Cond(torch.zeros_like(cond.text), control)
    with torch.no_grad():
        one = synced(lambda: generate_one_step(student, z, 999, cond), device)
        many = synced(lambda: ddim_reference(student, z, cond, uncond, 20, 7.5, student.schedule), device)
        finite = bool(torch.isfinite(one()).all() and torch.isfinite(many()).all())
        _reset_peak(device)
        t_one = best_time(one, args.repeats)[0]
        t_many = best_time(many, max(1, args.repeats // 2))[0]
    return dict(resolution=size, dtype=str(dtype).removeprefix("torch."), one_step_s=t_one, ddim20_cfg_s=t_many,
                one_step_img_s=1 / t_one, ddim20_cfg_img_s=1 / t_many, speedup=t_many / t_one, finite=finite,
                peak_bytes=_peak(device))


def bench_sampling(device: torch.device, args) -> tuple[list[dict], dict]:
    """Images per second of the one-step student against 20-step CFG DDIM (JDM's claim: one step, same models)."""
    out = time_sampling(device, args)
    _release(device)
    setting = f"{out['resolution']} px, batch 1, {out['dtype']}"
    what = "tiny" if args.tiny else "SD1.5-size"
    return [row(f"sampling: one-step student ({what} UNet + ControlNet)", setting, f"{out['one_step_img_s']:.2f} img/s",
                gib(out["peak_bytes"]), f"{out['speedup']:.1f}x the 20-step CFG rate; latents, no VAE decode"),
            row("sampling: 20-step DDIM, CFG 7.5 (same models)", setting, f"{out['ddim20_cfg_img_s']:.3f} img/s", "",
                f"40 UNet + ControlNet passes; outputs {'finite' if out['finite'] else 'NOT finite'}")], out


# ----------------------------------------------------------------------------- training


def _step(trainer) -> dict:
    logs = trainer.train_step()
    trainer.step += 1
    return logs


def measure_batch(trainer, batch: int, warmup: int, steps: int) -> dict:
    """Median seconds per `train_step()` after `warmup` steps and the CUDA peak over all of them, at `batch`."""
    # The trainer reads its batch size from the config and its batch order; nothing else depends on it.
    trainer.config.batch_size = trainer.order.batch_size = batch
    start = time.perf_counter()
    _reset_peak(trainer.device)
    for _ in range(warmup):
        _step(trainer)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _step(trainer)
        _sync(trainer.device)
        times.append(time.perf_counter() - t)
    r = dict(batch=batch, seconds_per_step=statistics.median(times), peak_bytes=_peak(trainer.device),
             wall_s=time.perf_counter() - start, peak_reserved_bytes=_peak_reserved(trainer.device))
    # A run stopped from outside (the device's time limit) still shows what was measured.
    print(f"[bench gpu]   batch {batch}: {r['seconds_per_step']:.3f} s/step, peak {gib(r['peak_bytes'])}",
          file=sys.stderr, flush=True)
    return r


def search_batches(measure: Callable[[int], dict], cap_bytes: float, max_batch: int,
                   deadline: float = math.inf, release: Callable[[], None] = lambda: None) -> tuple[list[dict], str]:
    """`measure(b)` for b = 1, 2, 4, ... until an out-of-memory error ("oom"), a peak above `cap_bytes`
    ("cap"), `max_batch` ("max_batch") or a next size that would end after `deadline` ("time").

    Returns every measurement ({"batch", "oom": True} for the one that ran out of memory) and the reason."""
    tried, batch = [], 1
    while True:
        try:
            tried.append(measure(batch))
        except torch.cuda.OutOfMemoryError:
            tried.append({"batch": batch, "oom": True})
        if tried[-1].get("oom"):
            release()  # outside the except block: the traceback no longer holds the step's tensors
            return tried, "oom"
        r = tried[-1]
        if r["peak_bytes"] is not None and r["peak_bytes"] > cap_bytes:
            return tried, "cap"
        if 2 * batch > max_batch:
            return tried, "max_batch"
        if time.monotonic() + 2.5 * r["wall_s"] > deadline:
            return tried, "time"
        batch *= 2


def largest_fitting(tried: list[dict], cap_bytes: float) -> dict | None:
    fits = [r for r in tried if not r.get("oom") and (r["peak_bytes"] is None or r["peak_bytes"] <= cap_bytes)]
    return fits[-1] if fits else None


def bench_mode(mode: str, ckpt: Path, taesd: Path, work: Path, device: torch.device, args,
               deadline: float) -> tuple[list[dict], dict]:
    """Build the trainer of `mode` once and search the batch sizes; frees it before returning."""
    from jdm_train.bench.step import _trainer, _write_data

    overrides = dict(MODES[mode], **({"taesd": str(taesd)} if MODES[mode].get("cond_decoder") == "taesd" else {}))
    cap = args.cap_gib * 2**30
    # What earlier sections left allocated is inside this mode's peak too: it is reported beside it.
    out = dict(mode=mode, overrides=overrides,
               baseline_bytes=torch.cuda.memory_allocated(device) if device.type == "cuda" else None)
    try:
        trainer = _trainer(ckpt, _write_data(work / "data", n=4, size=args.resolution), work / mode,
                           resolution=args.resolution, batch_size=1, cpu=device.type == "cpu",
                           max_nonfinite=10**6, **overrides)
    except torch.cuda.OutOfMemoryError:
        out.update(oom_at_load=True, tried=[], stop="oom")
    else:
        out["trainable_params"] = sum(p.numel() for ps in trainer.roles.groups.values() for p in ps)
        out["tried"], out["stop"] = search_batches(lambda b: measure_batch(trainer, b, args.warmup, args.steps), cap,
                                                   args.max_batch, deadline, lambda: _release(device))
        # Timings of steps skipped for a non-finite loss leave out the fake-score update: counted, shown.
        out["nonfinite_steps"] = trainer.state.nonfinite_total
        del trainer
    _release(device)
    out["largest"] = largest_fitting(out["tried"], cap)
    return mode_rows(out, args), out


def mode_rows(r: dict, args) -> list[dict]:
    name, setting = f"train: JDM step, {r['mode']}", f"{args.resolution} px"
    if r.get("oom_at_load"):
        return [row(name, setting + ", batch 1", "out of memory while loading", "", "")]
    first, best, cap = r["tried"][0], r["largest"], f"{args.cap_gib:g} GiB"
    last = r["tried"][-1]
    why = {"oom": f"batch {last['batch']} ran out of memory",
           "cap": f"batch {last['batch']} peaks at {gib(last.get('peak_bytes'))} > {cap}",
           "max_batch": f"search capped at batch {args.max_batch}",
           "time": f"search stopped by --budget-s {args.budget_s:g}"}[r["stop"]]
    rows = []
    if not first.get("oom"):
        skipped = r.get("nonfinite_steps", 0)
        note = f"{r['trainable_params']:,} trained parameters"
        note += f"; {skipped} NON-FINITE steps skipped" if skipped else ""
        if (r.get("baseline_bytes") or 0) > 2**28:
            note += f"; peaks include {gib(r['baseline_bytes'])} held before this mode"
        rows.append(row(name, setting + ", batch 1", f"{first['seconds_per_step']:.3f} s/step",
                        gib(first["peak_bytes"]), note))
    if best is None:
        rows.append(row(name, f"{setting}, largest batch within {cap}", "none", "", why))
    else:
        rows.append(row(name, f"{setting}, largest batch within {cap}: {best['batch']}",
                        f"{best['seconds_per_step']:.3f} s/step ({best['batch'] / best['seconds_per_step']:.2f} img/s)",
                        gib(best["peak_bytes"]), why))
    return rows


def bench_fp16(ckpt: Path, work: Path, device: torch.device, args) -> tuple[list[dict], dict]:
    """`--mixed-precision fp16` on the tiny checkpoint: finite losses and few GradScaler-skipped steps."""
    from jdm_train.bench.step import _trainer, _write_data

    trainer = _trainer(ckpt, _write_data(work / "data64", n=4, size=64), work / "fp16", resolution=64, batch_size=2,
                       cpu=device.type == "cpu", mixed_precision="fp16")
    scaler = trainer.accelerator.scaler
    losses, skipped = [], 0
    for _ in range(args.fp16_steps):
        logs = _step(trainer)
        losses.append(logs.get("generator_loss", math.nan))
        skipped += "nonfinite_skipped" in logs or any(o.step_was_skipped for o in trainer.optimizers.values())
    finite = all(math.isfinite(v) for v in losses)
    storm = skipped > args.fp16_steps // 4
    out = dict(steps=args.fp16_steps, finite=finite, skipped=int(skipped), storm=storm, losses=losses,
               grad_scaler=scaler is not None, final_scale=float(scaler.get_scale()) if scaler else None,
               weight_dtype=str(trainer.codec.dtype))
    del trainer
    _release(device)
    note = (f"GradScaler scale now {out['final_scale']:g}" if scaler else
            f"no GradScaler: fp16 autocast falls back to {out['weight_dtype']} on {device.type}")
    return [row("fp16 + loss scaling (tiny model)", f"64 px, batch 2, {args.fp16_steps} steps",
                f"losses {'finite' if finite else 'NOT finite'}; {skipped} skipped; "
                f"{'SKIPPED-STEP STORM' if storm else 'no storm'}", "", note)], out


# ----------------------------------------------------------------------------- the run


def write_checkpoints(work: Path, tiny: bool, sections: list[str]) -> tuple[dict, Path]:
    from jdm_train import fixtures, model_io

    ckpts = {"tiny": fixtures.write_tiny_sd1_checkpoint(work / "tiny.safetensors")}
    ckpts["train"] = ckpts["tiny"]
    if not tiny and "train" in sections:
        ckpts["train"] = fixtures.write_full_sd1_checkpoint(work / "sd15_random.safetensors")
    # load_taesd_decoder takes ComfyUI's `taesd_decoder.*` keys (the encoder's are ignored).
    taesd = model_io.save_state_dict(work / "taesd_decoder.safetensors",
                                     model_io.taesd_from_diffusers(fixtures.make_taesd_vae().state_dict()), {})
    return ckpts, taesd


def environment(device: torch.device, args) -> dict:
    env = dict(device=device.type, tiny=args.tiny, torch=torch.__version__, python=platform.python_version(),
               cap_bytes=int(args.cap_gib * 2**30), resolution=args.resolution)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        env.update(cpu_threads=torch.get_num_threads())
    return env


def markdown(rows: list[dict]) -> str:
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS]

    def line(cells) -> str:
        return "| " + " | ".join(f"{c:<{w}}" for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line([r[c] for c in COLUMNS]) for r in rows)])


def run_section(name: str, fn: Callable[[], tuple[list[dict], dict]], report: dict) -> None:
    """Run one section; an exception becomes an error row, and the next section still runs."""
    start = time.perf_counter()
    print(f"[bench gpu] {name} ...", file=sys.stderr, flush=True)
    try:
        rows, details = fn()
    except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others' figures
        traceback.print_exc()
        rows, details = [row(name, "", "ERROR", "", f"{type(exc).__name__}: {exc}".splitlines()[0][:200])], None
        report["errors"].append({"section": name, "error": traceback.format_exc()[-4000:]})
    report["sections"][name] = details
    report["rows"] += rows
    report["seconds"][name] = time.perf_counter() - start
    print(f"[bench gpu] {name}: {report['seconds'][name]:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refusal = device_error(args.device)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    start = time.monotonic()
    device = torch.device(args.device)
    sections = args.sections.split(",")
    report = dict(environment=environment(device, args), rows=[], sections={}, seconds={}, errors=[], complete=False)

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="jdm-bench-gpu-") as tmp:
        work = Path(tmp)
        ckpts, taesd = write_checkpoints(work, args.tiny, sections)
        runs = {"canny": lambda: bench_canny(device, args), "sampling": lambda: bench_sampling(device, args),
                "fp16": lambda: bench_fp16(ckpts["tiny"], work, device, args)}
        for mode in args.modes.split(","):  # a mode of its own section: one that breaks leaves the other's figures
            runs[f"train {mode}"] = functools.partial(bench_mode, mode, ckpts["train"], taesd, work, device, args,
                                                      start + args.budget_s)
        for name, fn in runs.items():
            if name.split()[0] in sections:
                run_section(name, fn, report)
                save()
    report["seconds"]["total"] = time.monotonic() - start
    report["complete"] = True
    save()
    env = report["environment"]
    print(f"JDM on {env.get('gpu', 'cpu')} ({'tiny fixtures' if args.tiny else 'SD1.5 architecture, random weights'}"
          f", torch {env['torch']}), {report['seconds']['total']:.0f} s")
    print(markdown(report["rows"]))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
