"""`python -m jdm_train.bench toy`: JDM, its f-divergences and the paper's baselines on the analytic world.

Trains each method with a fixed seed on `jdm_train.toy.default_world()` and prints one table:
fidelity to the true conditionals (sliced W2 to exact samples of p(x|c), averaged over c; the
floor row is a second exact sample), consistency (mean true p(c|x) of samples given c), light-mode
mass (p(c)-weighted fraction of samples on the 5% mode) and time. `--seeds 0 1 2 3` prints the
spread over seeds of JDM / DSM ControlNet / implicit VSD instead (what the CI test's margins come
from; with `--divergences rkl js fkl` the spread of JDM per divergence, for light-mode coverage);
`--sweep` prints JDM (reverse-KL) over condition weights. `--referee` compares the consistency-model
estimate of grad log p(c|x_t) with the exact one (`ToyWorld.log_p_c_given_x_t`) over `--seeds`, at
Eq. 5's weight 1 under both condition weightings and at the old toy setting (weight 0.03, eq5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from jdm_train import toy
from jdm_train.losses import CONDITION_WEIGHTINGS, DIVERGENCES

HEADER = ("| method | divergence | fidelity SW2 (lower) | x floor | consistency (truth {truth:.3f}) "
          "| light-mode mass (truth {light:.3f}) | wall s | cpu s |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jdm_train.bench toy", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="generator steps per method (default 600)")
    p.add_argument("--seed", type=int, default=0, help="training seed of the main table (default 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="print the spread of JDM/DSM/VSD over these seeds")
    p.add_argument("--divergences", nargs="+", default=None, choices=DIVERGENCES,
                   help="with --seeds: spread of JDM with these divergences (light-mode coverage) instead of the baselines")
    p.add_argument("--sweep", action="store_true", help="print JDM (rkl) over condition weights 1, 0.3, 0.1, 0.03, 0.01")
    p.add_argument("--referee", action="store_true",
                   help="exact grad log p(c|x_t) vs the consistency-model estimate, over --seeds (default 0 1 2 3)")
    p.add_argument("--condition-weight", type=float, default=toy.TOY_CONDITION_WEIGHT,
                   help="JDM condition weight (default %(default)s)")
    p.add_argument("--condition-weighting", default=toy.TOY_CONDITION_WEIGHTING, choices=CONDITION_WEIGHTINGS,
                   help="JDM condition weighting across t (default %(default)s)")
    p.add_argument("--n", type=int, default=4000, help="evaluation samples per condition (default 4000)")
    return p.parse_args(argv)


def run(world: toy.ToyWorld, method: str, divergence: str, args, seed: int, **kw) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    kw.setdefault("condition_weight", args.condition_weight)
    kw.setdefault("condition_weighting", args.condition_weighting)
    trained = toy.train(world, method, divergence, steps=args.steps, seed=seed, **kw)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    metrics = toy.evaluate(world, toy.student_sampler(trained.student), n=args.n, seed=seed)
    return {**metrics, "wall": wall, "cpu": cpu}


def _row(name: str, divergence: str, m: dict, floor: float) -> str:
    return (f"| {name} | {divergence} | {m['sw2']:.3f} | {m['sw2'] / floor:.1f} | {m['consistency']:.3f} | "
            f"{m['light_mass']:.3f} | {m['wall']:.1f} | {m['cpu']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Tiny MLPs: more threads only add contention on the shared CI cores.
    torch.set_num_threads(1)
    world = toy.default_world()
    floor = toy.evaluate(world, toy.truth_sampler(world), n=args.n, seed=args.seed)
    print(f"toy world: 5-mode 2-D mixture (light mode {float(world.weights[world.light_mode]):.2f}), "
          f"3 sector conditions, {args.steps} steps, eval n={args.n}/condition, condition weight {args.condition_weight}")
    head = HEADER.format(truth=floor["consistency"], light=float(world.weights[world.light_mode]))
    sep = "|---" * 8 + "|"
    if args.referee:
        return _referee(world, args, floor)
    if args.seeds:
        return _spread(world, args, floor)
    print(head)
    print(sep)
    if args.sweep:
        for cw in (1.0, 0.3, 0.1, 0.03, 0.01):
            m = run(world, "jdm", "rkl", args, args.seed, condition_weight=cw)
            print(_row(f"JDM w_c={cw:g}", "rkl", m, floor["sw2"]), flush=True)
        return 0
    for div in DIVERGENCES:
        print(_row("JDM", div, run(world, "jdm", div, args, args.seed), floor["sw2"]), flush=True)
    print(_row("DSM ControlNet", "-", run(world, "dsm", "rkl", args, args.seed), floor["sw2"]), flush=True)
    print(_row("implicit VSD", "rkl", run(world, "vsd", "rkl", args, args.seed), floor["sw2"]), flush=True)
    print(_row("floor (exact resample)", "-", {**floor, "wall": 0.0, "cpu": 0.0}, floor["sw2"]))
    return 0


REFEREE_ROWS = (
    ("JDM, exact p(c|x_t)", "exact", 1.0, "eq5"),
    ("JDM, exact p(c|x_t)", "exact", 1.0, "snr"),
    ("JDM, consistency-model estimate", "estimate", 1.0, "snr"),
    ("JDM, consistency-model estimate", "estimate", 1.0, "eq5"),
    ("JDM, consistency-model estimate (old toy setting)", "estimate", 0.03, "eq5"),
)


def _referee(world: toy.ToyWorld, args, floor: dict) -> int:
    seeds = args.seeds or [0, 1, 2, 3]
    print(f"seeds {seeds}; floor SW2 {floor['sw2']:.3f}, truth consistency {floor['consistency']:.3f}, "
          f"light mode {float(world.weights[world.light_mode]):.3f}; mean +- std over seeds")
    print("| condition term | weight | weighting | SW2 | consistency | light-mode mass | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, condition, weight, weighting in REFEREE_ROWS:
        results = [run(world, "jdm", "rkl", args, s, condition=condition, condition_weight=weight,
                       condition_weighting=weighting) for s in seeds]
        cells = []
        for key in ("sw2", "consistency", "light_mass"):
            v = [r[key] for r in results]
            cells.append(f"{statistics.mean(v):.3f} +- {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}")
        wall = sum(r["wall"] for r in results)
        print(f"| {name} | {weight:g} | {weighting} | " + " | ".join(cells) + f" | {wall:.0f} |", flush=True)
    return 0


def _spread(world: toy.ToyWorld, args, floor: dict) -> int:
    print(f"spread over seeds {args.seeds} (mean / std / min / max); floor SW2 {floor['sw2']:.3f}, "
          f"truth consistency {floor['consistency']:.3f}")
    print("| method | metric | mean | std | min | max |")
    print("|---|---|---|---|---|---|")
    if args.divergences:
        plan = [(f"JDM {d}", "jdm", d) for d in args.divergences]
    else:
        plan = [("JDM rkl", "jdm", "rkl"), ("DSM ControlNet", "dsm", "rkl"), ("implicit VSD", "vsd", "rkl")]
    for name, method, div in plan:
        results = [run(world, method, div, args, s) for s in args.seeds]
        for key in ("sw2", "consistency", "light_mass"):
            v = [r[key] for r in results]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            print(f"| {name} | {key} | {statistics.mean(v):.3f} | {sd:.3f} | {min(v):.3f} | {max(v):.3f} |", flush=True)
    return 0
