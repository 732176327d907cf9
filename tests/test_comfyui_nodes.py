"""The JDM nodes inside a real ComfyUI (in-process, CPU), against ComfyUI's own samplers and jdm_train.

Needs COMFYUI_PATH (a ComfyUI checkout with its requirements installed); skipped otherwise. Models are random-weight
files from `jdm_train.fixtures` that ComfyUI detects as SD1.5 (320-channel one-level UNet).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="needs a real ComfyUI at COMFYUI_PATH"),
]

REPO = Path(__file__).resolve().parents[1]
BASE = "comfy-detectable-sd15-fixture"


@pytest.fixture(scope="module")
def cui(tmp_path_factory):
    from jdm_train import fixtures
    from tools.comfyui import import_comfyui

    base = tmp_path_factory.mktemp("comfy-base")
    nodes = import_comfyui(os.environ["COMFYUI_PATH"], base)
    models = base / "models"
    fixtures.write_comfy_detectable_unet(models / "unet" / "jdm.safetensors", seed=0,
                                         metadata={"jdm.timestep": "999"})
    fixtures.write_comfy_detectable_unet(models / "unet" / "other.safetensors", seed=5)
    fixtures.write_comfy_detectable_controlnet(models / "controlnet" / "jdm_hed.safetensors", seed=0,
                                               metadata={"jdm.control": "hed", "jdm.timestep": "999"})
    fixtures.write_comfy_detectable_controlnet(models / "controlnet" / "foreign.safetensors", seed=1,
                                               metadata={"jdm.control": "canny", "jdm.base": "some-other-base"})
    return nodes, base


def _load_model(cui, name="jdm.safetensors"):
    import comfy.sd

    _, base = cui
    return comfy.sd.load_diffusion_model(str(base / "models" / "unet" / name), model_options={"dtype": torch.float32})


def _text(seed=0, n=1):
    return torch.randn(n, 77, 768, generator=torch.Generator().manual_seed(seed))


def _node(cui, name):
    return cui[0].NODE_CLASS_MAPPINGS[name]


def _latent(size=64, batch=1):
    return {"samples": torch.zeros(batch, 4, size // 8, size // 8)}


def test_pack_registers_its_nodes(cui):
    nodes, _ = cui
    names = {k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("JDM_")}
    assert {"JDM_OneStepSampler", "JDM_SamplerOneStep", "JDM_ControlNetLoader", "JDM_ApplyControlNet",
            "JDM_DecoupledCFGGuider", "JDM_CannyPreprocessor", "JDM_LowResPreprocessor"} <= names
    for n in names:
        assert nodes.NODE_CLASS_MAPPINGS[n].GET_NODE_INFO_V1()["category"].startswith("JDM")


def test_object_info_snapshot_is_current(cui):
    """tools/object_info.json is what this ComfyUI reports (regenerate: python -m tools.schemas)."""
    from tools.comfyui import pack_object_info

    live = pack_object_info(cui[0])
    saved = json.loads((REPO / "tools" / "object_info.json").read_text())
    assert live == saved


def test_one_step_equals_ksampler_one_euler_step(cui):
    nodes, _ = cui
    model = _load_model(cui)
    pos = [[_text(0, 2), {}]]
    neg = [[_text(1, 2), {}]]
    latent = _latent(64, 2)
    ours = _node(cui, "JDM_OneStepSampler").execute(model, pos, latent, 42, 999).result[0]["samples"]
    core = nodes.common_ksampler(model, 42, 1, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    assert ours.shape == (2, 4, 8, 8)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, core, rtol=0, atol=1e-6)
    other_seed = _node(cui, "JDM_OneStepSampler").execute(model, pos, latent, 43, 999).result[0]["samples"]
    assert (other_seed - ours).abs().mean() > 1e-2


@pytest.mark.parametrize("timestep", [999, 600])
def test_one_step_equals_generate_one_step_on_diffusers_student(cui, timestep):
    """LATENT * 0.18215 == generate_one_step(student, z, t_g) with the diffusers UNet loaded by model_io."""
    import comfy.sample

    from jdm_train import model_io, sampling
    from jdm_train.denoisers import Cond, UNetDenoiser
    from jdm_train.schedule import NoiseSchedule

    _, base = cui
    model = _load_model(cui)
    text = _text(3)
    latent = _latent(64)
    ours = _node(cui, "JDM_OneStepSampler").execute(model, [[text, {}]], latent, 7, timestep).result[0]["samples"]
    path = model_io.resolve_model("jdm.safetensors", "unet", comfyui_root=base, from_node=True)
    unet = model_io.load_unet(path, dtype=torch.float32)
    z = comfy.sample.prepare_noise(latent["samples"], 7)
    with torch.no_grad():
        ref = sampling.generate_one_step(UNetDenoiser(unet, NoiseSchedule()), z, timestep, Cond(text))
    torch.testing.assert_close(ours * 0.18215, ref, rtol=1e-4, atol=2e-4)


def test_one_step_with_jdm_controlnet_equals_diffusers_student(cui):
    import comfy.sample

    from jdm_train import model_io, sampling
    from jdm_train.denoisers import Cond, UNetDenoiser
    from jdm_train.schedule import NoiseSchedule

    _, base = cui
    model = _load_model(cui)
    cn, control, t_g = _node(cui, "JDM_ControlNetLoader").execute("jdm_hed.safetensors").result
    assert (control, t_g) == ("hed", 999)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    text = _text(4)
    pos = _node(cui, "JDM_ApplyControlNet").execute([[text, {}]], cn, hint, 1.0, "hed").result[0]
    latent = _latent(64)
    ours = _node(cui, "JDM_OneStepSampler").execute(model, pos, latent, 11, t_g).result[0]["samples"]
    plain = _node(cui, "JDM_OneStepSampler").execute(model, [[text, {}]], latent, 11, t_g).result[0]["samples"]
    assert (ours - plain).abs().mean() > 1e-3  # the ControlNet takes part
    unet = model_io.load_unet(base / "models" / "unet" / "jdm.safetensors", dtype=torch.float32)
    controlnet = model_io.load_controlnet(base / "models" / "controlnet" / "jdm_hed.safetensors", dtype=torch.float32)
    z = comfy.sample.prepare_noise(latent["samples"], 11)
    with torch.no_grad():
        ref = sampling.generate_one_step(UNetDenoiser(unet, NoiseSchedule(), controlnet=controlnet), z, t_g,
                                         Cond(text, hint.movedim(-1, 1)))
    torch.testing.assert_close(ours * 0.18215, ref, rtol=1e-4, atol=2e-4)


def test_sampler_node_in_sampler_custom_equals_one_step_node(cui):
    nodes, _ = cui
    import comfy.samplers

    model = _load_model(cui)
    pos = [[_text(5), {}]]
    latent = _latent(64)
    sampler = _node(cui, "JDM_SamplerOneStep").execute().result[0]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 1)
    custom = nodes.NODE_CLASS_MAPPINGS["SamplerCustom"]().sample(model, True, 5, 1.0, pos, pos, sampler, sigmas,
                                                                 latent)[0]["samples"]
    ours = _node(cui, "JDM_OneStepSampler").execute(model, pos, latent, 5, 999).result[0]["samples"]
    torch.testing.assert_close(custom, ours, rtol=0, atol=1e-6)


def _guide(guider, model, seed=0, steps=2):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=seed)


def test_decoupled_cfg_with_b_equal_a_is_cfg_guider(cui):
    import comfy.samplers

    eps, w, steps = torch.finfo(torch.float32).eps, 4.0, 2
    model = _load_model(cui)
    pos, neg = [[_text(6), {}]], [[_text(7), {}]]
    ref = comfy.samplers.CFGGuider(model)
    ref.set_conds(pos, neg)
    ref.set_cfg(w)
    node = _node(cui, "JDM_DecoupledCFGGuider")
    same = node.execute(model, pos, neg, w).result[0]
    explicit = node.execute(model, pos, neg, w, model_b=model, positive_b=None).result[0]
    r = _guide(ref, model, steps=steps)
    # The same cond / uncond x0s through two float32 formulas: core's uncond + w (cond - uncond) and
    # ours cond + (w - 1)(cond - uncond). Each rounds a few times (say 4) on terms up to
    # |cond| + w |cond - uncond| <= (2w + 1) max|x0|, so one step's guided x0s differ by at most
    # 2 * 4 * eps * (2w + 1) max|x0|. An Euler step moves x by at most that difference and the
    # last step returns its x0 (max|x0| ~ max|r|), so `steps` steps add one such error each. A
    # fixed 1e-5 was below this bound (3.1e-5 was seen with torch 2.14); a wrong formula is O(1).
    tol = steps * 2 * 4 * eps * (2 * w + 1) * r.abs().max().item()
    torch.testing.assert_close(_guide(same, model, steps=steps), r, rtol=0, atol=tol)
    torch.testing.assert_close(_guide(explicit, model, steps=steps), r, rtol=0, atol=tol)
    # a second ModelPatcher of the same file takes the two-model path: same numbers
    twin = node.execute(model, pos, neg, 4.0, model_b=_load_model(cui)).result[0]
    torch.testing.assert_close(_guide(twin, model), r, rtol=1e-4, atol=1e-4)


def test_decoupled_cfg_at_scale_one_is_basic_guider(cui):
    nodes, _ = cui
    model = _load_model(cui)
    other = _load_model(cui, "other.safetensors")
    pos, neg = [[_text(8), {}]], [[_text(9), {}]]
    basic = nodes.NODE_CLASS_MAPPINGS["BasicGuider"]().get_guider(model, pos)[0]
    ours = _node(cui, "JDM_DecoupledCFGGuider").execute(model, pos, neg, 1.0, model_b=other).result[0]
    torch.testing.assert_close(_guide(ours, model), _guide(basic, model), rtol=0, atol=0)


def test_decoupled_cfg_two_models_follows_the_formula(cui):
    """One sampling step from sigma_max returns the guided x0: compare with the three x0s computed alone."""
    nodes, _ = cui
    from jdm_train import guidance

    a, b = _load_model(cui), _load_model(cui, "other.safetensors")
    pos_a, pos_b, neg_b = [[_text(10), {}]], [[_text(11), {}]], [[_text(12), {}]]
    basic = nodes.NODE_CLASS_MAPPINGS["BasicGuider"]()
    x0_a = _guide(basic.get_guider(a, pos_a)[0], a, steps=1)
    x0_bp = _guide(basic.get_guider(b, pos_b)[0], a, steps=1)
    x0_bn = _guide(basic.get_guider(b, neg_b)[0], a, steps=1)
    ours = _node(cui, "JDM_DecoupledCFGGuider").execute(a, pos_a, neg_b, 3.0, model_b=b, positive_b=pos_b).result[0]
    got = _guide(ours, a, steps=1)
    assert (x0_bp - x0_bn).abs().mean() > 1e-3
    # B's two conds run batched here and alone in the references: float noise only
    torch.testing.assert_close(got, guidance.decoupled_cfg(x0_a, x0_bp, x0_bn, 3.0), rtol=1e-3, atol=5e-4)


def test_user_errors_name_the_input(cui):
    model = _load_model(cui)
    sampler = _node(cui, "JDM_OneStepSampler")
    with pytest.raises(ValueError, match="latent_image"):
        sampler.execute(model, [[_text(0), {}]], {"samples": torch.randn(1, 3, 8, 8)}, 0, 999)
    with pytest.raises(ValueError, match="positive"):
        sampler.execute(model, [], _latent(), 0, 999)
    loader = _node(cui, "JDM_ControlNetLoader")
    cn = loader.execute("jdm_hed.safetensors").result[0]
    with pytest.raises(ValueError, match=r"image: .*'canny'.*'hed'"):
        _node(cui, "JDM_ApplyControlNet").execute([[_text(0), {}]], cn, torch.rand(1, 64, 64, 3), 1.0, "canny")
    with pytest.raises(ValueError, match="some-other-base"):
        loader.execute("foreign.safetensors", expected_base=BASE)
    assert loader.execute("foreign.safetensors").result[1] == "canny"  # no expectation: loads
    _, base = cui
    (base / "models" / "controlnet" / "not_a_controlnet.safetensors").write_bytes(
        (base / "models" / "unet" / "other.safetensors").read_bytes())
    with pytest.raises(ValueError, match="not a ControlNet: found a full checkpoint or UNet"):
        loader.execute("not_a_controlnet.safetensors")
    (base / "models" / "controlnet" / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^control_net_name: .*empty\.safetensors \(0 bytes\) is not a readable"):
        loader.execute("empty.safetensors")


@pytest.mark.parametrize("name,node,params", [
    ("canny", "JDM_CannyPreprocessor", {"low_threshold": 50, "high_threshold": 120, "softness": 1.0}),
    ("lowres", "JDM_LowResPreprocessor", {"factor": 8}),
])
def test_preprocessor_nodes_equal_the_core_extractors(cui, name, node, params):
    from jdm_train import extractors

    img = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(2))
    out, control = _node(cui, node).execute(img, **params).result
    ref = extractors.run_extractor(name, img.movedim(-1, 1), **params).movedim(1, -1)
    assert control == name
    assert out.shape == (2, 64, 48, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_hed_preprocessor_node_reads_only_the_annotator_folders(cui, tmp_path):
    """HED with random weights in the real ControlNetHED layout, picked from models/annotators;
    a path anywhere else is refused with one message, whether or not the file exists."""
    import folder_paths
    from safetensors.torch import save_file

    from jdm_train import extractors
    from jdm_train.extractors.hed import HEDNetwork

    _, base = cui
    annotators = base / "models" / "annotators"
    annotators.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("annotators", str(annotators))
    torch.manual_seed(0)
    weights = annotators / "jdm_test_hed.safetensors"
    save_file(HEDNetwork().state_dict(), str(weights))
    outside = tmp_path / "ControlNetHED.safetensors"
    save_file(HEDNetwork().state_dict(), str(outside))
    node = _node(cui, "JDM_HEDPreprocessor")
    spec = node.GET_NODE_INFO_V1()["input"]["required"]["weights"]
    assert spec[0] == "COMBO" and spec[1]["default"] == "ControlNetHED.pth"
    assert {"ControlNetHED.pth", "jdm_test_hed.safetensors"} <= set(spec[1]["options"])
    img = torch.rand(1, 32, 40, 3, generator=torch.Generator().manual_seed(3))
    out, control = node.execute(img, safe=False, weights="jdm_test_hed.safetensors").result
    ref = extractors.run_extractor("hed", img.movedim(-1, 1), weights=str(weights)).movedim(1, -1)
    assert control == "hed" and out.shape == (1, 32, 40, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name in (str(outside), "/etc/passwd", "/etc/no-such-file", "../../x"):
        with pytest.raises(ValueError, match=r"^weights: .* is not a name in the annotator folders"):
            node.execute(img, safe=False, weights=name)
    with pytest.raises(FileNotFoundError, match="ControlNetHED"):
        node.execute(img, safe=False, weights="missing/ControlNetHED.pth")


def test_depth_preprocessor_node_lists_model_folders(cui, tmp_path):
    """Depth with a tiny random DPT saved as a transformers folder in models/annotators: the `model`
    combo offers the folder (not the weight files inside it, nor to HED), the node equals the
    extractor on it, and any path is refused whether or not it exists."""
    import folder_paths
    from transformers import DPTConfig, DPTForDepthEstimation

    from jdm_train import extractors

    _, base = cui
    annotators = base / "models" / "annotators"
    annotators.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("annotators", str(annotators))
    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16],
                    fusion_hidden_size=8, head_hidden_size=8, use_auxiliary_head=False)
    model = DPTForDepthEstimation(cfg).eval()
    model.save_pretrained(annotators / "jdm_test_depth")
    model.save_pretrained(tmp_path / "outside-depth")
    node = _node(cui, "JDM_DepthPreprocessor")
    spec = node.GET_NODE_INFO_V1()["input"]["required"]["model"]
    assert spec[0] == "COMBO" and spec[1]["default"] == "dpt-hybrid-midas"
    assert spec[1]["options"][0] == "dpt-hybrid-midas" and "jdm_test_depth" in spec[1]["options"]
    assert not any(o.startswith("jdm_test_depth/") for o in spec[1]["options"])
    hed = _node(cui, "JDM_HEDPreprocessor").GET_NODE_INFO_V1()["input"]["required"]["weights"][1]["options"]
    assert not any(o.startswith("jdm_test_depth") for o in hed)
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    out, control = node.execute(img, resolution=32, model="jdm_test_depth").result
    ref = extractors.run_extractor("depth", img.movedim(-1, 1), resolution=32,
                                   model=str(annotators / "jdm_test_depth")).movedim(1, -1)
    assert control == "depth" and out.shape == (1, 32, 32, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for name in (str(tmp_path / "outside-depth"), str(tmp_path / "no-such-folder"), "../outside-depth"):
        with pytest.raises(ValueError, match=r"^model: .* is not a name in the annotator folders"):
            node.execute(img, resolution=32, model=name)
    with pytest.raises(FileNotFoundError, match=r"(?s)model: depth model folder 'dpt-hybrid-midas' not found"):
        node.execute(img, resolution=32, model="dpt-hybrid-midas")
