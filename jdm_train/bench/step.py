"""`python -m jdm_train.bench step [--full]`: cost of one JDM training step.

Default: on a tiny SD1.x checkpoint (jdm_train.fixtures), the median time of one full
`Trainer.train_step()` (generator update + fake-score/consistency update, optimizers included)
next to the sum of the model passes that step needs, each timed alone on the same shapes. The
ratio is the trainer's overhead (adapter switching, data, extraction, bookkeeping); goal <= 1.15.

`--full`: one step of the full SD1.5 architecture at 512 px (random weights written in the real
LDM layout) in the low-memory mode (student and fake score as LoRAs on one frozen base,
gradient checkpointing) and in the default mode (full copies), each in its own process, with
its peak memory (CUDA allocator peak on a GPU, peak RSS on the CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _write_data(folder: Path, n: int = 4, size: int = 72) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        a[size // 4: size // 2] = 255
        Image.fromarray(a).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder


def _trainer(ckpt: Path, data: Path, work: Path, **overrides):
    from jdm_train.config import TrainConfig
    from jdm_train.train import Trainer

    cfg = TrainConfig(ckpt=str(ckpt), data=str(data), output_dir=str(work / "run"), **overrides)
    return Trainer(cfg)


def model_passes(trainer) -> dict[str, callable]:
    """Each model pass of one JDM step (rkl, no CFG, no reward), runnable alone on the step's shapes."""
    from jdm_train import losses
    from jdm_train.sampling import generate_one_step

    cfg, roles, sched = trainer.config, trainer.roles, trainer.schedule
    batch = trainer.load_batch(0)
    cond = batch["cond"]
    z = torch.randn(trainer.players.latent_shape(cfg.batch_size), device=trainer.device)
    t = torch.full((cfg.batch_size,), 500, device=trainer.device)
    with torch.no_grad():
        x = generate_one_step(roles.student, z, cfg.generator_timestep, cond)
    x_t = sched.add_noise(x, torch.randn_like(x), t)
    control = batch["control"]

    student_params = roles.groups.get("student", []) + roles.groups["controlnet"]

    def student_fwd_bwd():
        out = generate_one_step(roles.student, z, cfg.generator_timestep, cond)
        out.square().mean().backward(inputs=student_params)

    def teacher_fwd():
        with torch.no_grad():
            roles.teacher(x_t, t, cond)

    def fake_fwd():
        with torch.no_grad():
            roles.fake(x_t, t, cond)

    def condition_grad():
        losses.condition_gradient(x_t, t, roles.consistency,
                                  lambda img: trainer.extractor.log_likelihood(img, control, cfg.condition_tau),
                                  cond, trainer.codec.decode)

    def fake_fwd_bwd():
        losses.fake_score_loss(roles.fake, x, torch.randn_like(x), t, sched, cond)[0].backward(
            inputs=roles.groups["fake"])

    def consistency_fwd_bwd():
        losses.consistency_loss(roles.consistency, trainer.players.consistency_target, x, torch.randn_like(x), t, t - 20, sched,
                                cond)[0].backward(
            inputs=roles.groups["consistency"])

    def extract():
        with torch.no_grad():
            trainer.extractor.extract(batch["images"])

    def optimizer_steps():
        for opt in trainer.optimizers.values():
            params = [p for g in opt.param_groups for p in g["params"]]
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return {"student fwd+bwd (UNet+ControlNet)": student_fwd_bwd, "teacher fwd": teacher_fwd, "fake score fwd": fake_fwd,
            "condition grad (consistency+decode+extractor)": condition_grad, "fake score fwd+bwd": fake_fwd_bwd,
            "consistency fwd + fwd+bwd": consistency_fwd_bwd, "condition extraction": extract,
            "optimizer steps": optimizer_steps}


def bench_tiny(repeat: int) -> int:
    from jdm_train import fixtures

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = fixtures.write_tiny_sd1_checkpoint(work / "tiny.safetensors")
        trainer = _trainer(ckpt, _write_data(work / "data"), work, resolution=64, batch_size=2, cpu=True)

        def step():
            trainer.train_step()
            trainer.step += 1

        passes_fns = model_passes(trainer)
        # Interleaved rounds: on a shared CPU the load drifts, and both sides should see the same drift.
        step(), [fn() for fn in passes_fns.values()]
        step_times, pass_times = [], {name: [] for name in passes_fns}
        for _ in range(repeat):
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
            for name, fn in passes_fns.items():
                start = time.perf_counter()
                fn()
                pass_times[name].append(time.perf_counter() - start)
        for opt in trainer.optimizers.values():
            opt.zero_grad(set_to_none=True)
        step_time = statistics.median(step_times)
        passes = {name: statistics.median(ts) for name, ts in pass_times.items()}
    total = sum(passes.values())
    print(f"one JDM step, tiny SD1.x checkpoint, 64 px, batch 2, threads {torch.get_num_threads()}, "
          f"median of {repeat} interleaved rounds")
    print(f"| {'part':<48} | {'ms':>9} |")
    print(f"|{'-' * 50}|{'-' * 11}|")
    for name, seconds in passes.items():
        print(f"| {name:<48} | {seconds * 1e3:9.1f} |")
    print(f"| {'sum of passes timed alone':<48} | {total * 1e3:9.1f} |")
    print(f"| {'Trainer.train_step()':<48} | {step_time * 1e3:9.1f} |")
    ratio = step_time / total
    print(f"ratio step / sum = {ratio:.3f} (goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")
    return 0


