import os
import sys

import pytest

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `comfy` package imported in-process from COMFYUI_PATH (CPU), or a skip."""
    root = os.environ.get("COMFYUI_PATH")
    if not root or not os.path.isfile(os.path.join(root, "comfy", "sd.py")):
        pytest.skip("COMFYUI_PATH does not point at a ComfyUI checkout")
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import comfy.cli_args

        # a CPU-only torch: must be set before comfy.model_management is imported
        comfy.cli_args.args.cpu = True
        import comfy.controlnet
        import comfy.model_management
        import comfy.sample
        import comfy.sd
        import comfy.utils
    except ImportError as e:
        pytest.skip(f"ComfyUI at {root} is not importable here: {e}")
    return comfy
