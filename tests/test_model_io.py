"""Model I/O: loading SD1.x checkpoints offline, LDM exports, round trips through diffusers'
own LDM->diffusers converters, metadata and atomic writes."""

import os

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from jdm_train import fixtures, ldm_convert, model_io

torch.set_num_threads(1)


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def strip_text_model(sd: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


# --------------------------------------------------------------------------- converters


@pytest.mark.parametrize("arch", [
    dict(block_out_channels=(32, 64), layers_per_block=1),
    # four levels, two res blocks: the SD1.5 block structure, with two-digit block indices
    dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, transformer_layers_per_block=2),
    dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_levels=[False, True, True]),
])
def test_unet_reverse_converter_round_trips_through_diffusers(arch):
    unet = fixtures.make_unet(cross_attention_dim=32, **arch)
    sd = unet.state_dict()
    ldm = ldm_convert.unet_diffusers_to_ldm(sd)
    assert "input_blocks.0.0.weight" in ldm and "out.2.weight" in ldm
    back = convert_ldm_unet_checkpoint({ldm_convert.UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config))
    assert_same_tensors(back, sd)
    # the architecture read off the LDM weights is the one we started from
    cfg = ldm_convert.infer_unet_config(ldm)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim"):
        assert list(cfg[key]) == list(unet.config[key]) if isinstance(cfg[key], list) else cfg[key] == unet.config[key]


def test_vae_reverse_converter_round_trips_through_diffusers():
    vae = fixtures.make_vae(block_out_channels=(32, 64, 64), layers_per_block=2)
    sd = vae.state_dict()
    ldm = ldm_convert.vae_diffusers_to_ldm(sd)
    # original checkpoints store the attention projections as 1x1 convolutions
    assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    assert "decoder.up.0.block.2.conv1.weight" in ldm and "encoder.down.1.block.0.nin_shortcut.weight" in ldm
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, dict(vae.config))
    assert_same_tensors(back, sd)
    cfg = ldm_convert.infer_vae_config(ldm)
    assert cfg["block_out_channels"] == [32, 64, 64] and cfg["layers_per_block"] == 2


def test_clip_reverse_converter_round_trips_through_diffusers():
    te = fixtures.make_text_encoder(64, 2, 128)
    ldm = ldm_convert.clip_diffusers_to_ldm(te.state_dict())
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm)
    back = convert_ldm_clip_checkpoint(ldm)
    assert_same_tensors(strip_text_model(back), strip_text_model(te.state_dict()))


def test_controlnet_reverse_converter_round_trips_through_diffusers():
    unet = fixtures.make_unet((32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32)
    cn = fixtures.make_controlnet(unet)
    sd = cn.state_dict()
    ldm = ldm_convert.controlnet_diffusers_to_ldm(sd)
    for key in ("input_hint_block.14.weight", "zero_convs.11.0.weight", "middle_block_out.0.weight"):
        assert ldm_convert.CONTROL_PREFIX + key in ldm
    back = convert_controlnet_checkpoint(ldm, dict(cn.config))
    assert_same_tensors(back, sd)


def test_taesd_key_mapping_round_trips():
    vae = fixtures.make_taesd_vae()
    comfy = ldm_convert.taesd_from_diffusers(vae.state_dict())
    # ComfyUI's TAESD decoder: Clamp at index 0, the first conv at 1 (its latent-channel probe)
    assert comfy["taesd_decoder.1.weight"].shape[1] == 4
    back = ldm_convert.taesd_to_diffusers(comfy)
    assert_same_tensors(back, vae.state_dict())


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return fixtures.write_tiny_sd1_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=3)


def test_tiny_checkpoint_has_real_ldm_layout(tiny_ckpt):
    sd, meta = model_io.read_state_dict(tiny_ckpt)
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd
    assert "first_stage_model.decoder.up.3.block.0.conv1.weight" in sd
    assert sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 64)
    assert meta["jdm.kind"] == "checkpoint"


