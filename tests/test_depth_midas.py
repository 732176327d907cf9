"""The depth extractor on ControlNet's MiDaS file `dpt_hybrid-midas-501f0c75.pt`, with random
weights written in that file's key layout.

The MiDaS names are built here from MiDaS's module tree, independently of the loader's renaming
rules: `DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)` (midas/dpt_depth.py) holds
`pretrained` (midas/vit.py `_make_vit_b_rn50_backbone`: timm's `vit_base_resnet50_384` as
`pretrained.model`, whose `patch_embed.backbone` is timm's ResNetV2 with a `stem` and 3 `stages`
of bottleneck `blocks`; `act_postprocess1/2` are Identities in the hybrid, `act_postprocess3/4`
a readout projection `0.project.0`, a 1x1 conv `3` and, for 4, a strided conv `4`) and `scratch`
(midas/blocks.py: `layerN_rn`, `refinenetN` with `resConfUnit1/2.conv1/2` and `out_conv`, and
the head `output_conv` 0, 2, 4).
"""

import re

import pytest
import torch
import torch.nn.functional as F

from jdm_train.extractors import MissingWeightsError, get_extractor, load_depth
from jdm_train.extractors.depth import DEPTH_MODEL, MIDAS_FILES, midas_hybrid_config, midas_to_transformers
from jdm_train.extractors.weights import list_annotators, resolve_node_annotator

MIDAS = MIDAS_FILES[0]


pytestmark = pytest.mark.usefixtures("isolated_annotator_search")


def hybrid_config(hidden, layers, heads, mlp, grid, stem, widths, depths, neck, fusion):
    """A transformers DPT-hybrid configured as MiDaS's vitb_rn50_384 (hooks 0, 1, 8, 11; timm's LayerNorm eps)."""
    from transformers import BitConfig, DPTConfig

    backbone = BitConfig(layer_type="bottleneck", global_padding="same", embedding_dynamic_padding=True,
                         embedding_size=stem, depths=depths, hidden_sizes=widths, num_groups=32,
                         out_features=["stage1", "stage2", "stage3"])
    return DPTConfig(is_hybrid=True, backbone_config=backbone, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=mlp, image_size=16 * grid, patch_size=16,
                     layer_norm_eps=1e-6, backbone_out_indices=[0, 1, 8, 11], readout_type="project",
                     reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=neck, fusion_hidden_size=fusion,
                     backbone_featmap_shape=[1, widths[-1], grid, grid], use_batch_norm_in_fusion_residual=False,
                     use_auxiliary_head=False)


def full_config():
    """The real model: ViT-B/16 (768 wide, 12 blocks, 12 heads) on a 24 x 24 grid (384 px), ResNet-50's
    first 3 stages (3, 4, 9 blocks) after a 64-channel stem, neck features [256, 512, 768, 768], 256 fused."""
    return hybrid_config(768, 12, 12, 3072, 24, 64, [256, 512, 1024], [3, 4, 9], [256, 512, 768, 768], 256)


def tiny_config():
    # channels are multiples of timm's 32 GroupNorm groups; 12 blocks since MiDaS hooks blocks 8 and 11
    return hybrid_config(128, 12, 2, 64, 4, 32, [128, 256, 512], [1, 2, 1], [128, 256, 64, 64], 64)


