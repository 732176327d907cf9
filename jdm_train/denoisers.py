"""One interface for teacher, fake score, consistency model and student: `x0 = denoise(x_t, t, cond)`.

All of them are eps-prediction diffusers `UNet2DConditionModel`s read as x0 predictions through
`NoiseSchedule.x0_from_eps` (docs/method.md §0). With LoRA ranks > 0 a single frozen base
UNet serves several roles through peft adapters:

- teacher / real score `s_phi`: the base, adapters disabled;
- fake score `s_psi`: the base with the `fake` adapter (or a full copy when `fake_lora_rank=0`);
- consistency model `f_{psi,beta'}` (JDM Eq. 8): the fake score plus the `consistency` adapter;
- student `G_{theta,beta}`: the base with the `student` adapter (or a full copy) plus a
  ControlNet initialised from the UNet encoder with zero convolutions.

Conditions are a `Cond`: the text encoder's hidden states and, for the student, the control
image (B, 3, H, W) in [0, 1] at pixel resolution.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from jdm_train.ldm_convert import CLDM_HINT_CHANNELS
from jdm_train.schedule import NoiseSchedule

# Modules of a diffusers SD UNet that carry LoRA; every one maps to an LDM key in ComfyUI's
# `unet_to_diffusers`, so the student LoRA exports in kohya naming load with LoraLoaderModelOnly.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj")
HINT_OUT_STD = 0.02


@contextmanager
def averaged(ema, params: list):
    """Within the block `params` hold the average of a diffusers `EMAModel` (None: the online
    weights): the generator's exports and validation grids, the consistency target f^- of Eq. 8."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


@dataclass
class Cond:
    """What a denoiser is conditioned on. text: (B, L, D) hidden states; control: (B, 3, H, W) in [0, 1] or None."""

    text: Tensor
    control: Tensor | None = None

    def select(self, index: Tensor | slice) -> "Cond":
        return Cond(self.text[index], None if self.control is None else self.control[index])


