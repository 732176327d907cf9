"""The training configuration: one dataclass, saved inside every checkpoint and export.

Precedence when the command line is parsed (`cli.parse_args`): dataclass defaults, then
the keys of a `--config FILE` (TOML or JSON), then the flags actually given.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

CONTROLS = ("canny", "hed", "depth", "lowres")
OBJECTIVES = ("jdm", "dsm", "vsd", "controlnet")
DIVERGENCES = ("rkl", "srkl", "js", "hellinger", "fkl", "jeffreys")
PHASES = ("joint", "extend")
MIXED_PRECISION = ("no", "fp16", "bf16")
COND_DECODERS = ("vae", "taesd")
CONDITION_WEIGHTINGS = ("eq5", "snr", "x0")  # as losses.CONDITION_WEIGHTINGS
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")
CONSISTENCY_PAIRS = ("noise", "ode")  # as losses.consistency_loss: training (same eps) or the fake score's ODE
#: Keys of earlier versions, read as their new names (configs and checkpoints stay loadable).
RENAMED_KEYS = {"preview_every": "validation_every", "preview_teacher_steps": "validation_teacher_steps"}
#: The keys that define the objective. They have one default for every model: `--ckpt demo`
#: may not change them (jdm_train.demo.TRAIN_DEFAULTS), so what is measured on the demo is what
#: an SD1.5 user runs.
OBJECTIVE_KEYS = ("objective", "divergence", "fidelity_weight", "condition_weight", "condition_tau",
                  "condition_t_max", "condition_weighting", "control_dropout", "reward_weight", "gan_weight",
                  "consistency_weight", "consistency_points", "consistency_ema", "consistency_pairs", "t_min", "t_max",
                  "generator_timestep", "max_grad_norm", "clip_outliers", "regression_weight")


@dataclass
class TrainConfig:
    """Every knob of a training run (see `cli.py` for the help text of each)."""

    # models and data
    ckpt: str = ""
    control: str = "canny"
    data: str | None = None
    comfyui_root: str | None = None
    output: str = "jdm"
    output_dir: str | None = None
    student: str | None = None
    cfg_teacher: str | None = None
    allow_pickle: bool = False
    # run length and batch
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    resolution: int = 512
    seed: int = 0
    # objective (docs/method.md)
    objective: str = "jdm"
    divergence: str = "rkl"
    phase: str = "joint"
    generator_timestep: int = 999
    t_min: int = 20
    t_max: int = 980
    cfg_scale: float = 1.0
    negative_prompt: str = ""
    reward: str | None = None
    fidelity_weight: float = 1.0
    # One set for every model (docs/method.md says why they transfer from the demo to SD1.5 at 512 px).
    condition_weight: float = 1.0
    condition_tau: float = 4.0
    condition_t_max: int = 999
    condition_weighting: str = "snr"
    control_dropout: float = 0.3
    ema_decay: float = 0.0
    reward_weight: float = 1.0
    gan_weight: float = 0.0
    consistency_weight: float = 1.0
    consistency_points: int = 10
    consistency_ema: float = 0.95
    consistency_pairs: str = "noise"
    fake_updates_per_step: int = 1
    regression_weight: float = 0.0
    regression_pairs: int = 512
    # --data prompts.txt: the teacher draws the training images
    synthesis_steps: int = 25
    synthesis_cfg: float = 7.5
    # models' parametrisation
    student_lora_rank: int = 0
    fake_lora_rank: int = 0
    consistency_lora_rank: int = 16
    cond_decoder: str = "vae"
    taesd: str = "taesd_decoder.safetensors"
    # optimisation
    lr_student: float = 1e-5
    lr_controlnet: float = 1e-5
    lr_fake: float = 1e-5
    lr_consistency: float = 1e-4
    lr_discriminator: float = 1e-5
    adam_beta1: float = 0.0
    adam_beta1_controlnet: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    lr_warmup_steps: int = 0
    max_grad_norm: float = 0.0
    clip_outliers: float = 5.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cpu: bool = False
    threads: int = 0
    # bookkeeping
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = None
    resume: str | None = None
    validation_every: int = 0
    validation_teacher_steps: int = 20
    validation_prompt: list[str] | None = None
    validation_image: list[str] | None = None
    export_every: int = 0
    save_precision: str = "fp32"
    log_every: int = 1
    report_to: str | None = None
    max_nonfinite: int = 5

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the flag and what was expected; return self."""
        self._check_choices_and_counts()
        self._check_ranges()
        self._check_combinations()
        return self

    def _check_choices_and_counts(self) -> None:
        for name, choices in (("control", CONTROLS), ("objective", OBJECTIVES), ("divergence", DIVERGENCES),
                              ("phase", PHASES), ("mixed_precision", MIXED_PRECISION), ("cond_decoder", COND_DECODERS),
                              ("condition_weighting", CONDITION_WEIGHTINGS), ("save_precision", SAVE_PRECISIONS),
                              ("consistency_pairs", CONSISTENCY_PAIRS)):
            if getattr(self, name) not in choices:
                _bad(name, getattr(self, name), "one of " + ", ".join(choices))
        if not self.ckpt:
            _bad("ckpt", self.ckpt, "a checkpoint name or path (or 'demo')")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "resolution", "fake_updates_per_step",
                     "checkpoint_every", "log_every", "max_nonfinite", "validation_teacher_steps",
                     "synthesis_steps", "regression_pairs"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "an integer >= 1")
        for name in ("student_lora_rank", "fake_lora_rank", "validation_every", "export_every", "threads",
                     "lr_warmup_steps"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "an integer >= 0 (0 = off / full weights)")
        if self.consistency_lora_rank < 1:
            _bad("consistency_lora_rank", self.consistency_lora_rank, "an integer >= 1")
        if self.resolution % 64:
            _bad("resolution", self.resolution, "a multiple of 64")

    def _check_ranges(self) -> None:
        if not 0 <= self.condition_t_max <= 999:
            _bad("condition_t_max", self.condition_t_max, "an integer in [0, 999]")
        if not 0 <= self.ema_decay < 1:
            _bad("ema_decay", self.ema_decay, "a number in [0, 1) (0 = no EMA)")
        if self.consistency_points < 2:
            _bad("consistency_points", self.consistency_points, "an integer >= 2")
        if not 0 <= self.consistency_ema < 1:
            _bad("consistency_ema", self.consistency_ema, "a number in [0, 1)")
        if not 0 <= self.control_dropout < 1:
            _bad("control_dropout", self.control_dropout, "a number in [0, 1)")
        if not 0 <= self.generator_timestep <= 999:
            _bad("generator_timestep", self.generator_timestep, "an integer in [0, 999]")
        if not 0 <= self.t_min < self.t_max <= 999:
            _bad("t_min", (self.t_min, self.t_max), "0 <= --t-min < --t-max <= 999")
        for name in ("lr_student", "lr_controlnet", "lr_fake", "lr_consistency", "lr_discriminator",
                     "condition_tau"):
            if not getattr(self, name) > 0:
                _bad(name, getattr(self, name), "a positive number")
        for name in ("fidelity_weight", "condition_weight", "reward_weight", "gan_weight", "consistency_weight",
                     "regression_weight",
                     "weight_decay", "max_grad_norm", "clip_outliers"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "a number >= 0")
        for name in ("adam_beta1", "adam_beta1_controlnet", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _bad(name, getattr(self, name), "a number in [0, 1)")

    def _check_combinations(self) -> None:
        if self.divergence != "rkl" and self.batch_size < 2:
            # The f-divergence weights are normalised by their micro-batch mean (docs/method.md §4):
            # with one sample they are all 1, which is reverse KL whatever --divergence says.
            _bad("batch_size", self.batch_size, f"at least 2 with --divergence {self.divergence} (with one sample "
                 "the batch-normalised f-divergence weight is always 1, i.e. reverse KL)")
        if self.synthesis_cfg < 1.0:
            _bad("synthesis_cfg", self.synthesis_cfg, "a number >= 1 (1 = no guidance)")
        if self.cfg_scale < 1.0:
            _bad("cfg_scale", self.cfg_scale, "a number >= 1 (1 = no guidance)")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            _bad("checkpoints_total_limit", self.checkpoints_total_limit, "an integer >= 1")
        if self.phase == "extend" and not self.student:
            _bad("student", self.student, "the student UNet to freeze (required with --phase extend)")
        if self.gan_weight > 0 and self.gradient_checkpointing and (self.student_lora_rank or self.fake_lora_rank):
            # One backward would recompute student and fake-score segments of one shared base,
            # each needing its own adapters.
            _bad("gan_weight", self.gan_weight, "0 with --gradient-checkpointing and LoRA ranks > 0")
        if self.reward is not None and ":" not in self.reward:
            _bad("reward", self.reward, "MODULE:FUNCTION")
        pair_prompts(self.validation_prompt or [], self.validation_image or [])
        for image in self.validation_image or []:
            if not Path(image).is_file():
                _bad("validation_image", image, "an image file")
        if self.report_to not in (None, "tensorboard", "wandb", "all"):
            _bad("report_to", self.report_to, "tensorboard, wandb or all")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys are an error (a typo must not be silently ignored)."""
        return cls(**normalize_keys(values, source))


def _bad(flag: str, value: Any, expected: str) -> None:
    raise ValueError(f"--{flag.replace('_', '-')}: got {value!r}, expected {expected}")


def pair_prompts(prompts: list[str], images: list[str]) -> list[tuple[str, str | None]]:
    """Validation prompts with their control images, by diffusers' rule: equal numbers, or one of
    either for all of the other. A prompt without images is drawn under a training item's condition."""
    if images and not prompts:
        raise ValueError("--validation-image needs --validation-prompt (a caption for each control image)")
    if not images:
        return [(p, None) for p in prompts]
    if len(images) == 1:
        images = images * len(prompts)
    elif len(prompts) == 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"--validation-prompt given {len(prompts)} times and --validation-image {len(images)} "
                         "times; give equal numbers, or one of either")
    return list(zip(prompts, images))


