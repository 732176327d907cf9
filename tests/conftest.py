import os
import stat
import sys

import numpy as np
import pytest
from PIL import Image

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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD1.x teacher checkpoint (jdm_train.fixtures, the real LDM layout) and a folder of 4
    captioned 72x64 images, for the trainer's end-to-end tests."""
    from jdm_train import fixtures

    base = tmp_path_factory.mktemp("world")
    ckpt = fixtures.write_tiny_sd1_checkpoint(base / "tiny.safetensors")
    data = base / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        a = np.zeros((72, 64, 3), np.uint8)
        a[8 + 6 * i: 40 + 6 * i, 10:50] = rng.integers(40, 255, 3)
        Image.fromarray(a).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a box number {i}")
    return {"ckpt": ckpt, "data": data, "base": base}


@pytest.fixture
def isolated_annotator_search(monkeypatch, tmp_path):
    """Only the annotator folders a test creates may be found (no ComfyUI, no controlnet_aux)."""
    from jdm_train.extractors import clear_cache

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("AUX_ANNOTATOR_CKPTS_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def file_mode():
    """`file_mode(path)`: a file's permission bits."""
    return lambda path: stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask inside a test (`umask(0o077)`); the old one is restored after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)
