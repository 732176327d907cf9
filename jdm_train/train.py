"""The training loop of JDM (arXiv 2503.06652, Alg. 1): the only module that touches accelerate.

The loop runs the `players.phases` in order: each phase's terms are computed per micro-batch
(`players.Players`, pure losses), back-propagated into their own parameters, averaged across
processes, clipped and stepped here. Models are built by `build.build_models` and handed in;
checkpoints are `checkpoint.py`'s; validation grids and exports go through `validation.py` and
`export.py`, written by the main process only.

Randomness is a pure function of (seed, step, micro-batch, repeat, process, purpose)
(`players.RandomStreams`), and the batch order of (seed, step) (`data.BatchOrder`), so a
resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from jdm_train import model_io, optim
from jdm_train.build import Models, build_models, load_dataset, preflight
from jdm_train.checkpoint import (RunState, checkpoint_bytes, checkpoints, load_checkpoint, remove_partial, save_checkpoint,
                                  weights_digest)
from jdm_train.config import TrainConfig
from jdm_train.data import BatchOrder, CaptionedImageFolder
from jdm_train.denoisers import averaged
from jdm_train.export import clean_export_leftovers, default_output_dir, write_exports
from jdm_train.players import Phase, Players, RandomStreams, phases
from jdm_train.schedule import NoiseSchedule
from jdm_train.stop import StopSignals
from jdm_train.synthesis import draw_training_set, is_prompt_list
from jdm_train.validation import validation_columns, validation_set, write_validation

log = logging.getLogger("jdm_train")
_SHOWN = ("generator_loss", "fake_score_loss", "consistency_loss", "disc_loss", "dsm_loss", "controlnet_loss")


class NonFiniteLossError(RuntimeError):
    """Raised when `--max-nonfinite` consecutive steps had a non-finite loss."""


class Trainer:
    """Runs Alg. 1 of JDM on `models` (built from the config unless handed in) and `dataset`."""

    def __init__(self, config: TrainConfig, models: Models | None = None, dataset=None, accelerator=None):
        self.config = config.validate()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.output_dir = default_output_dir(config)
        self.accelerator = acc = accelerator or _accelerator(config, self.output_dir)
        self.device, self.schedule, self.state = acc.device, NoiseSchedule(), RunState()
        self.nonfinite_run, self.signals = 0, StopSignals()
        # Everything that can refuse the run does so before minutes of model loading, as one line.
        self.resume_from = preflight(config, self.output_dir)
        drawn = dataset is None and is_prompt_list(config.data)
        self.dataset = dataset if dataset is not None or drawn else load_dataset(config)
        self.models = models or build_models(config, self.device, _autocast_dtype(acc), self.schedule)
        if drawn:
            self.dataset = self._draw_dataset()
        self.roles, self.codec, self.extractor = self.models.roles, self.models.codec, self.models.extractor
        self.order = BatchOrder(len(self.dataset), config.batch_size, config.seed, acc.process_index, acc.num_processes)
        self.streams = RandomStreams(config.seed, acc.process_index, self.device)
        self.players = Players(config, self.models, self.schedule, self.streams, acc.autocast)
        if config.regression_weight > 0 and config.objective in ("jdm", "vsd"):
            self.players.pairs = self._draw_pairs()
        optimizers = optim.build_optimizers(config, self.roles.groups)
        self.learning_rates = optim.base_rates(optimizers)
        prepared = acc.prepare(*optimizers.values())
        self.optimizers = dict(zip(optimizers, prepared if isinstance(prepared, (tuple, list)) else [prepared]))
        self.ema = None
        if config.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            # diffusers' EMA with its warm-up min(decay, (1 + n) / (10 + n)): early averages are short.
            self.ema = EMAModel(self.generator_params(), decay=config.ema_decay, foreach=True)
        self.phases: list[Phase] = phases(self.players, self.optimizers, self.ema)
        for name in self.optimizers:
            self.state.grad_norms.setdefault(name, [])
            self.state.clipped.setdefault(name, [0, 0])
        if acc.is_main_process and shutil.disk_usage(self.output_dir).free < checkpoint_bytes(self):
            raise model_io.no_space_error(self.output_dir, checkpoint_bytes(self))
        log.info("process %d/%d on %s; %d training images", acc.process_index, acc.num_processes, self.device,
                 len(self.dataset))

    def _draw_dataset(self) -> CaptionedImageFolder:
        """`--data prompts.txt`: the teacher draws the training images, every process a share."""
        acc = self.accelerator
        folder = draw_training_set(self.config, self.models, self.schedule, self.output_dir / "synthesised",
                                   (acc.process_index, acc.num_processes), acc.autocast, acc.is_main_process)
        acc.wait_for_everyone()
        return CaptionedImageFolder(folder, self.config.resolution)

    def _draw_pairs(self) -> dict:
        """`--regression-weight`: the teacher's ODE pairs for captions spread over the training set,
        drawn by the main process (cached in the output folder) and read by the others."""
        from jdm_train.synthesis import ode_pairs

        acc, n, size = self.accelerator, self.config.regression_pairs, len(self.dataset)
        captions = [_caption(self.dataset, k * size // n if n <= size else k % size) for k in range(n)]
        pairs = None
        if acc.is_main_process:
            pairs = ode_pairs(self.config, self.models, self.schedule, captions, self.output_dir, acc.autocast)
        acc.wait_for_everyone()
        return pairs or ode_pairs(self.config, self.models, self.schedule, captions, self.output_dir, acc.autocast)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    def generator_params(self) -> list:
        """The generator's trained parameters (student UNet or its LoRA, and the ControlNet)."""
        return optim.generator_params(self.roles.groups)

    def averages(self) -> dict:
        """Checkpoint file -> (EMAModel, its parameters): the generator's and the consistency target f^-."""
        found = {"ema.safetensors": (self.ema, self.generator_params()),
                 "consistency_ema.safetensors": (self.players.consistency_ema, self.roles.groups["consistency"])}
        return {file: pair for file, pair in found.items() if pair[0] is not None}

    def replica_digests(self) -> list[str]:
        """`checkpoint.weights_digest` of every process; replicas that drifted apart are an error."""
        from accelerate.utils import gather_object

        digests = [weights_digest(self.roles)]
        if self.accelerator.num_processes > 1:
            digests = gather_object(digests)
        if len(set(digests)) > 1:
            raise RuntimeError(f"step {self.step}: the {len(digests)} replicas hold different weights ({digests})")
        return digests

    @contextmanager
    def ema_weights(self):
        """Within the block the generator holds its EMA weights (`--ema-decay`), what validation and exports show."""
        with averaged(self.ema, self.generator_params()):
            yield

    # ------------------------------------------------------------------ one step

    def load_batch(self, micro: int) -> dict:
        """Micro-batch `micro` of the current step (`Players.batch`)."""
        index = self.step * self.config.gradient_accumulation_steps + micro
        return self.players.batch([self.dataset[i] for i in self.order.indices(index)], self.step, micro)

    def train_step(self) -> dict:
        """Every phase once (the fake one `--fake-updates-per-step` times). A non-finite loss skips
        that update (all its micro-batches, on every process) and is counted."""
        optim.set_learning_rates(self.optimizers, self.learning_rates, self.step, self.config.lr_warmup_steps)
        batches = [self.load_batch(m) for m in range(self.config.gradient_accumulation_steps)]
        logs: dict = {}
        for phase in self.phases:
            for repeat in range(phase.repeats):
                total = self._accumulate(phase, batches, repeat, logs)
                if not _finite(self.accelerator, total):
                    return self._skip()
                if phase.name == "generator":
                    logs["generator_loss"] = total / len(batches)
                for name in phase.optimizers:
                    logs.update(self._apply(name))
                for ema, params in phase.averages:
                    ema.step(params)
        self.nonfinite_run = 0
        return {k: float(v) for k, v in logs.items()}

    def _accumulate(self, phase: Phase, batches: list[dict], repeat: int, logs: dict) -> torch.Tensor:
        """Gradients of every term of `phase` over the micro-batches; returns the summed loss."""
        for name in phase.optimizers:
            self.optimizers[name].zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for batch in batches:
            for term in phase.terms:
                loss, term_logs = term.loss(batch, repeat)
                total = total + loss.detach()
                logs.update(term_logs)
                if torch.isfinite(loss):
                    if term.role is not None:
                        term.role.activate()
                    params = [p for p in term.params if p.requires_grad]
                    self.accelerator.backward(loss * term.weight / len(batches), inputs=params)
        return total

    def _apply(self, name: str) -> dict[str, float]:
        opt = self.optimizers[name]
        params = [p for group in opt.param_groups for p in group["params"]]
        optim.all_reduce_grads(self.accelerator, params)
        limit = optim.clip_limit(self.config, self.state.grad_norms[name])
        norm = float(self.accelerator.clip_grad_norm_(params, limit))
        logs = optim.record_norm(self.state.grad_norms[name], self.state.clipped[name], norm, limit)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {f"{k}_{name}": v for k, v in logs.items()}

    def _skip(self) -> dict:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.state.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("step %d: non-finite loss, update skipped (%d in a row, %d in total)", self.step + 1,
                    self.nonfinite_run, self.state.nonfinite_total)
        if self.nonfinite_run >= self.config.max_nonfinite:
            found = checkpoints(self.output_dir) if self.output_dir.is_dir() else []
            kept = (f"the last good checkpoint is {found[-1][1]} (resume with --resume latest, e.g. with lower "
                    "learning rates)") if found else "no checkpoint was written before the streak"
            raise NonFiniteLossError(f"{self.nonfinite_run} consecutive non-finite losses at step {self.step + 1}; "
                                     f"stopping; {kept}")
        return {"nonfinite_skipped": float(self.state.nonfinite_total)}

    # ------------------------------------------------------------------ the loop

    def resume(self, path: Path) -> None:
        load_checkpoint(self, path)
        optim.report_resumed_rates(self.optimizers, self.learning_rates)
        optim.set_learning_rates(self.optimizers, self.learning_rates, self.step, self.config.lr_warmup_steps)

    def train(self) -> int:
        """Run until `max_steps`, a stop signal, or too many non-finite losses. Returns an exit status."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            remove_partial(self.output_dir)
            for removed in clean_export_leftovers(cfg, self.output_dir):
                log.info("removed %s, left by an interrupted export", removed)
        if self.resume_from is not None:
            self.resume(self.resume_from)
        if cfg.report_to and acc.is_main_process:
            acc.init_trackers("jdm", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str))})
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc="jdm")
        status = 0
        try:
            with self.signals:
                status = self._loop(bar)
            if self.step >= cfg.max_steps:
                # Every finished run leaves a picture of what it learnt, not only weights.
                if not (cfg.validation_every and self.step % cfg.validation_every == 0):
                    path = self.validate()
                    if path is not None:
                        log.info("validation grid (condition | student one step | teacher multi-step): %s", path)
                self.export()
        except NonFiniteLossError as exc:
            log.error("%s", exc)
            status = 3
        except model_io.NoSpaceError as exc:
            log.error("%s", exc)
            status = 4
        finally:
            bar.close()
            if cfg.report_to:
                acc.end_training()
        return status

    def _loop(self, bar) -> int:
        acc, cfg = self.accelerator, self.config
        owed = False
        while self.step < cfg.max_steps:
            logs = self.train_step()
            self.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in _SHOWN})
            if cfg.report_to and self.step % cfg.log_every == 0:
                acc.log(logs, step=self.step)
            if cfg.validation_every and self.step % cfg.validation_every == 0:
                self.validate()
            stop = self._stop_everywhere()
            # A checkpoint due inside a streak of skipped steps is written at the next finite step.
            owed = owed or self.step % cfg.checkpoint_every == 0
            if (owed and self.nonfinite_run == 0) or stop or self.step == cfg.max_steps:
                save_checkpoint(self)
                owed = False
            if cfg.export_every and self.step % cfg.export_every == 0 and self.step < cfg.max_steps:
                self.export()
            if stop:
                log.warning("stopped by signal at step %d; resume with --resume latest", self.step)
                return 130
        return 0

    def validate(self) -> Path | None:
        """`validation-N.png` (and the tracker's image log) with the generator's EMA weights."""
        acc, path = self.accelerator, None
        if acc.is_main_process:
            if not hasattr(self, "_validation"):
                self._validation = validation_set(self.config, self.dataset, self.extractor)
            with self.ema_weights():
                columns = validation_columns(self.models, self.schedule, self.config, self._validation, acc.autocast)
            tracker = acc.get_tracker("tensorboard", unwrap=False) if self.config.report_to in ("tensorboard", "all") else None
            path = write_validation(self.output_dir / f"validation-{self.step:06d}.png", columns, tracker, self.step)
        acc.wait_for_everyone()
        return path

    def export(self) -> dict[str, Path]:
        """The run's ComfyUI exports (`export.write_exports`) with the EMA weights, main process only."""
        acc = self.accelerator
        written: dict[str, Path] = {}
        if acc.is_main_process:
            with self.ema_weights():
                written = write_exports(self.config, self.roles, self.models.teacher_name, self.output_dir)
            for kind, path in written.items():
                log.info("exported %s: %s", kind, path)
        acc.wait_for_everyone()
        return written

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self.signals.requested else 0.0], device=self.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) > 0