def _full_worker(ckpt: str, mode: str, resolution: int) -> None:
    """One SD1.5-architecture step in this process; prints a JSON line with time and peak memory."""
    work = Path(tempfile.mkdtemp())
    low = mode == "low-memory"
    overrides = dict(resolution=resolution, batch_size=1, gradient_checkpointing=low,
                     student_lora_rank=64 if low else 0, fake_lora_rank=64 if low else 0)
    if low:
        from jdm_train import fixtures, model_io

        taesd = {k[len("taesd_decoder."):]: v for k, v in
                 model_io.taesd_from_diffusers(fixtures.make_taesd_vae().state_dict()).items()
                 if k.startswith("taesd_decoder.")}
        path = model_io.save_state_dict(work / "taesd_decoder.safetensors", taesd, {})
        overrides.update(mixed_precision="bf16", cond_decoder="taesd", taesd=str(path))
    trainer = _trainer(Path(ckpt), _write_data(work / "data", n=1, size=resolution), work, **overrides)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainable = sum(p.numel() for ps in trainer.roles.groups.values() for p in ps)
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_bytes": peak, "device": str(trainer.device),
                      "trainable_params": trainable}))


# Parameters of the SD1.5 parts (UNet, ControlNet) for the memory estimate of each mode.
_SD15_UNET, _SD15_CONTROLNET, _SD15_REST = 859.5e6, 361.3e6, 207e6


def estimated_bytes(mode: str) -> float:
    """fp32 weights + grads + AdamW moments of what a mode trains, plus its frozen weights (no activations).

    low-memory: student and fake score are LoRAs on one frozen base kept in bf16, TAESD decodes the
    condition term, gradient checkpointing; default: full fp32 copies for teacher, student, fake score."""
    if mode == "low-memory":
        return 2 * (_SD15_UNET + _SD15_REST) + 16 * _SD15_CONTROLNET
    return 4 * (_SD15_UNET + _SD15_REST) + 16 * (_SD15_CONTROLNET + 2 * _SD15_UNET)


def _available_ram() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def bench_full(modes: list[str], resolution: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        # Written by a child process so that the 4 GB of fp32 modules it builds are not held here.
        ckpt = Path(tmp) / "sd15_random.safetensors"
        subprocess.run([sys.executable, "-c", "import sys; from jdm_train import fixtures; "
                        "fixtures.write_full_sd1_checkpoint(sys.argv[1])", str(ckpt)], check=True)
        rows = []
        for mode in modes:
            need = estimated_bytes(mode) + 3 * 2**30  # + activations at 512 px with checkpointing
            if not torch.cuda.is_available() and need > 0.9 * _available_ram():
                rows.append((mode, None, [f"skipped: needs ~{need / 2**30:.0f} GiB (weights/grads/Adam + activations), "
                                          f"{_available_ram() / 2**30:.0f} GiB RAM available"]))
                continue
            proc = subprocess.run([sys.executable, "-m", "jdm_train.bench", "step", "--_worker", str(ckpt), mode,
                                   str(resolution)], capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not line:
                rows.append((mode, None, proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]))
            else:
                rows.append((mode, json.loads(line[-1]), None))
    print(f"one JDM step, SD1.5 architecture (random weights), {resolution} px, batch 1; "
          f"estimated static memory: " + ", ".join(f"{m} {estimated_bytes(m) / 2**30:.1f} GiB" for m in modes))
    print(f"| {'mode':<11} | {'device':<6} | {'trainable params':>16} | {'step s':>8} | {'peak memory GiB':>15} |")
    print(f"|{'-' * 13}|{'-' * 8}|{'-' * 18}|{'-' * 10}|{'-' * 17}|")
    for mode, r, err in rows:
        if r is None:
            print(f"| {mode:<11} | {err[0] if err else 'failed'}")
        else:
            print(f"| {mode:<11} | {r['device']:<6} | {r['trainable_params']:>16,} | {r['seconds']:8.1f} | "
                  f"{r['peak_bytes'] / 2**30:15.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        _full_worker(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m jdm_train.bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also one SD1.5-architecture step at 512 px per mode")
    parser.add_argument("--modes", default="low-memory,default", help="comma-separated modes for --full")
    parser.add_argument("--resolution", type=int, default=512, help="resolution of the --full step")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median) of the tiny step")
    args = parser.parse_args(argv)
    bench_tiny(args.repeat)
    if args.full:
        bench_full(args.modes.split(","), args.resolution)
    return 0


if __name__ == "__main__":
    sys.exit(main())