def normalize_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept `max-steps` and `max_steps`; reject unknown keys naming `source`."""
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        name = RENAMED_KEYS.get(name, name)
        if name not in known:
            raise ValueError(f"{source}: unknown key {key!r}; expected one of the trainer flags, e.g. 'max_steps'")
        out[name] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON file of trainer keys (flat, or under a `[train]` table)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: {str(path)!r} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            raise ValueError(f"--config: {str(path)!r} must end in .toml or .json")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--config: cannot parse {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--config: {str(path)!r} must hold a table/object of trainer keys")
    if isinstance(data.get("train"), dict) and len(data) == 1:
        data = data["train"]
    return check_types(normalize_keys(data, f"--config {path}"), f"--config {path}")


def check_types(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Coerce file values to each field's type (int -> float is fine); ValueError names the key."""
    defaults = TrainConfig()
    annotations = {f.name: str(f.type) for f in fields(TrainConfig)}
    out = {}
    for name, value in values.items():
        ann = annotations[name]
        if value is None and "None" in ann:
            out[name] = None
            continue
        base = ann.split(" |")[0]
        ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}[base]
        if not ok:
            raise ValueError(f"{source}: key {name!r} got {value!r}, expected a {base}"
                             f" (default {getattr(defaults, name)!r})")
        out[name] = float(value) if base == "float" else value
    return out