class AdapterSwitch:
    """Selects which peft adapters of one UNet are active, without touching what is trainable.

    peft's `set_adapter` / `enable_adapters` also flip `requires_grad`; here the trainer decides
    that once (`trainable`), so switching roles inside a step never freezes a trained adapter.
    """

    def __init__(self, unet: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.unet = unet
        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.trainable: list[nn.Parameter] = []
        self.current: tuple[str, ...] | None = ("<unset>",)

    def activate(self, names: Iterable[str] | None) -> None:
        """Enable exactly `names` (None or empty: all adapters off, the bare base)."""
        key = tuple(names) if names else None
        if key == self.current or not self.layers:
            self.current = key
            return
        for layer in self.layers:
            if key is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(list(key), inference_mode=True)
        for p in self.trainable:
            p.requires_grad_(True)
        self.current = key


class UNetDenoiser:
    """`x0 = denoise(x_t, t, cond)`: a UNet (+ optional ControlNet) with a fixed adapter selection.

    x_t: (B, C, h, w) latents; t: (B,) integer timesteps; returns (B, C, h, w) x0 predictions.
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, switch: AdapterSwitch | None = None,
                 adapters: tuple[str, ...] | None = None, controlnet: nn.Module | None = None,
                 control_scale: float = 1.0):
        self.unet, self.schedule, self.switch, self.adapters = unet, schedule, switch, adapters
        self.controlnet, self.control_scale = controlnet, control_scale

    def activate(self) -> None:
        """Select this role's adapters. Call before back-propagating through a gradient-checkpointed
        pass of this role: the recomputation runs with whatever adapters are active then."""
        if self.switch is not None:
            self.switch.activate(self.adapters)

    def eps(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        self.activate()
        extra = {}
        if self.controlnet is not None:
            if cond.control is None:
                raise ValueError("the student needs a control image (cond.control is None)")
            down, mid = self.controlnet(x_t, t, encoder_hidden_states=cond.text, controlnet_cond=cond.control,
                                        conditioning_scale=self.control_scale, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x_t, t, encoder_hidden_states=cond.text, return_dict=False, **extra)[0]

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        eps = self.eps(x_t, t, cond)
        return self.schedule.x0_from_eps(x_t, eps.to(x_t.dtype), t)


class FeatureTap:
    """Keeps the output of a UNet's mid block from the last forward pass (the discriminator's input)."""

    def __init__(self, unet: nn.Module):
        self.value: Tensor | None = None
        self.enabled = False
        unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.enabled:
            self.value = output[0] if isinstance(output, tuple) else output


class DiscriminatorHead(nn.Module):
    """f-distill's density-ratio estimator: logit of p_phi / p_theta from fake-score bottleneck features.

    features: (B, C, h, w) -> (B,) logits; `r = exp(logit)` (docs/method.md §4).
    """

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        hidden = min(hidden, max(channels, 8))
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(math.gcd(32, hidden), hidden), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(math.gcd(32, hidden), hidden), nn.SiLU(),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).mean(dim=(1, 2, 3))


def _add_adapter(unet: nn.Module, rank: int, name: str) -> None:
    with warnings.catch_warnings():
        # peft warns on every adapter after the first; several adapters on one base is the design.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(lora_config(rank), adapter_name=name)


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(LORA_TARGETS))


def new_controlnet(unet: nn.Module, vae_scale_factor: int = 8) -> nn.Module:
    """ControlNet initialised from the UNet encoder with zero convolutions (JDM Sec. 3.2, student beta).

    The hint encoder downsamples the pixel-resolution control by `vae_scale_factor` to latent size.
    """
    from diffusers import ControlNetModel

    levels = int(round(math.log2(vae_scale_factor)))
    if 2**levels != vae_scale_factor or not 0 <= levels < len(CLDM_HINT_CHANNELS):
        raise ValueError(f"vae_scale_factor must be 1, 2, 4 or 8, got {vae_scale_factor}")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CLDM_HINT_CHANNELS[: levels + 1])
    init_hint_embedding(controlnet.controlnet_cond_embedding)
    return controlnet


def init_hint_embedding(embedding: nn.Module, out_std: float = HINT_OUT_STD) -> None:
    """He-initialise the hint encoder and give its output conv small random weights.

    With PyTorch's default conv init the sparse control (a few % of canny pixels) fades by
    ~1/sqrt(3) per layer over the hint encoder's seven convolutions, and a zero output conv
    multiplies in a second zero: the ControlNet then needs hundreds of steps before its features
    depend on the control at all (measured on the demo world: output sensitivity to the control
    1e-5 after 50 steps, 0.1 with this init). The zero convolutions that feed the UNet stay zero,
    so the student still starts exactly as the teacher.
    """
    for conv in (embedding.conv_in, *embedding.blocks):
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
    nn.init.normal_(embedding.conv_out.weight, std=out_std)
    nn.init.zeros_(embedding.conv_out.bias)


@dataclass
class Roles:
    """The models of a JDM run and their trainable parameter groups."""

    teacher: UNetDenoiser
    fake: UNetDenoiser
    consistency: UNetDenoiser
    student: UNetDenoiser
    controlnet: nn.Module
    fake_tap: FeatureTap
    discriminator: DiscriminatorHead | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    groups: dict[str, list[nn.Parameter]] = field(default_factory=dict)

    def trainable_state(self) -> dict[str, Tensor]:
        """Every trained tensor by a stable name (what a training checkpoint must hold)."""
        out = {}
        for group, params in self.groups.items():
            for i, p in enumerate(params):
                out[f"{group}.{i}"] = p.detach()
        return out

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        for group, params in self.groups.items():
            for i, p in enumerate(params):
                key = f"{group}.{i}"
                if key not in state or state[key].shape != p.shape:
                    raise ValueError(f"checkpoint does not match this configuration: {key!r} missing or mis-shaped")
                with torch.no_grad():
                    p.copy_(state[key])


def _adapter_params(unet: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]


def _role_unets(base: nn.Module, modules: dict[str, nn.Module], frozen_student: nn.Module | None, student_lora_rank: int,
                fake_lora_rank: int, consistency_lora_rank: int):
    """The UNets of fake score (with the consistency adapter) and student, and the adapters that select
    each role on them: a LoRA on `base` for rank > 0, else a full copy (added to `modules`)."""
    # Full copies are taken before any adapter is injected into the base.
    fake_unet = base if fake_lora_rank > 0 else copy.deepcopy(base)
    if frozen_student is not None:
        student_unet = frozen_student.requires_grad_(False)
    else:
        student_unet = base if student_lora_rank > 0 else copy.deepcopy(base)
    fake_adapters: tuple[str, ...] | None = None
    student_adapters: tuple[str, ...] | None = None
    if fake_lora_rank > 0:
        _add_adapter(base, fake_lora_rank, "fake")
        fake_adapters = ("fake",)
    else:
        modules["fake"] = fake_unet
    _add_adapter(fake_unet, consistency_lora_rank, "consistency")
    if frozen_student is None and student_lora_rank > 0:
        _add_adapter(base, student_lora_rank, "student")
        student_adapters = ("student",)
    elif student_unet is not base:
        modules["student"] = student_unet
    return fake_unet, student_unet, fake_adapters, student_adapters


def _trainable_groups(groups: dict[str, list[nn.Parameter]], base: nn.Module, fake_unet: nn.Module,
                      student_unet: nn.Module, frozen_student: nn.Module | None, student_lora_rank: int,
                      fake_lora_rank: int) -> None:
    """Add the fake score's, consistency LoRA's and student's trained parameters to `groups` and make
    every group trainable."""
    if fake_lora_rank > 0:
        groups["fake"] = _adapter_params(base, "fake")
    else:
        fake_unet.requires_grad_(False)
        groups["fake"] = [p for n, p in fake_unet.named_parameters() if "lora_" not in n]
    groups["consistency"] = _adapter_params(fake_unet, "consistency")
    if frozen_student is None:
        groups["student"] = (_adapter_params(base, "student") if student_lora_rank > 0
                             else list(student_unet.parameters()))
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)


def build_roles(base: nn.Module, schedule: NoiseSchedule, *, student_lora_rank: int = 0, fake_lora_rank: int = 0,
                consistency_lora_rank: int = 16, frozen_student: nn.Module | None = None,
                controlnet: nn.Module | None = None, discriminator: bool = False, vae_scale_factor: int = 8,
                gradient_checkpointing: bool = False) -> Roles:
    """Build teacher, fake score, consistency model and student around the frozen `base` UNet.

    `frozen_student` (extension phase, JDM Sec. 3.2.1): a trained student UNet kept frozen; only a
    new ControlNet is trained. `controlnet`: start from this ControlNet instead of a fresh one.
    Rank 0 means full, separate weights for that role.
    """
    base.requires_grad_(False)
    # The ControlNet copies the encoder before any adapter is injected (peft renames the layers).
    init_unet = frozen_student if frozen_student is not None else base
    controlnet = controlnet if controlnet is not None else new_controlnet(init_unet, vae_scale_factor)
    controlnet.requires_grad_(True)
    groups: dict[str, list[nn.Parameter]] = {"controlnet": list(controlnet.parameters())}
    modules: dict[str, nn.Module] = {"base": base, "controlnet": controlnet}
    fake_unet, student_unet, fake_adapters, student_adapters = _role_unets(
        base, modules, frozen_student, student_lora_rank, fake_lora_rank, consistency_lora_rank)

    switches = {id(u): AdapterSwitch(u) for u in {id(m): m for m in (base, fake_unet, student_unet)}.values()}
    _trainable_groups(groups, base, fake_unet, student_unet, frozen_student, student_lora_rank, fake_lora_rank)
    for unet_id, switch in switches.items():
        switch.trainable = [p for ps in groups.values() for p in ps]
        switch.activate(None)

    disc = None
    if discriminator:
        disc = DiscriminatorHead(base.config.block_out_channels[-1])
        groups["discriminator"] = list(disc.parameters())
        modules["discriminator"] = disc
    if gradient_checkpointing:
        for m in {id(m): m for m in (base, fake_unet, student_unet, controlnet)}.values():
            m.enable_gradient_checkpointing()

    sw = lambda u: switches[id(u)]  # noqa: E731
    return Roles(
        teacher=UNetDenoiser(base, schedule, sw(base), None),
        fake=UNetDenoiser(fake_unet, schedule, sw(fake_unet), fake_adapters),
        consistency=UNetDenoiser(fake_unet, schedule, sw(fake_unet),
                                 (fake_adapters or ()) + ("consistency",)),
        student=UNetDenoiser(student_unet, schedule, sw(student_unet), student_adapters, controlnet=controlnet),
        controlnet=controlnet,
        fake_tap=FeatureTap(fake_unet),
        discriminator=disc,
        modules=modules,
        groups=groups,
    )


def merged_student_unet(roles: Roles) -> nn.Module:
    """A plain diffusers UNet computing the student's UNet: its LoRA merged into a fresh copy of the base."""
    unet = roles.student.unet
    if not AdapterSwitch(unet).layers:
        return unet
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and roles.student.adapters:
            for adapter in roles.student.adapters:
                if adapter in module.lora_A:
                    delta = module.get_delta_weight(adapter).detach()
                    deltas[f"{name}.weight"] = deltas.get(f"{name}.weight", 0) + delta
    state = {}
    for key, value in unet.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        # Merged in fp32: the base may be stored in half precision, the LoRA delta is small.
        state[key] = value.float() + deltas[key].float() if key in deltas else value.float()
    merged = type(unet).from_config(unet.config)
    merged.load_state_dict(state)
    return merged.to(device=next(unet.parameters()).device).requires_grad_(False)


def student_lora_state(roles: Roles) -> tuple[dict[str, Tensor], float]:
    """The student adapter as kohya-style tensors on diffusers module names.

    Returns `({"<module>.lora_down.weight": A, "<module>.lora_up.weight": B}, alpha)`; the delta
    of a module's weight is `(alpha / rank) * B @ A` (reshaped for convolutions).
    """
    if not roles.student.adapters:
        raise ValueError("the student has no LoRA adapter (--student-lora-rank is 0)")
    name = roles.student.adapters[0]
    from peft.tuners.lora import LoraLayer

    out: dict[str, Tensor] = {}
    alpha = None
    for mod_name, module in roles.student.unet.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            out[f"{mod_name}.lora_down.weight"] = module.lora_A[name].weight.detach().clone()
            out[f"{mod_name}.lora_up.weight"] = module.lora_B[name].weight.detach().clone()
            alpha = module.lora_alpha[name]
    return out, float(alpha)
