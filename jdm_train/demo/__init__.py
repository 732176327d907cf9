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

#: Trainer defaults with `--ckpt demo` (flags and --config keys given still win). SD1.5's defaults
#: suit a 860M-parameter UNet over thousands of steps; the 7M demo teacher, a 1000-step CPU budget
#: and the CFG-4 reference of its FID want these. Each was measured with `python -m jdm_train.bench
#: control` (1000 steps, 64 held-out conditions; the README's demo section has the table).
TRAIN_DEFAULTS = {
    "resolution": 64,  # the procedural shapes' native size
    "cfg_scale": 4.0,  # the teacher's samples only follow captions with guidance (FID 618 vs 815 without, 600 steps)
    "lr_controlnet": 3e-4,  # a fresh ControlNet needs it to pick up the hint within the budget
    "lr_fake": 1e-4,  # the fake score must track the student (two time-scale rule, as DMD2)
    "lr_student": 3e-6,  # vs 1e-5: L1 consistency 17% better than blanked instead of 8% (Eq. 5 weighting)
    # Eq. 5's weighting puts the condition term almost only at t near 999, where the consistency
    # model's x0 is a blur; as an x0 gradient at every t ("snr") it teaches the edges. Weight 100:
    # 30 learns little control in 1000 steps (edge F1 0.26 vs 0.13 blanked), 100 learns it (0.51).
    "condition_weighting": "snr",
    "condition_weight": 100.0,
    # Without dropout a student that obeys a blank map draws a flat image, which scores better on
    # L1 than any image with edges; with it, a blank map gives the teacher's distribution.
    "control_dropout": 0.3,  # 0.5 kept image quality but learnt less control (L1 20-25% better than blanked vs 33-49%)
    "ema_decay": 0.99,  # the control is learnt and unlearnt from one evaluation to the next; the average is steadier
}


def teacher_path() -> Path:
    """The shipped demo teacher (single-file SD1.x layout), what `--ckpt demo` resolves to."""
    if not TEACHER_PATH.is_file():
        raise ValueError(f"the demo teacher {TEACHER_PATH} is missing; train it with `python -m jdm_train.demo.train_teacher`")
    return TEACHER_PATH
