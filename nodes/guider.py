"""Decoupled-CFG Teacher: a GUIDER combining a fidelity model A and a guidance model B.

    x0 = x0_A(pos_A) + (cfg - 1) (x0_B(pos_B) - x0_B(neg_B))        (JDM Sec. 3.1)

through `jdm_train.guidance.decoupled_cfg`, the formula the trainer distils toward. With B = A
and pos_B = pos_A it is ordinary CFG; with cfg = 1 it is A alone (BasicGuider). It previews in
ComfyUI the distribution a decoupled-CFG student is trained to match, to pick the scale first.
"""

from __future__ import annotations

import math

import torch

import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers
from comfy_api.latest import io

from ..jdm_train import guidance
from .common import CATEGORY, check_conditioning

GUIDANCE_KEY = "jdm_guidance_teacher"


class DecoupledCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose prediction is `guidance.decoupled_cfg` over one or two models."""

    def __init__(self, model_a, model_b=None):
        self.model_b = model_b if model_b is not None and model_b is not model_a else None
        if self.model_b is not None:
            # so that sampling loads B together with A (comfy.sampler_helpers.prepare_sampling)
            model_a = model_a.clone()
            model_a.set_additional_models(GUIDANCE_KEY, [self.model_b])
        super().__init__(model_a)
        self.original_conds_b = {}

    def set_conds(self, positive_a, negative_b, positive_b=None):
        self.shared_positive = positive_b is None
        if self.model_b is None:
            conds = {"positive": positive_a, "negative": negative_b}
            if positive_b is not None:
                conds["positive_b"] = positive_b
            self.inner_set_conds(conds)
        else:
            self.inner_set_conds({"positive": positive_a})
            self.original_conds_b = {
                "positive": comfy.sampler_helpers.convert_cond(positive_a if positive_b is None else positive_b),
                "negative": comfy.sampler_helpers.convert_cond(negative_b)}

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        if self.model_b is None:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed)
        model_b = self.model_b.model
        latent_b = latent_image
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_b = model_b.process_latent_in(latent_image)
        conds_b = {k: [c.copy() for c in v] for k, v in self.original_conds_b.items()}
        self.conds_b = comfy.samplers.process_conds(model_b, noise, conds_b, device, latent_b, denoise_mask, seed)
        self.model_options_b = comfy.model_patcher.create_model_options_clone(self.model_b.model_options)
        self.model_b.pre_run()
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed)
        finally:
            self.model_b.cleanup()
            del self.conds_b

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        pos_a = self.conds.get("positive")
        if math.isclose(self.cfg, 1.0):
            # (cfg - 1) = 0: B is not evaluated, as core CFGGuider skips its uncond at cfg 1
            return comfy.samplers.calc_cond_batch(self.inner_model, [pos_a], x, timestep, model_options)[0]
        if self.model_b is None:
            if self.shared_positive:
                x0_a, x0_neg = comfy.samplers.calc_cond_batch(
                    self.inner_model, [pos_a, self.conds.get("negative")], x, timestep, model_options)
                x0_b = x0_a
            else:
                x0_a, x0_b, x0_neg = comfy.samplers.calc_cond_batch(
                    self.inner_model, [pos_a, self.conds.get("positive_b"), self.conds.get("negative")],
                    x, timestep, model_options)
        else:
            x0_a = comfy.samplers.calc_cond_batch(self.inner_model, [pos_a], x, timestep, model_options)[0]
            x0_b, x0_neg = comfy.samplers.calc_cond_batch(
                self.model_b.model, [self.conds_b["positive"], self.conds_b["negative"]], x, timestep,
                self.model_options_b)
        return guidance.decoupled_cfg(x0_a, x0_b, x0_neg, self.cfg)


class DecoupledCFGTeacher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JDM_DecoupledCFGGuider",
            display_name="JDM Decoupled-CFG Teacher",
            category=f"{CATEGORY}/sampling",
            description="GUIDER for SamplerCustomAdvanced: x0_A(positive) + (cfg - 1)(x0_B(positive_b) - x0_B(negative)). "
                        "Fidelity model A and guidance model B may differ (e.g. SD1.5 guided by SD2.1); "
                        "without model_b it is ordinary CFG.",
            inputs=[
                io.Model.Input("model", tooltip="Fidelity teacher A (the real score)."),
                io.Conditioning.Input("positive", tooltip="Prompt for A."),
                io.Conditioning.Input("negative", tooltip="Negative / empty prompt for B (encoded with B's CLIP)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale w of B (1: no guidance)."),
                io.Model.Input("model_b", optional=True, tooltip="Guidance teacher B; default: A."),
                io.Conditioning.Input("positive_b", optional=True,
                                      tooltip="Prompt for B (encoded with B's CLIP); default: positive."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, model_b=None, positive_b=None) -> io.NodeOutput:
        check_conditioning(positive, "positive")
        check_conditioning(negative, "negative")
        if positive_b is not None:
            check_conditioning(positive_b, "positive_b")
        if model_b is not None and model_b is not model:
            fa = model.get_model_object("latent_format")
            fb = model_b.get_model_object("latent_format")
            if type(fa) is not type(fb):
                raise ValueError(f"model_b: its latent space ({type(fb).__name__}) differs from model's "
                                 f"({type(fa).__name__}); decoupled CFG needs one latent space (e.g. SD1.5 + SD2.1)")
        guider = DecoupledCFGGuider(model, model_b)
        guider.set_conds(positive, negative, positive_b)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)
