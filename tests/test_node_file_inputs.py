"""What files the nodes read, run without ComfyUI: the pack's node modules on a stand-in of
the few ComfyUI modules they import (`folder_paths` as ComfyUI implements it, a recording `io`).

Every file a node reads must resolve inside ComfyUI's model folders: the preprocessors' annotator
inputs are lists of what the annotator folders hold, any other name is refused with one message
whether or not such a file exists, and a broken ControlNet file names the file and the input.
The real-ComfyUI versions of these checks are in test_comfyui_nodes.py (COMFYUI_PATH).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from jdm_train import model_io
from jdm_train.extractors import HEDNetwork, clear_cache, run_extractor

REPO = Path(__file__).resolve().parents[1]
PACK = "jdm_pack_under_test"
TINY_HED = ((4, 2), (6, 2), (8, 3), (8, 3), (8, 3))


def _folder_paths(base: Path) -> types.ModuleType:
    """ComfyUI's folder_paths (0.3.64) for the parts the pack uses, rooted at `base`."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(base / "models")
    fp.supported_pt_extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    fp.folder_names_and_paths = {
        "controlnet": ([str(base / "models" / "controlnet")], fp.supported_pt_extensions),
        "diffusion_models": ([str(base / "models" / "unet"), str(base / "models" / "diffusion_models")],
                             fp.supported_pt_extensions),
        "custom_nodes": ([str(base / "custom_nodes")], set()),
    }

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0][:]

    def get_full_path(name, filename):
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for d in fp.folder_names_and_paths.get(name, ([], set()))[0]:
            if os.path.isfile(os.path.join(d, filename)):
                return os.path.join(d, filename)
        return None

    def get_full_path_or_raise(name, filename):
        path = get_full_path(name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return path

    def get_filename_list(name):
        out = set()
        for d in fp.folder_names_and_paths[name][0]:
            for here, _, files in os.walk(d):
                out.update(os.path.relpath(os.path.join(here, f), d) for f in files)
        return sorted(out)

    fp.add_model_folder_path, fp.get_folder_paths, fp.get_full_path = add_model_folder_path, get_folder_paths, get_full_path
    fp.get_full_path_or_raise, fp.get_filename_list = get_full_path_or_raise, get_filename_list
    return fp


class _Kind:
    def __init__(self, name: str):
        self.name = name

    def Input(self, id, **kw):  # ComfyUI's spelling
        return SimpleNamespace(io_type=self.name, id=id, **kw)

    def Output(self, **kw):
        return SimpleNamespace(io_type=self.name, **kw)


class _IO(types.ModuleType):
    """comfy_api.latest.io, recording what the schemas declare."""

    def __getattr__(self, name):
        return _Kind(name.upper())


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """The pack's node modules loaded on a stand-in ComfyUI rooted at tmp_path/ComfyUI."""
    base = tmp_path / "ComfyUI"
    for d in ("models/controlnet", "models/unet", "models/annotators", "custom_nodes"):
        (base / d).mkdir(parents=True)
    io = _IO("io")
    io.ComfyNode = type("ComfyNode", (), {})
    io.Schema = lambda **kw: SimpleNamespace(**kw)
    io.NodeOutput = lambda *a: SimpleNamespace(result=a)
    comfy_pkg = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    cn = types.ModuleType("comfy.controlnet")
    cn.load_controlnet = lambda path: SimpleNamespace(path=path)
    comfy_pkg.model_management, comfy_pkg.controlnet = mm, cn
    latest = types.ModuleType("comfy_api.latest")
    latest.io = io
    fp = _folder_paths(base)
    pack = types.ModuleType(PACK)
    pack.__path__ = [str(REPO)]
    nodes = types.ModuleType(f"{PACK}.nodes")
    nodes.__path__ = [str(REPO / "nodes")]
    for name, mod in {"folder_paths": fp, "comfy": comfy_pkg, "comfy.model_management": mm, "comfy.controlnet": cn,
                      "comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest,
                      PACK: pack, f"{PACK}.nodes": nodes}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("AUX_ANNOTATOR_CKPTS_PATH", raising=False)
    clear_cache()
    yield SimpleNamespace(base=base, models=base / "models", folder_paths=fp,
                          extractors=importlib.import_module(f"{PACK}.nodes.extractors"),
                          controlnet=importlib.import_module(f"{PACK}.nodes.controlnet"),
                          # the pack's own copy of jdm_train: its MissingWeightsError is another class
                          missing=importlib.import_module(f"{PACK}.jdm_train.extractors").MissingWeightsError)
    for name in [n for n in sys.modules if n.startswith(PACK)]:
        del sys.modules[name]
    clear_cache()


def _hed_file(path: Path, seed=0) -> Path:
    torch.manual_seed(seed)
    sd = HEDNetwork(TINY_HED).state_dict()  # the ControlNetHED.pth key layout, narrow blocks
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def _input(schema, name):
    return next(i for i in schema.inputs if getattr(i, "id", None) == name)


def _same_message(errors: dict[str, Exception]) -> set[str]:
    return {str(e).replace(repr(name), "<name>") for name, e in errors.items()}


OUTSIDE_NAMES = ["/etc/passwd", "/etc/no-such-file-jdm", "../../x", "../annotators/../../x", "~/x", "~root/x",
                 "sub/../../ControlNetHED.safetensors", "C:\\Windows\\win.ini", "\\\\server\\share\\x"]


def test_hed_weights_are_a_list_of_the_annotator_folders_and_nothing_else_is_read(comfy, tmp_path):
    inside = _hed_file(comfy.models / "annotators" / "ControlNetHED.safetensors")
    _hed_file(comfy.base / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts" / "lllyasviel" / "Annotators"
              / "ControlNetHED.pth", seed=1)
    outside = _hed_file(tmp_path / "elsewhere" / "ControlNetHED.safetensors", seed=2)
    node = comfy.extractors.make_preprocessor("hed")
    img = torch.rand(1, 24, 20, 3, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in OUTSIDE_NAMES + [str(outside), str(inside)]:
        with pytest.raises(ValueError) as err:
            node.execute(img, safe=False, weights=name)
        assert not isinstance(err.value, FileNotFoundError)  # not 'missing': refused before any look-up
        errors[name] = err.value
    assert len(_same_message(errors)) == 1, "the refusal must not depend on whether a file exists"
    assert str(errors["/etc/passwd"]).startswith("weights: '/etc/passwd' is not a name in the annotator folders")

    weights = _input(node.define_schema(), "weights")
    assert weights.io_type == "COMBO" and weights.default == "ControlNetHED.pth"
    assert weights.options == ["ControlNetHED.pth", "ControlNetHED.safetensors"]
    assert "annotators" in comfy.folder_paths.folder_names_and_paths  # registered for extra_model_paths.yaml users
    out, control = node.execute(img, safe=False, weights="ControlNetHED.safetensors").result
    ref = run_extractor("hed", img.movedim(-1, 1), weights=str(inside)).movedim(1, -1)
    assert control == "hed"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # the default name finds ControlNetHED.pth or .safetensors in the folders, models/annotators first
    default = node.execute(img, safe=False, weights="ControlNetHED.pth").result[0]
    torch.testing.assert_close(default, ref, rtol=0, atol=0)


def test_missing_hed_weights_say_where_to_put_them(comfy):
    node = comfy.extractors.make_preprocessor("hed")
    assert _input(node.define_schema(), "weights").options == ["ControlNetHED.pth"]
    with pytest.raises(comfy.missing) as err:
        node.execute(torch.rand(1, 8, 8, 3), safe=False, weights="ControlNetHED.pth")
    msg = str(err.value)
    assert msg.startswith("weights: HED weights 'ControlNetHED.pth' not found")
    assert str(comfy.models / "annotators") in msg and "Download ControlNetHED.pth" in msg
    # a name that is not there is the same kind of error: it only says what the folders lack
    with pytest.raises(comfy.missing, match="'other/hed.pth' not found"):
        node.execute(torch.rand(1, 8, 8, 3), safe=False, weights="other/hed.pth")


def test_depth_model_is_a_list_of_model_folders(comfy, tmp_path):
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16],
                    fusion_hidden_size=8, head_hidden_size=8, use_auxiliary_head=False)
    model = DPTForDepthEstimation(cfg).eval()
    model.save_pretrained(comfy.models / "annotators" / "mydepth")
    model.save_pretrained(tmp_path / "outside-depth")
    _hed_file(comfy.models / "annotators" / "ControlNetHED.safetensors")
    node = comfy.extractors.make_preprocessor("depth")
    field = _input(node.define_schema(), "model")
    assert field.io_type == "COMBO" and field.options == ["dpt-hybrid-midas", "mydepth"]
    hed_options = _input(comfy.extractors.make_preprocessor("hed").define_schema(), "weights").options
    assert hed_options == ["ControlNetHED.pth", "ControlNetHED.safetensors"]  # not the depth model's weights

    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    out = node.execute(img, resolution=32, model="mydepth").result[0]
    ref = run_extractor("depth", img.movedim(-1, 1), resolution=32,
                        model=str(comfy.models / "annotators" / "mydepth")).movedim(1, -1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    errors = {}
    for name in OUTSIDE_NAMES + [str(tmp_path / "outside-depth"), str(tmp_path / "no-such-folder")]:
        with pytest.raises(ValueError) as err:
            node.execute(img, resolution=32, model=name)
        errors[name] = err.value
    assert len(_same_message(errors)) == 1
    with pytest.raises(comfy.missing, match=r"(?s)model: depth model folder 'dpt-hybrid-midas' not found.*"
                                                  r"dpt-hybrid-midas/"):
        node.execute(img, resolution=32, model="dpt-hybrid-midas")


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 64, b"{not a header"])
def test_broken_controlnet_file_names_the_file_and_the_input(comfy, content):
    path = comfy.models / "controlnet" / "broken.safetensors"
    path.write_bytes(content)
    loader = comfy.controlnet.ControlNetLoader
    with pytest.raises(ValueError) as err:
        loader.execute("broken.safetensors")
    msg = str(err.value)
    assert msg.startswith(f"control_net_name: {path} ({len(content)} bytes) is not a readable weight file")
    assert "expected a complete ControlNet .safetensors" in msg


def test_controlnet_loader_warns_about_a_mixed_export_set(comfy, caplog):
    paths = {"student": comfy.models / "unet" / "jdm.safetensors",
             "controlnet": comfy.models / "controlnet" / "jdm_canny.safetensors"}

    def export(value):
        with model_io.ExportSet(paths) as ex:
            ex.write("student", {"a": torch.full((2,), value)}, {"jdm.kind": "student"})
            ex.write("controlnet", {"zero_convs.0.0.weight": torch.full((2,), value)},
                     {"jdm.kind": "controlnet", "jdm.control": "canny"})

    export(0.0)
    loader = comfy.controlnet.ControlNetLoader
    with caplog.at_level(logging.WARNING):
        assert loader.execute("jdm_canny.safetensors").result[1] == "canny"
    assert "mixed export set" not in caplog.text
    old_student = paths["student"].read_bytes()
    export(1.0)
    paths["student"].write_bytes(old_student)  # as a kill between the two renames would leave it
    with caplog.at_level(logging.WARNING):
        loader.execute("jdm_canny.safetensors")
    assert "control_net_name: mixed export set" in caplog.text
