"""Bad inputs to model_io: each gets a ValueError naming the file, what was found and what was expected."""

import pytest
import torch

from jdm_train import fixtures, model_io

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return fixtures.write_tiny_sd1_checkpoint(tmp_path_factory.mktemp("bad") / "tiny.safetensors")


@pytest.fixture(scope="module")
def ckpt_sd(ckpt):
    return model_io.read_state_dict(ckpt)[0]


def write(tmp_path, name, sd):
    return model_io.save_state_dict(tmp_path / name, sd, {})


def expect_error(path, *patterns, loader=model_io.load_sd1_checkpoint, **kw):
    with pytest.raises(ValueError) as err:
        loader(path, **kw)
    msg = str(err.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_pickle_refused_by_default_and_loaded_weights_only_on_opt_in(ckpt_sd, tmp_path):
    p = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ckpt_sd}, p)
    expect_error(p, "refusing to unpickle", "allow_pickle=True")
    pipe = model_io.load_sd1_checkpoint(p, allow_pickle=True)
    assert list(pipe.unet.config.block_out_channels) == [32, 64]


def test_pickle_with_code_is_refused_even_on_opt_in(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": Evil()}}, p)
    expect_error(p, "weights_only=True", allow_pickle=True)


def test_truncated_file(ckpt, tmp_path):
    data = ckpt.read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: len(data) // 2])
    expect_error(p, "truncated or corrupt", "expected a complete .safetensors file")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "does not exist")


def test_sdxl_checkpoint(ckpt_sd, tmp_path):
    sd = {k.replace("cond_stage_model.", "conditioner.embedders.0."): v for k, v in ckpt_sd.items()}
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 2816)
    expect_error(write(tmp_path, "xl.safetensors", sd), "found an SDXL checkpoint", "expected an SD1.x single-file checkpoint")


def test_sdxl_unet_by_context_dim(tmp_path):
    unet = fixtures.make_unet((32, 64), 1, cross_attention_dim=2048)
    p = model_io.save_unet_ldm(tmp_path / "xl_unet.safetensors", unet)
    expect_error(p, "SDXL UNet (context dim 2048)", "expected an SD1.x UNet", loader=model_io.load_unet)


def test_sd2_checkpoint_openclip_keys(ckpt_sd, tmp_path):
    sd = {k: v for k, v in ckpt_sd.items() if not k.startswith("cond_stage_model.")}
    sd["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 64)
    sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(192, 64)
    expect_error(write(tmp_path, "sd2.safetensors", sd), "found an SD2.x checkpoint", "OpenCLIP")


def test_sd2_v_prediction_by_context_dim(tmp_path):
    unet = fixtures.make_unet((32, 64), 1, cross_attention_dim=1024)
    vae = fixtures.make_vae((32, 32), 1)
    te = fixtures.make_text_encoder(64, 1, 64)
    p = model_io.save_sd1_checkpoint(tmp_path / "sd2ish.safetensors", unet, vae, te)
    expect_error(p, "SD2.x UNet (context dim 1024", "v-prediction", "expected an SD1.x checkpoint (context dim 768)")


def test_lora(tmp_path):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    expect_error(write(tmp_path, "lora.safetensors", sd), "found a LoRA", "expected an SD1.x single-file checkpoint")
    peft_sd = {"base_model.model.conv_in.lora_A.weight": torch.zeros(4, 4)}
    expect_error(write(tmp_path, "peft.safetensors", peft_sd), "found a LoRA")


def test_controlnet_passed_as_checkpoint(tmp_path):
    cn = fixtures.make_controlnet(fixtures.make_unet((32, 64), 1, cross_attention_dim=32))
    p = model_io.save_controlnet_ldm(tmp_path / "cn.safetensors", cn)
    expect_error(p, "found a ControlNet", "expected an SD1.x single-file checkpoint")
    expect_error(p, "found a ControlNet", "expected an SD1.x UNet", loader=model_io.load_unet)


def test_unet_only_passed_as_checkpoint(tmp_path):
    unet = fixtures.make_unet((32, 64), 1, cross_attention_dim=32)
    prefixed = model_io.save_unet_ldm(tmp_path / "u.safetensors", unet)
    expect_error(prefixed, "found a UNet-only checkpoint", "first_stage_model.", "expected an SD1.x single-file checkpoint")
    bare = model_io.save_unet_ldm(tmp_path / "bare.safetensors", unet, prefix="")
    expect_error(bare, "found a UNet-only file", "load_unet")
    diffusers_layout = write(tmp_path, "diffusers_unet.safetensors", unet.state_dict())
    expect_error(diffusers_layout, "found a diffusers-layout UNet")


def test_checkpoint_passed_as_controlnet(ckpt):
    expect_error(ckpt, "no ControlNet keys", "expected an SD1.x ControlNet", loader=model_io.load_controlnet)


def test_unknown_folder_and_unexportable_unet(tmp_path):
    with pytest.raises(ValueError, match="unknown model folder 'weights'.*expected one of"):
        model_io.resolve_model("x.safetensors", "weights")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type.*no SD1.x LDM layout"):
        model_io.save_unet_ldm(tmp_path / "c.safetensors", unet)
