"""The demo world: procedural captioned shapes and a tiny SD1.x teacher trained on them.

Everything the project claims can be run and measured here without downloads or a GPU:
`python -m jdm_train --ckpt demo --control canny` distils the shipped teacher
(`TEACHER_PATH`, trained by `python -m jdm_train.demo.train_teacher`) on the procedural
set (`jdm_train.demo.data`), and `jdm_train.evaluate` scores the result with the world's own
feature network (`jdm_train.demo.features`).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_PATH = ASSETS / "demo_teacher.safetensors"
FEATURES_PATH = ASSETS / "demo_features.safetensors"

#: Trainer defaults with `--ckpt demo` (flags and --config keys given still win): the size of the
#: world and the budget of a 2-core CPU, never the objective (`config.OBJECTIVE_KEYS`; a test checks
#: it), so that what the demo measures is what an SD1.5 user runs. SD1.5's defaults suit an
#: 860M-parameter UNet over thousands of steps; the 7M demo teacher and a 1000-step CPU budget want
#: these (each measured with `python -m jdm_train.bench control`; the README's demo section).
TRAIN_DEFAULTS = {
    "resolution": 64,  # the procedural shapes' native size
    # The teacher's own guidance strength, as SD1.5's 7.5: its samples only follow captions with
    # guidance (FID 618 vs 815 without, 600 steps).
    "cfg_scale": 4.0,
    "synthesis_cfg": 4.0,  # the same guidance when it draws a prompt list's images (--data prompts.txt)
    "lr_controlnet": 3e-4,  # a fresh ControlNet needs it to pick up the hint within the budget
    "lr_fake": 1e-4,  # the fake score must track the student (two time-scale rule, as DMD2)
    # The consistency LoRA must move off the fake score within 1000 steps (edge F1 with own map 0.61 vs
    # 0.52 at 1e-4, both with 10 consistency points; bench control).
    "lr_consistency": 1e-3,
    "lr_student": 3e-6,  # vs 1e-5: L1 consistency 17% better than blanked instead of 8% (Eq. 5 weighting)
    "ema_decay": 0.99,  # the control is learnt and unlearnt from one evaluation to the next; the average is steadier
}


def teacher_path() -> Path:
    """The shipped demo teacher (single-file SD1.x layout), what `--ckpt demo` resolves to."""
    if not TEACHER_PATH.is_file():
        raise ValueError(f"the demo teacher {TEACHER_PATH} is missing; train it with `python -m jdm_train.demo.train_teacher`")
    return TEACHER_PATH
