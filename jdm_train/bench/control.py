"""`python -m jdm_train.bench control [trainer flags]`: does the student learn to use its control?

Trains on the demo teacher in this process (any trainer flag may be given, e.g. `--objective dsm`
or `--condition-weight 30`) and, every `--every` steps, generates the same held-out captions and
noise three ways: with each image's own condition, with a blank condition, and with another
held-out image's condition. Each is scored against the image's own condition. Prints one table
row per evaluation:

- consistency `||h(x) - c||_1` (the paper's metric) for own / blank / shuffled control;
- for canny, edge F1 with a 1-pixel tolerance (thin edges at 64 px make L1 favour flat images:
  a blank image scores the edge density of c, better than the VAE's own reconstructions);
- sensitivity `mean |x(c) - x(blank)|` of the decoded images;
- FID against the teacher's 25-step CFG-4 samples (demo feature network) and how often the
  background follows the caption, so that control is not bought with image quality.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

from jdm_train.evaluate import edge_f1


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m jdm_train.bench control", description=__doc__.split("\n")[0])
    p.add_argument("--every", type=int, default=100, help="evaluate every this many steps")
    p.add_argument("--n", type=int, default=64, help="held-out conditions scored")
    p.add_argument("--grid", default=None, help="PNG written at each evaluation: control | own | blank | shuffled, 8 rows")
    p.add_argument("--consistency-steps", type=int, default=0,
                   help="after training, this many more updates of the consistency LoRA alone (student and fake "
                        "score frozen), then the consistency-model table again: does f keep moving off the mean?")
    return p.parse_known_args(argv)


class ControlProbe:
    """Scores a trainer's student on held-out demo conditions: own, blank and shuffled control."""

    def __init__(self, trainer, n: int):
        from jdm_train import evaluate
        from jdm_train.denoisers import Cond
        from jdm_train.sampling import ddim_reference

        self.trainer, self.extractor = trainer, trainer.extractor
        self.eval_set = evaluate.demo_eval_set(n, trainer.config.control)
        self.noise = torch.randn((n,) + trainer.players.latent_shape(1)[1:], generator=torch.Generator().manual_seed(0))
        self.text = trainer.codec.encode_text(self.eval_set.captions)
        self.features = evaluate.DemoFeatures()
        self.images: dict[str, Tensor] = {}
        # The trainer's own (frozen) teacher, as `evaluate` samples it: 25 DDIM steps, CFG 4, empty negative.
        with torch.no_grad():
            latents = ddim_reference(trainer.roles.teacher, self.noise.to(trainer.device), Cond(self.text),
                                     Cond(trainer.codec.encode_text([""] * n)), 25, 4.0, trainer.schedule)
        self.reference = self.features.features(trainer.codec.decode(latents).cpu())

    def write_grid(self, path: str, rows: int = 8) -> None:
        from jdm_train.export import write_column_grid

        columns = [self.eval_set.control[:rows]] + [self.images[m][:rows] for m in ("own", "blank", "shuffled")]
        write_column_grid(Path(path), columns)

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        from jdm_train import evaluate
        from jdm_train.denoisers import Cond
        from jdm_train.sampling import generate_one_step

        tr, c = self.trainer, self.eval_set.control
        out, images = {}, {}
        with tr.ema_weights():  # what the run would export; swapped in once for the three controls
            for mode, control in (("own", c), ("blank", torch.zeros_like(c)), ("shuffled", c.roll(-1, 0))):
                x = generate_one_step(tr.roles.student, self.noise.to(tr.device), tr.config.generator_timestep,
                                      Cond(self.text, control.to(tr.device)))
                images[mode] = tr.codec.decode(x).cpu()
        for mode in images:
            out[f"L1 {mode}"] = float(self.extractor.consistency(images[mode], c).mean())
            if tr.config.control == "canny":
                out[f"F1 {mode}"] = edge_f1(self.extractor.extract(images[mode]), c)
        self.images = images
        out["sensitivity"] = float((images["own"] - images["blank"]).abs().mean())
        out["FID"] = evaluate.fid(self.features.features(images["own"]), self.reference)
        out["bg"] = self.features.agreement(images["own"], self.eval_set.captions)["background"]
        return out

    @torch.no_grad()
    def consistency_model_table(self, timesteps=(100, 300, 500, 700), boots: int = 200) -> list[dict[str, float]]:
        """The consistency model f (Eq. 8) against the fake score's posterior mean, on the student's own
        samples x noised to x_t: realism of the decoded x0 (FID against the held-out data images) at every
        t, and edge F1 of its canny map against the clean sample's own, where x_t still holds x's shapes.
        A mean minimises the distance to x by construction, so that distance is not the test.

        Each difference f - mean comes with a paired bootstrap 95% interval (both decoded from the same
        x_t, resampled together): a difference whose interval holds 0 is not one these samples resolve."""
        from jdm_train import evaluate
        from jdm_train.denoisers import Cond
        from jdm_train.sampling import generate_one_step

        tr, c = self.trainer, self.eval_set.control.to(self.trainer.device)
        cond = Cond(self.text, c)
        with tr.ema_weights():
            x = generate_one_step(tr.roles.student, self.noise.to(tr.device), tr.config.generator_timestep, cond)
        clean_edges = self.extractor.extract(tr.codec.decode(x).cpu())
        data_stats = evaluate.feature_stats(self.features.features(self.eval_set.images))
        fid = lambda feats: evaluate.frechet_distance(*evaluate.feature_stats(feats), *data_stats)  # noqa: E731
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)
        rows = []
        for step in timesteps:
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            x_t = tr.schedule.add_noise(x, eps, t)
            feats, edges = {}, {}
            for name, model in (("f", tr.roles.consistency), ("mean", tr.roles.fake)):
                image = tr.codec.decode(model(x_t, t, Cond(self.text))).cpu()
                feats[name], edges[name] = self.features.features(image), self.extractor.extract(image)
            row = {"t": step}
            for metric, stat in (("FID", lambda n, i: fid(feats[n][i])),
                                 ("F1", lambda n, i: edge_f1(edges[n][i], clean_edges[i]))):
                diff, lo, hi = paired_bootstrap(lambda i: stat("f", i) - stat("mean", i), x.shape[0], boots)
                all_ = torch.arange(x.shape[0])
                row.update({f"{metric} f": stat("f", all_), f"{metric} mean": stat("mean", all_),
                            f"{metric} f-mean": diff, f"{metric} 95% lo": lo, f"{metric} 95% hi": hi})
            rows.append(row)
        return rows


