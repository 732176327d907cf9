"""Roles over one frozen base (jdm_train.denoisers): teacher, fake score, consistency model, student."""

import pytest
import torch

from jdm_train import fixtures
from jdm_train.denoisers import Cond, UNetDenoiser, build_roles, merged_student_unet
from jdm_train.schedule import NoiseSchedule


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 400])
    return x, t, Cond(torch.randn(2, 7, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g))


@pytest.mark.parametrize("student_rank, fake_rank", [(0, 0), (4, 4), (4, 0)])
def test_roles_start_at_the_teacher_and_move_independently(student_rank, fake_rank):
    torch.manual_seed(0)
    roles = build_roles(fixtures.make_unet(cross_attention_dim=64), NoiseSchedule(), student_lora_rank=student_rank,
                        fake_lora_rank=fake_rank, consistency_lora_rank=4, discriminator=True)
    x, t, cond = _inputs()
    with torch.no_grad():
        t0 = roles.teacher(x, t, cond)
        # zero-initialised LoRA B and zero convolutions: every role starts as the teacher
        for role in (roles.fake, roles.consistency, roles.student):
            torch.testing.assert_close(role(x, t, cond), t0, rtol=0, atol=1e-5)
        for group in ("student", "fake", "consistency", "controlnet"):
            for p in roles.groups[group]:
                p.add_(0.02 * torch.randn_like(p))
        t1 = roles.teacher(x, t, cond)
        fake, cons, student = roles.fake(x, t, cond), roles.consistency(x, t, cond), roles.student(x, t, cond)
    assert torch.equal(t0, t1), "the teacher ignores every adapter"
    assert (fake - t1).abs().max() > 1e-3 and (student - t1).abs().max() > 1e-3
    assert (cons - fake).abs().max() > 1e-3, "the consistency LoRA sits on top of the fake score"
    # gradients of the student reach only the student's parameters and the ControlNet
    roles.student(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for p in roles.groups["student"] + roles.groups["controlnet"])
    assert all(p.grad is None for p in roles.groups["fake"] + roles.groups["consistency"])
    roles.fake_tap.enabled = True
    roles.fake(x, t, cond)
    assert roles.discriminator(roles.fake_tap.value).shape == (2,)


def test_merged_student_equals_the_adapter_student():
    torch.manual_seed(0)
    roles = build_roles(fixtures.make_unet(cross_attention_dim=64), NoiseSchedule(), student_lora_rank=4,
                        fake_lora_rank=4, consistency_lora_rank=4)
    with torch.no_grad():
        for p in roles.groups["student"]:
            p.add_(0.05 * torch.randn_like(p))
    x, t, cond = _inputs()
    merged = UNetDenoiser(merged_student_unet(roles), NoiseSchedule(), controlnet=roles.controlnet)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, cond), roles.student(x, t, cond), rtol=1e-4, atol=1e-4)
        assert (merged(x, t, cond) - roles.teacher(x, t, cond)).abs().max() > 1e-3


def test_fresh_controlnet_sees_the_control_but_adds_nothing():
    """He-initialised hint encoder: its output depends on a sparse edge map from step 0, while the
    zero convolutions keep the student equal to the teacher. Default PyTorch init loses the control
    through the hint encoder (the ratio below is ~1e-3 there), which is what made the ControlNet slow."""
    from jdm_train.denoisers import init_hint_embedding, new_controlnet

    torch.manual_seed(0)
    unet = fixtures.make_unet(cross_attention_dim=64)
    cn = new_controlnet(unet)
    edges = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.97).float()
    x, t, cond = _inputs()

    def control_effect(embedding):
        with torch.no_grad():
            on, off = embedding(edges), embedding(torch.zeros_like(edges))
        return float((on - off).abs().mean() / on.abs().mean().clamp_min(1e-12))

    assert control_effect(cn.controlnet_cond_embedding) > 0.2
    with torch.no_grad():
        down, mid = cn(x, t, encoder_hidden_states=cond.text, controlnet_cond=edges, return_dict=False)
    assert all(float(r.abs().max()) == 0.0 for r in (*down, mid)), "zero convolutions: the student starts as the teacher"

    default = new_controlnet(unet)
    emb = default.controlnet_cond_embedding
    for conv in (emb.conv_in, *emb.blocks, emb.conv_out):
        conv.reset_parameters()  # PyTorch's default init, for comparison
    assert control_effect(emb) < 0.1 * control_effect(cn.controlnet_cond_embedding)
    init_hint_embedding(emb)
    assert control_effect(emb) > 0.2
