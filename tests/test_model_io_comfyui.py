"""Our exports in a real ComfyUI: UNETLoader's and ControlNetLoader's code paths load them,
and one sampling step matches the same step computed with diffusers.

Needs COMFYUI_PATH (a ComfyUI checkout with its requirements installed); skips cleanly without it
(`comfy` fixture in conftest.py).
"""

import math

import pytest
import torch

from jdm_train import fixtures, ldm_convert, model_io

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("comfy_exports")
    return (fixtures.write_comfy_detectable_unet(d / "student.safetensors", seed=11, metadata={"jdm.control": "canny"}),
            fixtures.write_comfy_detectable_controlnet(d / "cn.safetensors", seed=11))


def test_unet_export_is_detected_as_sd15_with_our_weights(comfy, files):
    student, _ = files
    patcher = comfy.sd.load_diffusion_model(str(student))
    assert type(patcher.model.model_config).__name__ == "SD15"
    theirs = patcher.model.diffusion_model.state_dict()
    ours, _ = model_io.read_state_dict(student)
    ours = ldm_convert.strip_prefix(ours, ldm_convert.UNET_PREFIX)
    assert sorted(theirs) == sorted(ours)
    for k, v in ours.items():
        assert torch.equal(theirs[k].float(), v.float()), k


def test_one_sampling_step_with_controlnet_matches_diffusers(comfy, files):
    student, cn_path = files
    torch.manual_seed(0)
    patcher = comfy.sd.load_diffusion_model(str(student))
    control = comfy.controlnet.load_controlnet(str(cn_path))
    assert control is not None
    ctx = torch.randn(1, 77, 768)
    hint = torch.rand(1, 3, 64, 64)
    noise = torch.randn(1, 4, 8, 8)
    c = control.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    positive = [[ctx, {"control": c, "control_apply_to_uncond": False}]]
    negative = [[torch.zeros_like(ctx), {}]]
    out = comfy.sample.sample(patcher, noise, 1, 1.0, "euler", "simple", positive, negative,
                              torch.zeros_like(noise), disable_pbar=True, seed=0)

    # the same step with diffusers: x = noise * sqrt(1 + s^2), UNet input x / sqrt(1 + s^2),
    # Euler to sigma 0 returns x0 = x - s * eps, in ComfyUI's latent space (/ 0.18215)
    unet = model_io.load_unet(student)
    cn = model_io.load_controlnet(cn_path)
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    s = float(((1 - abar[-1]) / abar[-1]).sqrt())
    t = torch.tensor([999])
    with torch.no_grad():
        down, mid = cn(noise, t, ctx, hint, return_dict=False)
        eps = unet(noise, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        no_control = unet(noise, t, ctx).sample
    x0 = noise * math.sqrt(1 + s * s) - s * eps
    torch.testing.assert_close(out.float(), x0 / 0.18215, rtol=1e-3, atol=1e-3)
    # and the ControlNet really took part
    assert (eps - no_control).abs().max() > 1e-3


def test_comfy_detectable_checkpoint_loads_in_comfyui(comfy, tmp_path):
    ckpt = fixtures.write_comfy_detectable_sd15(tmp_path / "sd15_tiny.safetensors", seed=5)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(ckpt), output_vae=True, output_clip=True, embedding_directory=None)
    assert type(model.model.model_config).__name__ == "SD15"
    tokens = clip.tokenize("a photo of a cat")
    cond = clip.encode_from_tokens(tokens)
    assert cond.shape == (1, 77, 768)
    image = vae.decode(torch.randn(1, 4, 8, 8))
    assert image.shape[-3:] == (64, 64, 3)
    # and our own loader reads the same file (TAESD VAE as AutoencoderTiny)
    pipe = model_io.load_sd1_checkpoint(ckpt)
    assert type(pipe.vae).__name__ == "AutoencoderTiny"
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(cond.float(), ours.float(), rtol=1e-2, atol=1e-2)