def midas_names(cfg) -> list[tuple[str, str]]:
    """(MiDaS key, transformers key) of every parameter; `attn.qkv` pairs with the transformers prefix
    of query/key/value."""
    bit, pairs = cfg.backbone_config, []
    res, vit = "pretrained.model.patch_embed.backbone.", "pretrained.model."
    pairs += [(vit + "cls_token", "dpt.embeddings.cls_token"), (vit + "pos_embed", "dpt.embeddings.position_embeddings")]
    pairs += [(res + "stem.conv.weight", "dpt.embeddings.backbone.bit.embedder.convolution.weight")]
    pairs += [(res + f"stem.norm.{p}", f"dpt.embeddings.backbone.bit.embedder.norm.{p}") for p in ("weight", "bias")]
    for s, depth in enumerate(bit.depths):
        for b in range(depth):
            names = ["conv1.weight", "conv2.weight", "conv3.weight"]
            names += [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
            if b == 0:  # the first block of a stage changes width (and stride): a projection shortcut
                names += ["downsample.conv.weight", "downsample.norm.weight", "downsample.norm.bias"]
            pairs += [(f"{res}stages.{s}.blocks.{b}.{n}", f"dpt.embeddings.backbone.bit.encoder.stages.{s}.layers.{b}.{n}")
                      for n in names]
    pairs += [(vit + f"patch_embed.proj.{p}", f"dpt.embeddings.projection.{p}") for p in ("weight", "bias")]
    timm_block = {"norm1": "layernorm_before", "attn.qkv": "attention.attention", "attn.proj": "attention.output.dense",
                  "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(cfg.num_hidden_layers):
        pairs += [(f"{vit}blocks.{i}.{t}.{p}", f"dpt.encoder.layer.{i}.{h}.{p}")
                  for t, h in timm_block.items() for p in ("weight", "bias")]
    pairs += [(vit + f"norm.{p}", f"dpt.layernorm.{p}") for p in ("weight", "bias")]
    for p in ("weight", "bias"):
        pairs += [(f"pretrained.act_postprocess{n}.0.project.0.{p}", f"neck.reassemble_stage.readout_projects.{n - 1}.0.{p}")
                  for n in (3, 4)]
        pairs += [(f"pretrained.act_postprocess{n}.3.{p}", f"neck.reassemble_stage.layers.{n - 1}.projection.{p}")
                  for n in (3, 4)]
        pairs += [(f"pretrained.act_postprocess4.4.{p}", f"neck.reassemble_stage.layers.3.resize.{p}")]
    pairs += [(f"scratch.layer{n}_rn.weight", f"neck.convs.{n - 1}.weight") for n in (1, 2, 3, 4)]
    for n, fusion in ((4, 0), (3, 1), (2, 2), (1, 3)):  # refinenet4 takes the deepest features first
        for p in ("weight", "bias"):
            pairs += [(f"scratch.refinenet{n}.out_conv.{p}", f"neck.fusion_stage.layers.{fusion}.projection.{p}")]
            pairs += [(f"scratch.refinenet{n}.resConfUnit{u}.conv{c}.{p}",
                       f"neck.fusion_stage.layers.{fusion}.residual_layer{u}.convolution{c}.{p}")
                      for u in (1, 2) for c in (1, 2)]
    pairs += [(f"scratch.output_conv.{i}.{p}", f"head.head.{i}.{p}") for i in (0, 2, 4) for p in ("weight", "bias")]
    return pairs


def to_midas(hf: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A transformers hybrid DPT state dict in MiDaS's layout (q, k, v fused into timm's qkv)."""
    out, used = {}, set()
    for src, dst in midas_names(cfg):
        if ".qkv." in src:
            parts = [f"{dst.rsplit('.', 1)[0]}.{n}.{dst.rsplit('.', 1)[1]}" for n in ("query", "key", "value")]
            out[src] = torch.cat([hf[k] for k in parts])
            used.update(parts)
        else:
            out[src] = hf[dst]
            used.add(dst)
    assert used == set(hf), f"transformers keys without a MiDaS name: {sorted(set(hf) - used)[:5]}"
    return out


def tiny_model(seed=0):
    from transformers import DPTForDepthEstimation

    torch.manual_seed(seed)
    model = DPTForDepthEstimation(tiny_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases away from 1 and 0, so a swapped name shows
                p.add_(0.1 * torch.randn_like(p))
        # its inputs are ReLU outputs: positive weights keep the final ReLU open, and x100 makes a depth map
        # that varies well above float32 rounding
        model.head.head[4].weight.abs_().mul_(100)
    return model


def write_midas(path, model):
    sd = to_midas(model.state_dict(), model.config)
    sd["pretrained.model.head.weight"] = torch.randn(10, 128)  # timm's classifier, in the real file too
    sd["pretrained.model.head.bias"] = torch.randn(10)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def test_real_key_set_and_shapes_convert_to_the_full_size_model():
    from transformers import DPTForDepthEstimation

    cfg = full_config()
    with torch.device("meta"):
        hf = DPTForDepthEstimation(cfg).state_dict()
    real = {k: v.shape for k, v in to_midas(hf, cfg).items()}
    # ResNet stem 3 + 16 blocks x 9 + 3 shortcuts x 3; ViT 4 + 12 x 12 + final norm 2; reassemble 4 + 6;
    # layerN_rn 4; refinenets 4 x 10; head 6
    assert len(real) == 3 + 16 * 9 + 3 * 3 + 4 + 12 * 12 + 2 + 10 + 4 + 40 + 6 == 366
    known = {
        "pretrained.model.cls_token": (1, 1, 768),
        "pretrained.model.pos_embed": (1, 577, 768),
        "pretrained.model.patch_embed.backbone.stem.conv.weight": (64, 3, 7, 7),
        "pretrained.model.patch_embed.backbone.stages.0.blocks.0.downsample.conv.weight": (256, 64, 1, 1),
        "pretrained.model.patch_embed.backbone.stages.2.blocks.8.conv3.weight": (1024, 256, 1, 1),
        "pretrained.model.patch_embed.proj.weight": (768, 1024, 1, 1),
        "pretrained.model.blocks.0.attn.qkv.weight": (2304, 768),
        "pretrained.model.blocks.11.mlp.fc1.weight": (3072, 768),
        "pretrained.act_postprocess3.0.project.0.weight": (768, 1536),
        "pretrained.act_postprocess4.4.weight": (768, 768, 3, 3),
        "scratch.layer1_rn.weight": (256, 256, 3, 3),
        "scratch.layer4_rn.weight": (256, 768, 3, 3),
        "scratch.refinenet4.resConfUnit1.conv1.weight": (256, 256, 3, 3),
        "scratch.output_conv.0.weight": (128, 256, 3, 3),
        "scratch.output_conv.4.weight": (1, 32, 1, 1),
    }
    assert {k: tuple(real[k]) for k in known} == known
    assert not any(k.startswith(("pretrained.act_postprocess1", "pretrained.act_postprocess2")) for k in real)

    meta = {k: torch.empty(s, device="meta") for k, s in real.items()}
    meta["pretrained.model.head.weight"] = torch.empty(1000, 768, device="meta")
    meta["pretrained.model.head.bias"] = torch.empty(1000, device="meta")
    got = midas_hybrid_config(meta)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                  "patch_size", "layer_norm_eps", "backbone_out_indices", "neck_hidden_sizes", "fusion_hidden_size",
                  "backbone_featmap_shape", "reassemble_factors", "readout_type", "use_batch_norm_in_fusion_residual"):
        assert list(getattr(got, field)) == list(getattr(cfg, field)) if isinstance(getattr(cfg, field), (list, tuple)) \
            else getattr(got, field) == getattr(cfg, field), field
    for field in ("depths", "hidden_sizes", "embedding_size", "layer_type", "out_features", "num_groups",
                  "embedding_dynamic_padding"):
        assert getattr(got.backbone_config, field) == getattr(cfg.backbone_config, field), field
    assert got.backbone_config.global_padding.lower() == "same"
    converted = midas_to_transformers(meta)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in hf.items()}


def test_midas_file_loads_every_key_and_matches_transformers(tmp_path):
    ref = tiny_model()
    path = tmp_path / "ComfyUI" / "models" / "annotators" / MIDAS
    write_midas(path, ref)
    converted = midas_to_transformers(torch.load(path, weights_only=True), str(path))
    assert set(converted) == set(ref.state_dict())

    net = load_depth(path)
    loaded = net.model.state_dict()
    assert set(loaded) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert net.pre["height"] == net.pre["width"] == 64 and net.pre["mean"] == net.pre["std"] == (0.5, 0.5, 0.5)

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(pixel_values=pixels).predicted_depth
        got = net.model(pixel_values=pixels).predicted_depth
    assert want.shape == (2, 64, 64) and want.std() > 1e-2 and (want >= 0).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_extractor_on_the_midas_file(tmp_path):
    ref = tiny_model(seed=1)
    write_midas(tmp_path / "ComfyUI" / "models" / "annotators" / MIDAS, ref)
    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    ext = get_extractor("depth", comfyui_root=str(tmp_path / "ComfyUI"))  # the default name finds the file
    out = ext.extract(x)
    # MiDaS's input: the model's square size, bicubic (antialiased where it shrinks), (x - 0.5) / 0.5;
    # inverse depth back to the image size
    pixels = (F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False, antialias=True) - 0.5) / 0.5
    with torch.no_grad():
        d = F.interpolate(ref(pixel_values=pixels).predicted_depth[:, None], size=(48, 80), mode="bicubic",
                          align_corners=False)
    d = (d - d.amin((2, 3), keepdim=True)) / (d.amax((2, 3), keepdim=True) - d.amin((2, 3), keepdim=True))
    assert out.shape == (2, 3, 48, 80) and out.dtype == x.dtype
    torch.testing.assert_close(out[:, :1], d, rtol=0, atol=1e-5)
    assert torch.allclose(out.amin((1, 2, 3)), torch.zeros(2)) and torch.allclose(out.amax((1, 2, 3)), torch.ones(2))

    soft_in = x[:1].clone().double().requires_grad_(True)
    soft = get_extractor("depth", comfyui_root=str(tmp_path / "ComfyUI"), resolution=64).soft(soft_in)
    torch.testing.assert_close(soft.detach().float(), out[:1], rtol=0, atol=1e-4)
    soft[:, 0].square().sum().backward()
    assert soft_in.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="resolution=32.*64 x 64"):
        get_extractor("depth", comfyui_root=str(tmp_path / "ComfyUI"), resolution=32).extract(x)


def test_safetensors_conversion_with_the_same_keys(tmp_path):
    from safetensors.torch import save_file

    ref = tiny_model(seed=2)
    sd = to_midas(ref.state_dict(), ref.config)
    path = tmp_path / "dpt_hybrid-midas-501f0c75.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_depth(path).model(pixel_values=pixels).predicted_depth,
                                   ref(pixel_values=pixels).predicted_depth, rtol=0, atol=0)


def test_combo_lists_the_midas_file_and_the_node_name_resolves(tmp_path):
    aux = tmp_path / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts" / "lllyasviel" / "Annotators"
    models = tmp_path / "models" / "annotators"
    write_midas(aux / MIDAS, tiny_model())
    torch.save({}, aux / "ControlNetHED.pth")
    torch.save({}, aux / "dpt_large-midas-2f21e586.pt")
    (models / "mydepth").mkdir(parents=True)
    (models / "mydepth" / "config.json").write_text("{}")
    dirs = [models, aux]
    assert list_annotators(DEPTH_MODEL, dirs) == ["dpt-hybrid-midas", MIDAS, "mydepth"]
    assert resolve_node_annotator(DEPTH_MODEL, MIDAS, dirs) == aux / MIDAS
    assert resolve_node_annotator(DEPTH_MODEL, "dpt-hybrid-midas", dirs) == aux / MIDAS  # the default finds it
    with pytest.raises(MissingWeightsError, match="'ControlNetHED.pth' not found"):
        resolve_node_annotator(DEPTH_MODEL, "ControlNetHED.pth", dirs)  # a file, but not a depth model
    out = get_extractor("depth", comfyui_root=str(tmp_path)).extract(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64)


def test_missing_file_says_where_to_put_it(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        get_extractor("depth", comfyui_root=str(tmp_path)).extract(torch.rand(1, 3, 8, 8))
    msg = str(err.value)
    assert MIDAS in msg and "ComfyUI/models/annotators/" in msg and "lllyasviel/Annotators" in msg
    assert str(tmp_path / "models" / "annotators") in msg


@pytest.mark.parametrize("damage", ["extra", "missing", "shape", "not_hybrid"])
def test_a_file_of_another_layout_is_refused_naming_it(tmp_path, damage):
    sd = to_midas(tiny_model().state_dict(), tiny_config())
    if damage == "extra":
        sd["pretrained.act_postprocess1.0.project.0.weight"] = torch.zeros(128, 256)
    elif damage == "missing":
        del sd["scratch.refinenet2.resConfUnit1.conv2.bias"]
    elif damage == "shape":
        sd["scratch.output_conv.2.weight"] = torch.zeros(16, 32, 3, 3)
    else:  # DPT-large and other ViT-only files have no ResNet stem
        sd = {k: v for k, v in sd.items() if not re.match(r"pretrained\.model\.patch_embed\.backbone\.", k)}
    path = tmp_path / MIDAS
    torch.save(sd, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a MiDaS DPT-hybrid"):
        get_extractor("depth", model=str(path)).extract(torch.rand(1, 3, 64, 64))
