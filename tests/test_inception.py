"""jdm_train.inception: pytorch-fid's FID Inception-v3, checked against the real weights file's layout
(written out below from pytorch-fid's `fid_inception_v3`, torchvision's `Inception3` and torch-fidelity's
TF-graph-to-torch key map), its patched pools, and the `--inception FILE` path of `evaluate`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jdm_train import evaluate, inception

# ----------------------------------------------------------------------------- the real file, as data

# BasicConv2d modules of each block type: torchvision's InceptionA..E attribute names.
BLOCK_CONVS = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3",
          "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
BLOCKS = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C", "Mixed_6c": "C",
          "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
# conv weight shapes (out, in, kh, kw) of pt_inception-2015-12-05-6726825d.pth, a representative subset
CONV_SHAPES = {
    "Conv2d_1a_3x3": (32, 3, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (64, 32, 3, 3),
    "Conv2d_3b_1x1": (80, 64, 1, 1), "Conv2d_4a_3x3": (192, 80, 3, 3),
    "Mixed_5b.branch1x1": (64, 192, 1, 1), "Mixed_5b.branch5x5_1": (48, 192, 1, 1), "Mixed_5b.branch5x5_2": (64, 48, 5, 5),
    "Mixed_5b.branch3x3dbl_1": (64, 192, 1, 1), "Mixed_5b.branch3x3dbl_2": (96, 64, 3, 3),
    "Mixed_5b.branch3x3dbl_3": (96, 96, 3, 3), "Mixed_5b.branch_pool": (32, 192, 1, 1),
    "Mixed_5c.branch_pool": (64, 256, 1, 1), "Mixed_5d.branch1x1": (64, 288, 1, 1), "Mixed_5d.branch_pool": (64, 288, 1, 1),
    "Mixed_6a.branch3x3": (384, 288, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_1": (128, 768, 1, 1), "Mixed_6b.branch7x7_2": (128, 128, 1, 7), "Mixed_6b.branch7x7_3": (192, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_2": (128, 128, 7, 1), "Mixed_6b.branch7x7dbl_5": (192, 128, 1, 7),
    "Mixed_6c.branch7x7_1": (160, 768, 1, 1), "Mixed_6d.branch7x7dbl_4": (160, 160, 7, 1),
    "Mixed_6e.branch7x7_1": (192, 768, 1, 1), "Mixed_6e.branch_pool": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2": (320, 192, 3, 3), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3),
    "Mixed_7b.branch1x1": (320, 1280, 1, 1), "Mixed_7b.branch3x3dbl_1": (448, 1280, 1, 1),
    "Mixed_7b.branch_pool": (192, 1280, 1, 1),
    "Mixed_7c.branch1x1": (320, 2048, 1, 1), "Mixed_7c.branch3x3_1": (384, 2048, 1, 1), "Mixed_7c.branch3x3_2a": (384, 384, 1, 3),
    "Mixed_7c.branch3x3_2b": (384, 384, 3, 1), "Mixed_7c.branch3x3dbl_2": (384, 448, 3, 3),
    "Mixed_7c.branch3x3dbl_3a": (384, 384, 1, 3), "Mixed_7c.branch3x3dbl_3b": (384, 384, 3, 1),
    "Mixed_7c.branch_pool": (192, 2048, 1, 1),
}
N_KEYS = 94 * 5 + 2  # 94 conv+BN modules (conv.weight, bn.weight/bias/running_mean/running_var) + fc.weight/bias


def _expected_keys() -> set[str]:
    modules = STEM + [f"{b}.{c}" for b, kind in BLOCKS.items() for c in BLOCK_CONVS[kind]]
    params = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    return {f"{m}.{p}" for m in modules for p in params} | {"fc.weight", "fc.bias"}


def _random_model(seed: int = 0) -> inception.FIDInceptionV3:
    """Random weights that keep activations O(1) through the 94 layers (He init, BN stats near 1)."""
    g = torch.Generator().manual_seed(seed)
    model = inception.FIDInceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, inception.BasicConv2d):
                w = m.conv.weight
                w.copy_(torch.randn(w.shape, generator=g) * (2 / w[0].numel()) ** 0.5)
                c = m.bn.num_features
                m.bn.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bn.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- tests


def test_key_layout_is_pytorch_fids_file():
    sd = inception.file_state_dict(inception.FIDInceptionV3())
    assert len(sd) == N_KEYS == 472
    assert set(sd) == _expected_keys()
    for name, shape in CONV_SHAPES.items():
        assert tuple(sd[f"{name}.conv.weight"].shape) == shape, name
        for stat in ("weight", "bias", "running_mean", "running_var"):
            assert tuple(sd[f"{name}.bn.{stat}"].shape) == (shape[0],), name
    assert tuple(sd["fc.weight"].shape) == (1008, 2048) and tuple(sd["fc.bias"].shape) == (1008,)
    assert not any(k.startswith("AuxLogits") for k in sd)  # fid_inception_v3 builds aux_logits=False
    assert all(m.bn.eps == 1e-3 for m in inception.FIDInceptionV3().modules() if isinstance(m, inception.BasicConv2d))


def _pool_probe(block, x: torch.Tensor) -> torch.Tensor:
    """The first channel of `block`'s pool branch, made the identity: branch_pool's conv picks input
    channel 0 and its BN passes it through, so the output is relu(pool(x)[:, 0])."""
    with torch.no_grad():
        bp = block.branch_pool
        bp.conv.weight.zero_()
        bp.conv.weight[0, 0] = 1
        bp.bn.weight.fill_(1), bp.bn.bias.zero_(), bp.bn.running_mean.zero_()
        bp.bn.running_var.fill_(1 - bp.bn.eps)
        out = block.eval()(x)
    return out[:, out.shape[1] - bp.conv.out_channels]


@pytest.mark.parametrize("name", ["Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c"])
def test_pool_branches_follow_the_tf_graph(name):
    """A/C/E_1 average without counting the zero padding; E_2 (Mixed_7c) max-pools (pytorch-fid's patches)."""
    block = getattr(inception.FIDInceptionV3(), name)
    c = block.branch_pool.conv.in_channels
    x = torch.rand(1, c, 6, 6, generator=torch.Generator().manual_seed(1))
    got = _pool_probe(block, x)
    if name == "Mixed_7c":
        want = F.max_pool2d(x[:, :1], 3, stride=1, padding=1)[:, 0]
    else:
        want = F.avg_pool2d(x[:, :1], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
        padded = F.avg_pool2d(x[:, :1], 3, stride=1, padding=1, count_include_pad=True)[:, 0]
        assert not torch.allclose(got, padded, atol=1e-3)  # the border differs
    torch.testing.assert_close(got, want)


def test_weights_file_through_the_cli_path(tmp_path):
    """Random weights in the file layout (.pth and fp16 .safetensors) load through `--inception` and give
    the in-memory model's (N, 2048) features; FID of a set to itself ~0, to a shifted set > 0."""
    from safetensors.torch import save_file

    model = _random_model(0)
    sd = inception.file_state_dict(model)
    pth_path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, pth_path)
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "inception.safetensors"))
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(images)

    pth = evaluate.feature_net_from_args(evaluate.parse_args(["--inception", str(pth_path), "--batch", "2"]))
    assert isinstance(pth, evaluate.InceptionFeatures)
    feats = pth.features(images)
    assert feats.shape == (4, 2048) and feats.std() > 1e-3
    torch.testing.assert_close(feats, want)
    st = evaluate.feature_net_from_args(evaluate.parse_args(["--inception", str(tmp_path / "inception.safetensors")]))
    torch.testing.assert_close(st.features(images[:2]), want[:2], rtol=0.05, atol=0.05)  # fp16 weights

    shifted = pth.features((images + 0.3).clamp(0, 1))
    self_fid, shifted_fid = evaluate.fid(feats, feats), evaluate.fid(feats, shifted)
    assert self_fid < 1e-6 * shifted_fid and shifted_fid > 1e-3


def test_a_file_in_another_layout_is_one_clear_error(tmp_path):
    sd = inception.file_state_dict(inception.FIDInceptionV3())
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)  # torchvision's aux head: not in the FID file
    del sd["Mixed_7c.branch_pool.conv.weight"]
    sd["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's 1000 ImageNet classes
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        inception.load_fid_inception(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 1: Mixed_7c.branch_pool.conv.weight" in msg
    assert "unexpected 1: AuxLogits.fc.weight" in msg
    assert "wrong shape 1: fc.weight (1000, 2048) != (1008, 2048)" in msg
    with pytest.raises(ValueError, match="no such file"):
        inception.load_fid_inception(tmp_path / "absent.pth")
