"""Full SD1.5-size round trips (slow: ~1.4B random parameters in memory)."""

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from jdm_train import fixtures, ldm_convert, model_io

pytestmark = pytest.mark.slow


def same(a, b):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def config(name):
    return json.loads((model_io.CONFIG_DIR / name).read_text())


def test_full_size_reverse_converters_round_trip_through_diffusers():
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config("sd15_unet_config.json"))
    sd = unet.state_dict()
    ldm = ldm_convert.unet_diffusers_to_ldm(sd)
    assert len(ldm) == 686  # the key count of the original SD1.5 UNet
    same(convert_ldm_unet_checkpoint({ldm_convert.UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config)), sd)
    cfg = ldm_convert.infer_unet_config(ldm)
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280] and cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == list(unet.config.down_block_types)

    cn = ControlNetModel.from_unet(unet)
    del unet, sd, ldm
    cn_sd = cn.state_dict()
    same(convert_controlnet_checkpoint(ldm_convert.controlnet_diffusers_to_ldm(cn_sd), dict(cn.config)), cn_sd)
    del cn, cn_sd

    vae = AutoencoderKL(**config("sd15_vae_config.json"))
    vae_sd = vae.state_dict()
    vae_ldm = ldm_convert.vae_diffusers_to_ldm(vae_sd)
    same(convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in vae_ldm.items()}, dict(vae.config)), vae_sd)
    assert ldm_convert.infer_vae_config(vae_ldm)["block_out_channels"] == [128, 256, 512, 512]

    te = fixtures.make_text_encoder(768, 12, 3072)
    back = convert_ldm_clip_checkpoint(ldm_convert.clip_diffusers_to_ldm(te.state_dict()))
    same({k.removeprefix("text_model."): v for k, v in back.items()},
         {k.removeprefix("text_model."): v for k, v in te.state_dict().items()})


def test_full_size_checkpoint_loads(tmp_path):
    ckpt = fixtures.write_full_sd1_checkpoint(tmp_path / "sd15.safetensors", dtype=torch.float16)
    pipe = model_io.load_sd1_checkpoint(ckpt)
    assert list(pipe.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.unet.config.attention_head_dim == 8
    assert list(pipe.vae.config.block_out_channels) == [128, 256, 512, 512]
    assert pipe.text_encoder.config.num_attention_heads == 12 and pipe.text_encoder.config.num_hidden_layers == 12
