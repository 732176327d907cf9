"""Every shipped workflow, converted to API format and run by a real ComfyUI server (main.py --cpu).

Needs COMFYUI_PATH; skipped otherwise. The model files are written under the workflows' own
names by `jdm_train.fixtures` (random weights that ComfyUI detects as SD1.5: one-level
320-channel UNet, TAESD-shaped VAE, full-size CLIP-L). To keep CPU time small the test
shrinks the images to 64 px and the multi-step samplers to 2 steps; everything else runs as
shipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tools import example_workflows
from tools import workflow_format as wf
from tools.comfyui import ComfyServer, empty_file_lists

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a real ComfyUI at COMFYUI_PATH"),
]

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


def _write_models(base: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from jdm_train import fixtures
    from jdm_train.extractors.hed import HEDNetwork

    m = base / "models"
    fixtures.write_comfy_detectable_sd15(m / "checkpoints" / example_workflows.TEACHER, seed=0)
    fixtures.write_comfy_detectable_sd15(m / "checkpoints" / example_workflows.GUIDANCE_TEACHER, seed=1)
    fixtures.write_comfy_detectable_unet(m / "unet" / example_workflows.STUDENT, seed=0, metadata={"jdm.timestep": "999"})
    for i, control in enumerate(("hed", "canny", "lowres")):
        fixtures.write_comfy_detectable_controlnet(m / "controlnet" / f"jdm_{control}.safetensors", seed=i,
                                                   metadata={"jdm.control": control, "jdm.timestep": "999"})
    fixtures.write_comfy_detectable_controlnet(m / "controlnet" / example_workflows.TEACHER_CANNY_CONTROLNET, seed=7)
    torch.manual_seed(0)
    (m / "annotators").mkdir(parents=True, exist_ok=True)
    save_file(HEDNetwork().state_dict(), str(m / "annotators" / "ControlNetHED.safetensors"))
    (base / "input").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    img = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx // 16 + yy // 16) % 2) * 255], -1).astype(np.uint8)
    img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(base / "input" / "example.png")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-server")
    _write_models(base)
    with ComfyServer(os.environ["COMFYUI_PATH"], base) as s:
        yield s


def _shrink(prompt: dict) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            inputs["width"] = inputs["height"] = 64
        if node["class_type"] in ("KSampler", "BasicScheduler"):
            inputs["steps"] = 2
    return prompt


def test_live_object_info_equals_the_snapshot(server):
    live = server.get("/object_info")
    ours = empty_file_lists(json.loads(json.dumps({k: v for k, v in live.items() if k.startswith("JDM_")})))
    assert ours == json.loads((REPO / "tools" / "object_info.json").read_text())
    # the live loader combo lists the files in models/controlnet
    assert "jdm_hed.safetensors" in live["JDM_ControlNetLoader"]["input"]["required"]["control_net_name"][1]["options"]
    # and the HED weights combo the files in models/annotators, after the default name
    hed_options = live["JDM_HEDPreprocessor"]["input"]["required"]["weights"][1]["options"]
    assert hed_options[0] == "ControlNetHED.pth" and "ControlNetHED.safetensors" in hed_options


def test_pack_workflows_are_served_as_templates(server):
    templates = server.get("/workflow_templates")
    assert {p.stem for p in WORKFLOWS} <= set(templates.get("ComfyUI-JDM", []))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_in_comfyui(server, path):
    object_info = server.get("/object_info")
    prompt = _shrink(wf.to_api(json.loads(path.read_text()), object_info))
    entry = server.run(prompt)
    previews = [nid for nid, n in prompt.items() if n["class_type"] == "PreviewImage"]
    assert previews
    for nid in previews:
        images = entry["outputs"][nid]["images"]
        assert len(images) == 1 and images[0]["type"] == "temp"