def test_load_sd1_checkpoint_reproduces_the_modules_that_were_saved(tiny_ckpt):
    pipe = model_io.load_sd1_checkpoint(tiny_ckpt)
    # same seeds as write_tiny_sd1_checkpoint(seed=3): the independent reference modules
    unet = fixtures.make_unet(**fixtures.TINY_UNET, seed=3)
    vae = fixtures.make_vae(**fixtures.TINY_VAE, seed=4)
    te = fixtures.make_text_encoder(**fixtures.TINY_CLIP, seed=5)
    assert_same_tensors(pipe.unet.state_dict(), unet.state_dict())
    assert_same_tensors(pipe.vae.state_dict(), vae.state_dict())
    assert_same_tensors(strip_text_model(pipe.text_encoder.state_dict()), strip_text_model(te.state_dict()))
    # shapes cannot tell head counts apart; outputs can
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(emb, te(ids).last_hidden_state)
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
        torch.testing.assert_close(pipe.unet(x, t, emb).sample, unet(x, t, emb).sample)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    assert pipe.vae.config.scaling_factor == 0.18215
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_load_sd1_checkpoint_device_and_dtype(tiny_ckpt):
    pipe = model_io.load_sd1_checkpoint(tiny_ckpt, device="cpu", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16


def test_tokenizer_from_openai_clip_vocabulary(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    tok = model_io.load_tokenizer(tmp_path / "x.safetensors")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_tokenizer_folder_beside_checkpoint_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    # a two-word vocabulary: only this folder can produce these ids
    (folder / "vocab.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1, "c": 2, "a": 3, "t</w>": 4, '
                                       '"ca": 5, "cat</w>": 6}')
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = model_io.load_tokenizer(tmp_path / "model.safetensors")
    assert tok("cat").input_ids == [0, 6, 1]


def test_tokenizer_from_comfyui_root(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    folder = tmp_path / "comfy" / "comfy" / "sd1_tokenizer"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1, "c": 2, "a": 3, "t</w>": 4, '
                                       '"ca": 5, "cat</w>": 7}')
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = model_io.load_tokenizer(tmp_path / "m.safetensors", comfyui_root=tmp_path / "comfy")
    assert tok("cat").input_ids == [0, 7, 1]


def test_missing_clip_keys_fail_loudly(tiny_ckpt, tmp_path):
    sd, meta = model_io.read_state_dict(tiny_ckpt)
    del sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    bad = model_io.save_state_dict(tmp_path / "bad.safetensors", sd, meta)
    with pytest.raises(ValueError, match=r"CLIP text encoder weights do not match.*keys loaded.*final_layer_norm"):
        model_io.load_sd1_checkpoint(bad)


# --------------------------------------------------------------------------- exports


def test_unet_export_loads_back_with_metadata(tmp_path):
    unet = fixtures.make_unet((32, 64), 1, cross_attention_dim=32, seed=7)
    meta = {"jdm.control": "canny", "jdm.timestep": 999, "jdm.base": "sd15.safetensors",
            "jdm.config": {"lr": 1e-5, "steps": 10}}
    for prefix in (ldm_convert.UNET_PREFIX, ""):
        p = model_io.save_unet_ldm(tmp_path / f"student{len(prefix)}.safetensors", unet, meta, prefix=prefix)
        sd, raw = model_io.read_state_dict(p)
        assert f"{prefix}input_blocks.0.0.weight" in sd
        assert all(isinstance(v, str) for v in raw.values())
        md = model_io.read_metadata(p)
        assert md["jdm.kind"] == "student" and md["jdm.control"] == "canny" and md["jdm.timestep"] == "999"
        assert md["jdm.config"] == {"lr": 1e-5, "steps": 10}
        loaded = model_io.load_unet(p)
        assert_same_tensors(loaded.state_dict(), unet.state_dict())
    assert sorted(os.listdir(tmp_path)) == ["student0.safetensors", "student22.safetensors"]


def test_controlnet_loads_from_our_export_bare_cldm_and_diffusers_layouts(tmp_path):
    unet = fixtures.make_unet((32, 64), 1, cross_attention_dim=32, seed=1)
    cn = fixtures.make_controlnet(unet, seed=2)
    ours = model_io.save_controlnet_ldm(tmp_path / "cn.safetensors", cn, {"jdm.control": "hed"})
    assert model_io.read_metadata(ours)["jdm.kind"] == "controlnet"
    sd, _ = model_io.read_state_dict(ours)
    bare = model_io.save_state_dict(tmp_path / "bare.safetensors", ldm_convert.strip_prefix(sd, "control_model."), {})
    diffusers_layout = model_io.save_state_dict(tmp_path / "diffusers.safetensors", cn.state_dict(), {})
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 32)
    hint = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = cn(x, t, ctx, hint, return_dict=False)
        for p in (ours, bare, diffusers_layout):
            loaded = model_io.load_controlnet(p)
            assert_same_tensors(loaded.state_dict(), cn.state_dict())
            out = loaded(x, t, ctx, hint, return_dict=False)
            for a, b in zip([*out[0], out[1]], [*ref[0], ref[1]]):
                torch.testing.assert_close(a, b)


def test_controlnet_with_non_cldm_hint_embedding_is_refused(tmp_path):
    from diffusers import ControlNetModel

    unet = fixtures.make_unet((32, 64), 1, cross_attention_dim=32)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(ValueError, match=r"conditioning_embedding_out_channels=\(16, 32\).*hard-codes"):
        model_io.save_controlnet_ldm(tmp_path / "cn.safetensors", cn)


def test_checkpoint_export_round_trip_and_metadata(tiny_ckpt, tmp_path):
    pipe = model_io.load_sd1_checkpoint(tiny_ckpt)
    out = model_io.save_sd1_checkpoint(tmp_path / "re.safetensors", pipe.unet, pipe.vae, pipe.text_encoder,
                                       {"jdm.base": "tiny.safetensors"})
    a, _ = model_io.read_state_dict(tiny_ckpt)
    b, meta = model_io.read_state_dict(out)
    assert_same_tensors(a, b)
    assert meta["jdm.base"] == "tiny.safetensors" and meta["jdm.text_heads"] == "1"


def test_atomic_write_replaces_and_failed_write_keeps_old_file(tmp_path):
    p = tmp_path / "w.safetensors"
    model_io.save_state_dict(p, {"a": torch.zeros(2)}, {"v": "1"})
    model_io.save_state_dict(p, {"a": torch.ones(2)}, {"v": "2"})
    assert model_io.read_metadata(p)["v"] == "2"
    shared = torch.zeros(4)
    with pytest.raises(Exception):  # safetensors refuses tensors sharing memory
        model_io.save_state_dict(p, {"x": shared, "y": shared[:2]}, {"v": "3"})
    sd, meta = model_io.read_state_dict(p)
    assert meta["v"] == "2" and torch.equal(sd["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["w.safetensors"]
    with pytest.raises(ValueError, match=r"\.safetensors"):
        model_io.save_state_dict(tmp_path / "w.ckpt", {"a": torch.zeros(1)}, {})


def test_checkpoint_with_old_clip_keys_and_extra_ldm_keys_loads(tiny_ckpt, tmp_path):
    # older SD1.x files: CLIP keys without `text_model.`, position_ids, and schedule buffers
    sd, meta = model_io.read_state_dict(tiny_ckpt)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in sd.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    old["alphas_cumprod"] = torch.ones(1000)
    p = model_io.save_state_dict(tmp_path / "old.safetensors", old, meta)
    a = model_io.load_sd1_checkpoint(p).text_encoder.state_dict()
    b = model_io.load_sd1_checkpoint(tiny_ckpt).text_encoder.state_dict()
    assert_same_tensors(a, b)