def paired_bootstrap(statistic, n: int, boots: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """`statistic(indices)` on all n items, and the 2.5% / 97.5% percentiles of it over `boots`
    resamples of the items with replacement (the same resample for both sides of a paired difference)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.tensor([statistic(torch.randint(0, n, (n,), generator=gen)) for _ in range(boots)], dtype=torch.float64)
    lo, hi = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return statistic(torch.arange(n)), lo, hi


def train_consistency_only(trainer, steps: int) -> None:
    """`steps` updates of Eq. 8 alone on the frozen student's samples, as the trainer's fake phase
    makes them (same sampler, target EMA, optimiser and random streams)."""
    from jdm_train.players import Phase, Term

    params = trainer.roles.groups["consistency"]
    phase = Phase("consistency", [Term("consistency", trainer.players.consistency, params)], ["fake"],
                  [(trainer.players.consistency_ema, params)])
    for _ in range(steps):
        trainer._accumulate(phase, [trainer.load_batch(0)], 0, {})
        trainer._apply("fake")
        trainer.players.consistency_ema.step(params)
        trainer.step += 1


def _print_consistency_table(probe) -> None:
    print(_format([(r.pop("t"), 0.0, r) for r in probe.consistency_model_table()]).replace("| step | s |", "| t | - |"))


def main(argv=None) -> int:
    from jdm_train import cli
    from jdm_train.train import Trainer

    args, train_argv = parse_args(argv)
    if "--ckpt" not in train_argv:
        train_argv = ["--ckpt", "demo", *train_argv]
    if "--output-dir" not in train_argv:
        train_argv += ["--output-dir", "bench_control"]
    trainer = Trainer(cli.parse_args(train_argv))
    if trainer.resume_from is not None:  # `--resume latest`: score (and continue) a finished or stopped run
        trainer.resume(trainer.resume_from)
    probe = ControlProbe(trainer, args.n)
    rows, t0 = [(trainer.step, 0.0, probe())], time.perf_counter()
    print(_format(rows), flush=True)
    logs = {}
    while trainer.step < trainer.config.max_steps:
        logs = trainer.train_step()
        trainer.step += 1
        if trainer.step % args.every == 0 or trainer.step == trainer.config.max_steps:
            rows.append((trainer.step, time.perf_counter() - t0, probe()))
            print(_format(rows[-1:], header=False), flush=True)
            if args.grid:
                probe.write_grid(args.grid)
    print("\n" + _format(rows))
    clipped = {k: v for k, v in logs.items() if k.startswith("clipped_share_")}
    print("share of updates clipped: " + ", ".join(f"{k[len('clipped_share_'):]} {v:.3f}" for k, v in clipped.items()))
    print("\nconsistency model f vs the fake score's mean, on the student's own samples (FID vs data; F1 vs the clean"
          " sample's canny):")
    _print_consistency_table(probe)
    if args.consistency_steps:
        train_consistency_only(trainer, args.consistency_steps)
        print(f"\nthe same after {args.consistency_steps} more updates of the consistency LoRA alone:")
        _print_consistency_table(probe)
    return 0


def _format(rows, header: bool = True) -> str:
    keys = list(rows[0][2])
    lines = []
    if header:
        lines = ["| step | s | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for step, seconds, r in rows:
        lines.append(f"| {step} | {seconds:.0f} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    return "\n".join(lines)
