"""JDM One-Step Sampler: the student `G(z, text, c)` run once through ComfyUI's sampling.

The sampler is `comfy.samplers.KSAMPLER` around `jdm_train.sampling.sample_one_step`, with
sigmas `[sigma(t_g), 0]` and no CFG (the student was distilled with guidance, JDM Sec. 3.1),
so ControlNets attached to the conditioning, model patches and previews work as for any
sampler. At t_g = 999 this is exactly core KSampler(steps=1, euler, simple, cfg 1).
"""

from __future__ import annotations

import math

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..jdm_train import sampling
from .common import CATEGORY, check_conditioning, check_latent

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def one_step_sampler() -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sampling.sample_one_step)


def generator_sigmas(model, timestep: int) -> torch.Tensor:
    """`[sigma(t_g), 0]` on the model's own discrete schedule (sigma(999) = sigma_max)."""
    ms = model.get_model_object("model_sampling")
    # the discrete table itself (what core schedulers index), not ms.sigma()'s log-interpolation
    sigma = ms.sigmas[int(timestep)] if hasattr(ms, "sigmas") else ms.sigma(torch.tensor(float(timestep)))
    return torch.stack([sigma.reshape(()).float().cpu(), torch.zeros(())])


class _PositiveOnlyGuider(comfy.samplers.CFGGuider):
    """cfg 1 with the positive conditioning only (what core BasicGuider builds)."""

    def set_conds(self, positive):
        self.inner_set_conds({"positive": positive})


def sample_one_step_latent(model, positive, latent: dict, seed: int, timestep: int) -> dict:
    """One student evaluation on seeded unit noise at `timestep`; returns a LATENT dict."""
    check_conditioning(positive, "positive")
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    check_latent(model, samples, "latent_image")
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    sigmas = generator_sigmas(model, timestep)
    ms = model.get_model_object("model_sampling")
    sigma = float(sigmas[0])
    if not (math.isclose(sigma, float(ms.sigma_max), rel_tol=1e-5) or sigma > float(ms.sigma_max)):
        # KSAMPLER scales noise by sigma below sigma_max; the student was trained on x_t = z
        # at t_g (jdm_train.sampling.generate_one_step), i.e. UNet input z, so undo that here.
        noise = noise * (math.sqrt(1.0 + sigma * sigma) / sigma)
    guider = _PositiveOnlyGuider(model)
    guider.set_conds(positive)
    callback = latent_preview.prepare_callback(model, 1)
    # The latent's content is ignored: the student maps pure noise to an image.
    out = guider.sample(noise, torch.zeros_like(samples), one_step_sampler(), sigmas, callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = latent.copy()
    result.pop("noise_mask", None)
    result["samples"] = out.to(comfy.model_management.intermediate_device())
    return result


class OneStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JDM_OneStepSampler",
            display_name="JDM One-Step Sampler",
            category=f"{CATEGORY}/sampling",
            description="One UNet evaluation of a JDM student on seeded noise at the generator timestep "
                        "(no CFG: the student was distilled with guidance). Attach the ControlNet to the "
                        "positive conditioning (Apply ControlNet).",
            inputs=[
                io.Model.Input("model", tooltip="The JDM student (Load Diffusion Model: models/unet/<output>.safetensors)."),
                io.Conditioning.Input("positive", tooltip="Text conditioning, with the JDM ControlNet applied to it."),
                io.Latent.Input("latent_image", tooltip="Sets the size and batch; its content is ignored."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the noise z."),
                io.Int.Input("timestep", default=sampling.DEFAULT_GENERATOR_TIMESTEP, min=1, max=999,
                             tooltip="Generator timestep t_g the student was trained at (jdm.timestep of the export)."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, timestep) -> io.NodeOutput:
        return io.NodeOutput(sample_one_step_latent(model, positive, latent_image, seed, timestep))


class SamplerOneStep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JDM_SamplerOneStep",
            display_name="JDM One-Step (SAMPLER)",
            category=f"{CATEGORY}/sampling",
            description="The one-step student evaluation as a SAMPLER for SamplerCustom / SamplerCustomAdvanced: "
                        "use 1 step (sigmas [sigma_max, 0]) and cfg 1 / BasicGuider.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(one_step_sampler())
