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
#: and the CFG-4 reference of its FID want these (measured with `python -m jdm_train.bench control`).
TRAIN_DEFAULTS = {
    "resolution": 64,  # the procedural shapes' native size
    "cfg_scale": 4.0,  # the teacher's samples only follow captions with guidance (FID 618 vs 815 without, 600 steps)
    "lr_controlnet": 3e-4,  # a fresh ControlNet needs it to pick up the hint within the budget
    "lr_fake": 1e-4,  # the fake score must track the student (two time-scale rule, as DMD2)
    # Eq. 5's weight 1 leaves the control unlearnt in 1000 steps; 30 learns it (edge F1 0.55 vs
    # 0.13 with another image's control) at a cost in image quality; 10 keeps quality, barely
    # learns the control (0.18 vs 0.15). Both measured with `bench control`, 1000 steps.
    "condition_weight": 30.0,
    "lr_student": 3e-6,  # vs 1e-5: L1 consistency 17% better than blanked instead of 8%, FID 1820 vs 2345
}


def teacher_path() -> Path:
    """The shipped demo teacher (single-file SD1.x layout), what `--ckpt demo` resolves to."""
    if not TEACHER_PATH.is_file():
        raise ValueError(f"the demo teacher {TEACHER_PATH} is missing; train it with `python -m jdm_train.demo.train_teacher`")
    return TEACHER_PATH