def _caption(dataset, index: int) -> str:
    # Datasets that can name a caption without loading the image do (CaptionedImageFolder, the demo's).
    return dataset.caption(index) if hasattr(dataset, "caption") else dataset[index]["caption"]


def _accelerator(config: TrainConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        # A second run in one process (tests, notebooks) may ask for another precision; the
        # process group (PartialState) is kept, only the precision state is rebuilt.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu or not _has_accelerator(),
                       log_with=config.report_to, project_dir=str(output_dir))


def _has_accelerator() -> bool:
    # Without a GPU/MPS/XPU device accelerate must be told "cpu" to join a multi-process (gloo) run.
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "is_available"):
        return bool(api.is_available())
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def _autocast_dtype(acc) -> torch.dtype:
    """The dtype accelerate's autocast really computes in here (fp16 on a CPU may fall back to fp32)."""
    with acc.autocast():
        if torch.is_autocast_enabled(acc.device.type):
            return torch.get_autocast_dtype(acc.device.type)
    return torch.float32


def _finite(acc, value: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=value.device)
    return float(acc.reduce(flag, reduction="sum")) == 0.0


def run(config: TrainConfig) -> int:
    """Train from a validated config; the `jdm-train` entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError, model_io.NoSpaceError) as exc:  # user errors: files, data, annotators, disk
        log.error("%s", exc)
        return 2
    return trainer.train()
