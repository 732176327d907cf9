"""The shipped workflows (example_workflows/*.json, the folder ComfyUI serves as the pack's templates)
checked without ComfyUI against the node schemas.

Schemas (`tools.schemas`): the core nodes of ComfyUI 0.3.64 (../shared/comfyui/object_info.json beside the
repository, where it exists, else tools/core_object_info.json, the subset the workflows use, checked equal to it)
plus this pack's snapshot tools/object_info.json (kept current by the COMFYUI_PATH tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import example_workflows, schemas
from tools import workflow_format as wf

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def object_info():
    return schemas.load()


def test_core_subset_is_the_shared_core_schema():
    if not schemas.SHARED_CORE.is_file():
        pytest.skip(f"{schemas.SHARED_CORE} is not on this machine")
    shared = json.loads(schemas.SHARED_CORE.read_text())
    subset = json.loads(schemas.CORE_SUBSET.read_text())
    assert {k: shared[k] for k in subset} == subset
    used = {n["type"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"] if not n["type"].startswith("JDM_")}
    assert used <= set(subset)


def test_the_five_workflows_are_shipped_with_thumbnails():
    # ComfyUI lists a pack's templates from example_workflows/ and only hints at renaming other folders
    assert not (REPO / "workflows").exists()
    names = {p.stem for p in WORKFLOWS}
    assert {"jdm_one_step_hed", "jdm_one_step_canny", "jdm_one_step_lowres_upscale", "jdm_decoupled_cfg_teacher",
            "jdm_one_step_vs_teacher_20_steps"} <= names
    for p in WORKFLOWS:
        jpg = p.with_suffix(".jpg")
        assert jpg.is_file(), f"{p.name} has no thumbnail"
        head = jpg.read_bytes()[:3]
        assert head == b"\xff\xd8\xff", f"{jpg.name} is not a JPEG"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid_against_the_schemas(path, object_info):
    graph = json.loads(path.read_text())
    assert wf.check_workflow(graph, object_info) == []
    prompt = wf.to_api(graph, object_info)
    assert {n["class_type"] for n in prompt.values()} <= set(object_info)
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        for name, _typ, _opts, optional in wf.input_specs(info):
            assert optional or name in node["inputs"], f"node {node_id} lacks required input {name}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_uses_the_trainer_default_export_names(path):
    graph = json.loads(path.read_text())
    for n in graph["nodes"]:
        if n["type"] == "UNETLoader":
            assert n["widgets_values"][0] == "jdm.safetensors"
        if n["type"] == "JDM_ControlNetLoader":
            assert n["widgets_values"][0] in {f"jdm_{c}.safetensors" for c in ("canny", "hed", "depth", "lowres")}


def test_shipped_workflows_are_what_the_generator_writes(object_info):
    for name, graph in example_workflows.workflows().items():
        assert json.loads((REPO / "example_workflows" / f"{name}.json").read_text()) == json.loads(json.dumps(graph)), name


def test_to_api_follows_the_frontend_widget_rules(object_info):
    g = wf.Graph(object_info)
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), {"ckpt_name": "a.safetensors"})
    latent = g.node("EmptyLatentImage", (0, 0), {"width": 64, "height": 64})
    enc = g.node("CLIPTextEncode", (0, 0), {"text": "x"}, clip=(ckpt, 1))
    ks = g.node("KSampler", (0, 0), {"seed": 5, "seed:control_after_generate": "randomize", "steps": 3, "cfg": 2.5},
                model=(ckpt, 0), positive=(enc, 0), negative=(enc, 0), latent_image=(latent, 0))
    img = g.node("LoadImage", (0, 0), {"image": "example.png"})
    graph = g.workflow()
    assert ks["widgets_values"] == [5, "randomize", 3, 2.5, "euler", "simple", 1.0]
    assert img["widgets_values"] == ["example.png", "image"]
    api = wf.to_api(graph, object_info)
    assert api[str(ks["id"])]["inputs"] == {"model": ["1", 0], "seed": 5, "steps": 3, "cfg": 2.5, "sampler_name": "euler",
                                          "scheduler": "simple", "positive": ["3", 0], "negative": ["3", 0],
                                          "latent_image": ["2", 0], "denoise": 1.0}
    assert api[str(img["id"])]["inputs"] == {"image": "example.png"}


def test_a_widget_with_a_link_takes_the_link(object_info):
    graph = json.loads((REPO / "example_workflows" / "jdm_one_step_canny.json").read_text())
    api = wf.to_api(graph, object_info)
    (sampler,) = [n for n in api.values() if n["class_type"] == "JDM_OneStepSampler"]
    (loader_id,) = [k for k, n in api.items() if n["class_type"] == "JDM_ControlNetLoader"]
    assert sampler["inputs"]["timestep"] == [loader_id, 2]
    assert sampler["inputs"]["seed"] == 0


def _mutated(fn):
    graph = json.loads((REPO / "example_workflows" / "jdm_one_step_canny.json").read_text())
    fn(graph)
    return graph


def _node(graph, type_):
    return next(n for n in graph["nodes"] if n["type"] == type_)


@pytest.mark.parametrize("mutation,expected", [
    (lambda g: _node(g, "JDM_OneStepSampler").update(type="JDM_NoSuchNode"), "unknown node type"),
    (lambda g: _node(g, "JDM_CannyPreprocessor")["widgets_values"].__setitem__(0, 99999), "outside"),
    (lambda g: _node(g, "EmptyLatentImage")["widgets_values"].pop(), "widget values"),
    (lambda g: _node(g, "UNETLoader")["widgets_values"].__setitem__(1, "fp64"), "is not one of"),
    (lambda g: g["links"][0].__setitem__(5, "MODEL"), "does not match"),
    (lambda g: _node(g, "VAEDecode")["inputs"][1].update(link=None), "not connected"),
])
def test_check_workflow_catches_broken_workflows(object_info, mutation, expected):
    errors = wf.check_workflow(_mutated(mutation), object_info)
    assert any(expected in e for e in errors), errors


def test_snapshot_has_a_preprocessor_per_extractor_with_its_parameters():
    from jdm_train import extractors

    snap = json.loads(schemas.PACK.read_text())
    pre = {n: i for n, i in snap.items() if n.endswith("Preprocessor")}
    assert len(pre) == len(extractors.extractor_names())
    for name in extractors.extractor_names():
        (info,) = [i for i in pre.values() if f"The '{name}' condition extractor" in i["description"]]
        assert info["output"] == ["IMAGE", "STRING"]
        widgets = {k: v for k, v in info["input"]["required"].items() if k != "image"}
        params = {p.name: p for p in extractors.extractor_params(name) if p.name not in ("comfyui_root", "chunk")}
        assert set(widgets) == set(params)
        for pname, p in params.items():
            assert widgets[pname][1]["default"] == p.default
            if p.min is not None:
                assert widgets[pname][1]["min"] == p.min and widgets[pname][1]["max"] == p.max


def test_snapshot_nodes_are_prefixed_and_under_jdm():
    snap = json.loads(schemas.PACK.read_text())
    assert len(snap) >= 5
    for name, info in snap.items():
        assert name.startswith("JDM_") and info["name"] == name
        assert info["category"].split("/")[0] == "JDM"
        assert info["python_module"] == "custom_nodes.ComfyUI-JDM"
