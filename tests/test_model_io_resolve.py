"""resolve_model: ComfyUI model folders, root order, extra_model_paths.yaml, node-name safety."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from jdm_train import model_io


def touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p.resolve()


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "argroot", tmp_path / "envroot"


def test_root_order_argument_then_env(roots, monkeypatch):
    arg, env = roots
    a = touch(arg / "models" / "checkpoints" / "sd15.safetensors")
    e = touch(env / "models" / "checkpoints" / "sd15.safetensors")
    only_env = touch(env / "models" / "checkpoints" / "sub" / "other.safetensors")
    monkeypatch.setenv("COMFYUI_PATH", str(env))
    assert model_io.resolve_model("sd15.safetensors", "checkpoints", comfyui_root=arg) == a
    assert model_io.resolve_model("sd15.safetensors", "checkpoints") == e
    assert model_io.resolve_model("sub/other.safetensors", "checkpoints", comfyui_root=arg) == only_env


def test_unet_folder_covers_diffusion_models(roots):
    arg, _ = roots
    u = touch(arg / "models" / "diffusion_models" / "student.safetensors")
    assert model_io.resolve_model("student.safetensors", "unet", comfyui_root=arg) == u
    assert model_io.resolve_model("student.safetensors", "diffusion_models", comfyui_root=arg) == u
    for folder in ("controlnet", "vae", "vae_approx", "loras", "annotators"):
        f = touch(arg / "models" / folder / f"m_{folder}.pth")
        assert model_io.resolve_model(f"m_{folder}.pth", folder, comfyui_root=arg) == f


def test_extra_model_paths_yaml(roots, tmp_path):
    arg, _ = roots
    arg.mkdir()
    a1111 = tmp_path / "webui"
    ck = touch(a1111 / "models" / "Stable-diffusion" / "a.safetensors")
    lora = touch(a1111 / "models" / "LyCORIS" / "l.safetensors")
    rel = touch(arg / "shared" / "cn" / "c.safetensors")
    unet = touch(tmp_path / "central" / "models" / "unet" / "u.safetensors")
    (arg / "extra_model_paths.yaml").write_text(f"""
a111:
    base_path: {a1111}
    checkpoints: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS
nobase:
    controlnet: shared/cn
central:
    base_path: ../central
    is_default: true
    diffusion_models: |
        models/diffusion_models
        models/unet
empty:
""")
    assert model_io.resolve_model("a.safetensors", "checkpoints", comfyui_root=arg) == ck
    assert model_io.resolve_model("l.safetensors", "loras", comfyui_root=arg) == lora
    assert model_io.resolve_model("c.safetensors", "controlnet", comfyui_root=arg) == rel
    assert model_io.resolve_model("u.safetensors", "unet", comfyui_root=arg, from_node=True) == unet


def test_plain_path_and_missing_file_message(roots, tmp_path):
    arg, _ = roots
    p = touch(tmp_path / "elsewhere" / "x.safetensors")
    assert model_io.resolve_model(str(p), "checkpoints", comfyui_root=arg) == p
    assert model_io.resolve_model("elsewhere/x.safetensors", "checkpoints", comfyui_root=arg) == p
    with pytest.raises(ValueError) as err:
        model_io.resolve_model("missing.safetensors", "controlnet", comfyui_root=arg)
    msg = str(err.value)
    assert "'missing.safetensors' not found" in msg
    assert str(arg / "models" / "controlnet") in msg and str(arg / "models" / "t2i_adapter") in msg
    with pytest.raises(ValueError, match="no ComfyUI root known"):
        model_io.resolve_model("missing.safetensors", "checkpoints")


def test_node_names_cannot_escape_the_model_folders(roots, tmp_path):
    arg, _ = roots
    inside = touch(arg / "models" / "checkpoints" / "ok.safetensors")
    outside = touch(tmp_path / "secret.safetensors")
    assert model_io.resolve_model(str(inside), "checkpoints", comfyui_root=arg, from_node=True) == inside
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        model_io.resolve_model("../../../secret.safetensors", "checkpoints", comfyui_root=arg, from_node=True)
    with pytest.raises(ValueError, match="outside the checkpoints model folders"):
        model_io.resolve_model(str(outside), "checkpoints", comfyui_root=arg, from_node=True)
    # a relative path that only exists from the working directory is not a node name
    with pytest.raises(ValueError, match="not found"):
        model_io.resolve_model("secret.safetensors", "checkpoints", comfyui_root=arg, from_node=True)
    # the trainer's CLI may use plain paths anywhere
    assert model_io.resolve_model("../" + tmp_path.name + "/secret.safetensors", "checkpoints", comfyui_root=arg) == outside


def _exec_module(name: str, path: Path, monkeypatch, package_dir: Path | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=None if package_dir is None else [str(package_dir)])
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)  # relative imports and dataclasses look modules up
    spec.loader.exec_module(mod)
    return mod


def test_comfyui_containing_the_pack_is_a_root(roots, tmp_path, monkeypatch):
    # a copy of model_io.py at <root>/custom_nodes/<pack>/jdm_train/ finds <root>
    root = tmp_path / "ComfyUI"
    pack = root / "custom_nodes" / "ComfyUI-JDM" / "jdm_train"
    pack.mkdir(parents=True)
    (pack / "__init__.py").write_text("")
    for name in ("files.py", "ldm_convert.py", "model_io.py"):  # model_io imports .files and .ldm_convert
        shutil.copy(Path(model_io.__file__).with_name(name), pack / name)
    _exec_module("copied_jdm", pack / "__init__.py", monkeypatch, package_dir=pack)
    _exec_module("copied_jdm.files", pack / "files.py", monkeypatch)
    _exec_module("copied_jdm.ldm_convert", pack / "ldm_convert.py", monkeypatch)
    mod = _exec_module("copied_jdm.model_io", pack / "model_io.py", monkeypatch)
    ck = touch(root / "models" / "checkpoints" / "pack.safetensors")
    assert mod.comfyui_roots() == [root.resolve()]
    assert mod.resolve_model("pack.safetensors", "checkpoints") == ck
    assert model_io._enclosing_comfyui() is None or model_io._enclosing_comfyui() != root.resolve()


def test_symlinked_model_file_inside_the_folder_is_found(roots, tmp_path):
    arg, _ = roots
    real = touch(tmp_path / "shared_disk" / "sd15.safetensors")
    link = arg / "models" / "checkpoints" / "sd15.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    found = model_io.resolve_model("sd15.safetensors", "checkpoints", comfyui_root=arg, from_node=True)
    assert found.samefile(real) and found.parent == (arg / "models" / "checkpoints").resolve()


def test_resolve_checkpoint_knows_the_demo_teacher_and_else_resolves_a_name(roots):
    from jdm_train.demo import TEACHER_PATH

    assert model_io.resolve_checkpoint("demo") == TEACHER_PATH
    arg, _ = roots
    ck = touch(arg / "models" / "checkpoints" / "sd15.safetensors")
    assert model_io.resolve_checkpoint("sd15.safetensors", arg) == ck
    with pytest.raises(ValueError, match="checkpoints model 'missing.safetensors' not found"):
        model_io.resolve_checkpoint("missing.safetensors", arg)
