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


def teacher_path() -> Path:
    """The shipped demo teacher (single-file SD1.x layout), what `--ckpt demo` resolves to."""
    if not TEACHER_PATH.is_file():
        raise ValueError(f"the demo teacher {TEACHER_PATH} is missing; train it with `python -m jdm_train.demo.train_teacher`")
    return TEACHER_PATH
