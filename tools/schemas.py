"""The node schemas the shipped workflows are checked against, without ComfyUI.

`object_info.json` is this pack's part of `GET /object_info` (file lists emptied), kept current by
the COMFYUI_PATH tests and rewritten by `python -m tools.schemas` (needs ``COMFYUI_PATH``).
`core_object_info.json` is the subset of ComfyUI 0.3.64's core schemas that the workflows use; the
full core snapshot, where the development environment has it, is ``../shared/comfyui/object_info.json``
beside the repository (CI has it there too), and a test checks the subset equal to it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACK = HERE / "object_info.json"
CORE_SUBSET = HERE / "core_object_info.json"
SHARED_CORE = HERE.parent.parent / "shared" / "comfyui" / "object_info.json"


def read(*paths: str | Path) -> dict[str, Any]:
    """The schemas of several snapshot files, later files winning."""
    info: dict[str, Any] = {}
    for p in paths:
        info.update(json.loads(Path(p).read_text()))
    return info


def load() -> dict[str, Any]:
    """Core schemas (the shared full snapshot where it exists, else the subset) plus this pack's."""
    return read(SHARED_CORE if SHARED_CORE.is_file() else CORE_SUBSET, PACK)


def main(argv: list[str] | None = None) -> int:
    from tools.comfyui import comfyui_path, import_comfyui, pack_object_info

    if argv:
        print("usage: COMFYUI_PATH=... python -m tools.schemas  (rewrites tools/object_info.json)", file=sys.stderr)
        return 2
    root = comfyui_path()
    if root is None:
        print("COMFYUI_PATH is not set: point it at a ComfyUI checkout with its requirements installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jdm-object-info-") as base:
        info = pack_object_info(import_comfyui(root, base))
    PACK.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PACK} ({len(info)} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
