"""`python -m jdm_train.bench threads`: demo training-step time with 1 and 2 torch threads, alone and
beside a busy process (one core kept spinning), side by side in one run.

Each row is a fresh process that builds the demo trainer with `--threads N`, runs `--warmup` steps,
then times `--steps` steps. The busy neighbour is a plain Python loop bounded in time. OpenMP worker
threads that spin-wait for a core another process holds are what makes a shared CPU slow; the table
says which thread count degrades gracefully there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_WORKER = """
import json, sys, time
from jdm_train import cli
{configure}
from jdm_train.train import Trainer
trainer = Trainer(cli.parse_args(sys.argv[1:]))
for _ in range({warmup}):
    trainer.train_step(); trainer.step += 1
start = time.perf_counter()
for _ in range({steps}):
    trainer.train_step(); trainer.step += 1
print(json.dumps({{"s_per_step": (time.perf_counter() - start) / {steps}}}))
"""

_SPINNER = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jdm_train.bench threads", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    p.add_argument("--max-seconds", type=int, default=600, help="limit of one row and of its busy neighbour")
    p.add_argument("--spinning", action="store_true",
                   help="keep OpenMP's default spin-waiting instead of the trainer's passive waits")
    return p.parse_args(argv)


def time_steps(threads: int, busy: bool, args) -> float:
    """Seconds per demo training step in a fresh process with `threads` torch threads."""
    with tempfile.TemporaryDirectory(prefix="jdm-threads-") as out:
        flags = ["--ckpt", "demo", "--control", "canny", "--threads", str(threads), "--output-dir", out,
                 "--max-steps", str(args.warmup + args.steps + 1)]
        configure = "" if args.spinning else "cli.passive_openmp_waits()  # as `python -m jdm_train` does"
        code = _WORKER.format(warmup=args.warmup, steps=args.steps, configure=configure)
        spinner = None
        if busy:
            spinner = subprocess.Popen([sys.executable, "-c", _SPINNER.format(seconds=args.max_seconds)])
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
        if args.spinning:
            env.pop("OMP_WAIT_POLICY", None)
        try:
            done = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True,
                                  timeout=args.max_seconds, env=env, check=False)
        except subprocess.TimeoutExpired:
            return float("inf")  # slower than --max-seconds for the whole row
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["s_per_step"]


def main(argv=None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    waits = "spinning (OpenMP's default)" if args.spinning else "passive (the trainer's)"
    print(f"demo trainer, {args.steps} timed steps after {args.warmup}; {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at start; OpenMP waits {waits}")
    print("| torch threads | alone s/step | beside a busy process s/step | slowdown |")
    print("|---|---|---|---|")
    for n in args.threads:
        alone, busy = time_steps(n, False, args), time_steps(n, True, args)
        cells = [f"{v:.3f}" if v != float("inf") else f"> {args.max_seconds} s for the row" for v in (alone, busy)]
        ratio = f"{busy / alone:.2f}x" if busy != float("inf") and alone != float("inf") else "-"
        print(f"| {n} | {cells[0]} | {cells[1]} | {ratio} |", flush=True)
    return 0
