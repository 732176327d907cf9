"""HED and depth extractors with random weights written in the real file layouts."""

import json
import re

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from jdm_train.extractors import HEDNetwork, MissingWeightsError, get_extractor
from jdm_train.extractors.depth import model_input_size

TINY_HED = ((4, 2), (6, 2), (8, 3), (8, 3), (8, 3))


pytestmark = pytest.mark.usefixtures("isolated_annotator_search")


def random_hed_state_dict(blocks=TINY_HED, seed=0):
    torch.manual_seed(seed)
    sd = HEDNetwork(blocks).state_dict()
    sd["block1.convs.0.weight"] /= 60  # inputs are 0..255: keep the side outputs off saturation
    for i in range(1, 6):
        sd[f"block{i}.projection.weight"] *= 30
    sd["norm"] = torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1)
    return sd


def write_hed(folder, sd, name="ControlNetHED.pth"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def reference_hed(sd, img):
    """Second implementation: the annotator's numpy path (F.conv2d per layer, cv2.resize)."""
    h = torch.from_numpy(img).permute(2, 0, 1)[None].double() * 255 - sd["norm"].double()
    sides = []
    for i in range(1, 6):
        if i > 1:
            h = F.max_pool2d(h, 2, 2)
        n = 1 + max(int(m.group(1)) for k in sd if (m := re.fullmatch(rf"block{i}\.convs\.(\d+)\.weight", k)))
        for j in range(n):
            h = F.relu(F.conv2d(h, sd[f"block{i}.convs.{j}.weight"].double(), sd[f"block{i}.convs.{j}.bias"].double(), padding=1))
        p = F.conv2d(h, sd[f"block{i}.projection.weight"].double(), sd[f"block{i}.projection.bias"].double())
        sides.append(cv2.resize(p[0, 0].numpy(), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR))
    return 1 / (1 + np.exp(-np.mean(sides, axis=0)))


def test_hed_parameter_names_match_controlnet_hed_pth():
    # ControlNetHED.pth: norm (1,3,1,1); blockN.convs.K.{weight,bias}; blockN.projection.{weight,bias}
    expected = {"norm": (1, 3, 1, 1)}
    cin = 3
    for i, (cout, n) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1):
        for k in range(n):
            expected[f"block{i}.convs.{k}.weight"] = (cout, cin if k == 0 else cout, 3, 3)
            expected[f"block{i}.convs.{k}.bias"] = (cout,)
        expected[f"block{i}.projection.weight"] = (1, cout, 1, 1)
        expected[f"block{i}.projection.bias"] = (1,)
        cin = cout
    got = {k: tuple(v.shape) for k, v in HEDNetwork().state_dict().items()}
    assert got == expected


@pytest.mark.parametrize("name", ["ControlNetHED.pth", "ControlNetHED.safetensors"])
def test_hed_matches_reference_from_models_annotators(tmp_path, name):
    sd = random_hed_state_dict()
    write_hed(tmp_path / "ComfyUI" / "models" / "annotators", sd, name)
    img = np.random.default_rng(0).random((37, 50, 3)).astype(np.float32)
    ext = get_extractor("hed", comfyui_root=str(tmp_path / "ComfyUI"))
    out = ext.extract(torch.from_numpy(img).permute(2, 0, 1)[None])
    assert out.shape == (1, 3, 37, 50) and torch.equal(out[:, 0], out[:, 1])
    ref = reference_hed(sd, img)
    assert np.abs(out[0, 0].numpy() - ref).max() < 1e-4
    assert 0.02 < ref.std() and 0.01 < ref.mean() < 0.99  # neither constant nor saturated


