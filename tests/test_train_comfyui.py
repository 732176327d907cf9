"""The student LoRA export in a real ComfyUI: LoraLoaderModelOnly's code path
(`comfy.sd.load_lora_for_models`) maps every key and patches the base into the merged student.

Needs COMFYUI_PATH (a ComfyUI checkout with its requirements installed); skips cleanly without it
(`comfy` fixture in conftest.py).
"""

import pytest
import torch

from jdm_train import fixtures, ldm_convert, model_io
from jdm_train.denoisers import build_roles, merged_student_unet, student_lora_state
from jdm_train.schedule import NoiseSchedule

pytestmark = pytest.mark.comfyui


def test_student_lora_patches_base_into_merged_student(comfy, tmp_path):
    base_path = fixtures.write_comfy_detectable_unet(tmp_path / "base.safetensors", seed=3, dtype=torch.float32)
    torch.manual_seed(0)
    roles = build_roles(model_io.load_unet(base_path), NoiseSchedule(), student_lora_rank=4, fake_lora_rank=4,
                        consistency_lora_rank=4)
    with torch.no_grad():  # a trained-looking student: LoRA B is no longer zero
        for p in roles.groups["student"]:
            p.add_(0.05 * torch.randn_like(p))
    state, alpha = student_lora_state(roles)
    lora_path = model_io.save_state_dict(tmp_path / "lora.safetensors", ldm_convert.lora_to_comfyui(state, alpha),
                                         {"jdm.kind": "student_lora"})
    merged_path = model_io.save_unet_ldm(tmp_path / "merged.safetensors", merged_student_unet(roles))

    patcher = comfy.sd.load_diffusion_model(str(base_path))
    lora = comfy.utils.load_torch_file(str(lora_path))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    assert len(patched.patches) == len(state) // 2, "every LoRA module must map onto a UNet weight"
    patched.patch_model()
    theirs = patched.model.diffusion_model.state_dict()
    ours = ldm_convert.strip_prefix(model_io.read_state_dict(merged_path)[0], ldm_convert.UNET_PREFIX)
    base = ldm_convert.strip_prefix(model_io.read_state_dict(base_path)[0], ldm_convert.UNET_PREFIX)
    changed = 0
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)
        changed += not torch.equal(base[key], value)
    assert changed >= len(state) // 2