def test_hed_found_in_controlnet_aux_folders(tmp_path, monkeypatch):
    sd = random_hed_state_dict()
    root = tmp_path / "ComfyUI"
    write_hed(root / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts" / "lllyasviel" / "Annotators", sd)
    x = torch.rand(2, 3, 16, 16)
    a = get_extractor("hed", comfyui_root=str(root)).extract(x)
    write_hed(tmp_path / "aux" / "lllyasviel" / "Annotators", sd)
    monkeypatch.setenv("AUX_ANNOTATOR_CKPTS_PATH", str(tmp_path / "aux"))
    b = get_extractor("hed").extract(x)
    assert torch.equal(a, b)


def test_hed_missing_weights_error_lists_folders(tmp_path):
    root = tmp_path / "ComfyUI"
    with pytest.raises(MissingWeightsError) as err:
        get_extractor("hed", comfyui_root=str(root)).extract(torch.rand(1, 3, 8, 8))
    msg = str(err.value)
    assert "ControlNetHED.pth" in msg and "lllyasviel/Annotators" in msg
    assert str(root / "models" / "annotators") in msg
    assert str(root / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts" / "lllyasviel" / "Annotators") in msg


def test_hed_batch_dtype_safe_and_gradcheck(tmp_path):
    write_hed(tmp_path / "models" / "annotators", random_hed_state_dict())  # ./models/annotators
    ext = get_extractor("hed", chunk=2)
    x = torch.rand(3, 3, 20, 24, dtype=torch.float64)
    out = ext.extract(x)
    assert out.dtype == torch.float64
    for k in range(3):
        assert torch.allclose(out[k : k + 1], ext.extract(x[k : k + 1]), atol=1e-12)
    assert torch.allclose(ext.soft(x), out, atol=1e-12)
    safe = get_extractor("hed", safe=True).extract(x)
    assert set(safe.unique().tolist()) <= {0.0, 0.5, 1.0}
    small = torch.rand(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ext.soft, (small,), fast_mode=True)
    c = ext.extract(torch.rand(1, 3, 16, 16, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda t: ext.log_likelihood(t, c, tau=0.5), (small,), fast_mode=True)


# -- depth ------------------------------------------------------------------

def write_tiny_dpt(folder, preprocessor=None, seed=0):
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(seed)
    cfg = DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8, head_hidden_size=8, use_auxiliary_head=False,
    )
    model = DPTForDepthEstimation(cfg).eval()
    model.save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


def test_depth_matches_direct_model_call(tmp_path):
    pre = {"size": {"height": 32, "width": 32}, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}
    model = write_tiny_dpt(tmp_path / "ComfyUI" / "models" / "annotators" / "dpt-hybrid-midas", pre)
    x = torch.rand(2, 3, 32, 32)
    out = get_extractor("depth", comfyui_root=str(tmp_path / "ComfyUI")).extract(x)
    mean, std = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1), torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        d = model(pixel_values=(x - mean) / std).predicted_depth  # the DPT head upsamples 2x
    d = F.interpolate(d[:, None], size=(32, 32), mode="bicubic", align_corners=False)[:, 0]
    ref = (d - d.amin((1, 2), keepdim=True)) / (d.amax((1, 2), keepdim=True) - d.amin((1, 2), keepdim=True))
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[:, 0], ref, atol=1e-5)
    assert torch.allclose(out.amin((1, 2, 3)), torch.zeros(2)) and torch.allclose(out.amax((1, 2, 3)), torch.ones(2))


@pytest.mark.parametrize("hw", [(427, 640), (300, 451), (64, 64)])
@pytest.mark.parametrize("pre", [
    {"height": 384, "width": 384, "keep_aspect_ratio": False, "multiple": 1},
    {"height": 518, "width": 518, "keep_aspect_ratio": True, "multiple": 14},
])
def test_depth_input_size_follows_dpt_image_processor(hw, pre):
    from transformers.models.dpt.image_processing_pil_dpt import get_resize_output_image_size

    ref = get_resize_output_image_size(np.zeros((3, *hw)), (pre["height"], pre["width"]), pre["keep_aspect_ratio"],
                                       pre["multiple"])
    assert model_input_size(*hw, pre) == (ref.height, ref.width)


def test_depth_resizes_batches_and_gradchecks(tmp_path):
    write_tiny_dpt(tmp_path / "mydepth")
    ext = get_extractor("depth", model=str(tmp_path / "mydepth"), resolution=32, chunk=1)
    x = torch.rand(3, 3, 40, 52, dtype=torch.float64)
    out = ext.extract(x)
    assert out.shape == (3, 3, 40, 52) and out.dtype == torch.float64
    assert torch.allclose(out[1:2], ext.extract(x[1:2]), atol=1e-10)
    assert torch.allclose(ext.soft(x), out, atol=1e-10)
    small = get_extractor("depth", model=str(tmp_path / "mydepth"), resolution=16)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(small.soft, (x,), fast_mode=True)
    c = small.extract(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda t: small.log_likelihood(t, c, tau=0.5), (x,), fast_mode=True)


def test_depth_missing_folder_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="dpt-hybrid-midas"):
        get_extractor("depth", comfyui_root=str(tmp_path)).extract(torch.rand(1, 3, 8, 8))
    (tmp_path / "models" / "annotators" / "dpt-hybrid-midas").mkdir(parents=True)
    with pytest.raises(ValueError, match="config.json"):
        get_extractor("depth", comfyui_root=str(tmp_path)).extract(torch.rand(1, 3, 8, 8))
