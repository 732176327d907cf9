"""The training loop of JDM (arXiv 2503.06652, Alg. 1): the only module that touches accelerate.

`Trainer.generator_step()` updates the student (UNet + ControlNet) along the JDM direction
(Eq. 5 / 9 / 10, `losses.generator_loss`); `Trainer.fake_score_step()` updates the fake score
(Eq. 6), the consistency LoRA (Eq. 8) and, for f-divergences other than reverse-KL, the
density-ratio discriminator. accelerate supplies the device, autocast, loss scaling,
trackers and optimizer/RNG checkpointing; gradients are averaged across processes by hand
because one frozen base carries several roles' adapters, which DDP's one-module-one-backward
model does not fit. What a run writes for its users (exports, preview grids) is in `export.py`;
this module only decides which process writes it.

Randomness is a pure function of (seed, step, process, purpose), and the batch order of
(seed, step) (`data.BatchOrder`), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import signal
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from jdm_train import losses, model_io
from jdm_train.config import TrainConfig
from jdm_train.data import BatchOrder, CaptionedImageFolder
from jdm_train.denoisers import Cond, UNetDenoiser, build_roles
from jdm_train.export import clean_export_leftovers, default_output_dir, write_exports, write_preview_grid
from jdm_train.sampling import ddim_reference, generate_one_step
from jdm_train.schedule import NoiseSchedule

log = logging.getLogger("jdm_train")
_PURPOSES = {"z": 1, "t": 2, "eps": 3, "fake_z": 4, "fake_t": 5, "fake_eps": 6, "cons_t": 7, "cons_eps": 8,
             "disc_t": 9, "disc_eps": 10, "preview": 11,
             "control_dropout": 12}


class NonFiniteLossError(RuntimeError):
    """Raised when `--max-nonfinite` consecutive steps had a non-finite loss."""


def resolve_teacher(config: TrainConfig) -> Path:
    """`--ckpt demo` is the demo teacher shipped in `jdm_train/demo/assets/`; anything else a checkpoint name."""
    if config.ckpt == "demo":
        from jdm_train import demo

        return demo.teacher_path()
    return model_io.resolve_model(config.ckpt, "checkpoints", config.comfyui_root)


def load_dataset(config: TrainConfig):
    if config.data == "demo":
        from jdm_train.demo.data import ShapesDataset

        return ShapesDataset(resolution=config.resolution)
    if not config.data:
        raise ValueError("--data: a folder of captioned images is required (or --ckpt demo)")
    return CaptionedImageFolder(config.data, config.resolution)


def load_reward(spec: str):
    """`MODULE:FUNCTION` -> callable(images BCHW [0, 1], prompts) -> (B,) (JDM Eq. 9).

    The reward is used as the condition term's log-likelihood is (docs/method.md §5, §9): a
    per-image log-probability of the whole image, so a per-pixel reward is summed over pixels,
    never averaged, and `--reward-weight` 1 keeps Eq. 9's scale."""
    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--reward: cannot import {spec!r} ({exc}); expected MODULE:FUNCTION") from exc
    if not callable(fn):
        raise ValueError(f"--reward: {spec!r} is not callable")
    return fn


def _has_accelerator() -> bool:
    # Without a GPU/MPS/XPU device accelerate must be told "cpu" to join a multi-process (gloo) run.
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "is_available"):
        return bool(api.is_available())
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Trainer:
    """Builds every model of a run from a `TrainConfig` and runs Alg. 1 of JDM."""

    def __init__(self, config: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.config = config.validate()
        if config.threads:
            torch.set_num_threads(config.threads)
        if accelerator is None and AcceleratorState._shared_state:
            # A second run in one process (tests, notebooks) may ask for another precision; the
            # process group (PartialState) is kept, only the precision state is rebuilt.
            AcceleratorState._reset_state()
        self.output_dir = default_output_dir(config)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, cpu=config.cpu or not _has_accelerator(),
            log_with=None if config.report_to is None else config.report_to, project_dir=str(self.output_dir))
        acc = self.accelerator
        self.device = acc.device
        self.schedule = NoiseSchedule()
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.stop_requested = False
        self._text_cache: dict[str, Tensor] = {}
        self._tapped: tuple[Tensor, Tensor] | None = None

        # Everything that can refuse the run does so before minutes of model loading, as one line.
        preflight(config, self.output_dir)
        self.dataset = load_dataset(config)
        self._load_models()
        self._load_conditioning()
        self.order = BatchOrder(len(self.dataset), config.batch_size, config.seed, acc.process_index,
                                acc.num_processes)
        self.optimizers = self._build_optimizers()
        from diffusers.training_utils import EMAModel

        self.ema = None
        if config.ema_decay > 0:
            # diffusers' EMA with its warm-up min(decay, (1 + n) / (10 + n)): early averages are short.
            self.ema = EMAModel(self.generator_params(), decay=config.ema_decay, foreach=True)
        self.consistency_ema = None
        if config.objective == "jdm" and config.consistency_weight > 0:
            # f^- of Eq. 8: an average of the consistency LoRA, so the target is not the online network.
            self.consistency_ema = EMAModel(self.roles.groups["consistency"], decay=config.consistency_ema,
                                            foreach=True)
            self.consistency_timesteps = losses.consistency_timesteps(
                config.consistency_points, self.schedule).to(self.device)
        if acc.is_main_process:
            need = checkpoint_bytes(self)
            if shutil.disk_usage(self.output_dir).free < need:
                raise model_io.no_space_error(self.output_dir, need)
        self.grad_norms: dict[str, list[float]] = {name: [] for name in self.optimizers}
        self.clipped: dict[str, list[int]] = {name: [0, 0] for name in self.optimizers}  # clipped, applied
        log.info("process %d/%d on %s; %d training images", acc.process_index, acc.num_processes, self.device,
                 len(self.dataset))

    # ------------------------------------------------------------------ setup helpers

    def _load_models(self) -> None:
        """Teacher checkpoint -> text encoder, VAE and the roles on its UNet; frozen student; guidance teacher."""
        config = self.config
        teacher_path = resolve_teacher(config)
        pipe = model_io.load_sd1_checkpoint(teacher_path, allow_pickle=config.allow_pickle,
                                            comfyui_root=config.comfyui_root)
        self.teacher_path = teacher_path
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if factor != 8:
            raise ValueError(f"--ckpt {config.ckpt}: its VAE downsamples {factor}x; the exported ControlNet "
                             "(ComfyUI's cldm layout) needs SD1.x's 8x VAE")
        self.tokenizer = pipe.tokenizer
        # Frozen weights are stored in the autocast precision (they are never updated), trained ones in fp32.
        self.weight_dtype = self._autocast_dtype()
        self.text_encoder = pipe.text_encoder.to(self.device, self.weight_dtype).requires_grad_(False).eval()
        self.vae = pipe.vae.to(self.device, self.weight_dtype).requires_grad_(False).eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        frozen_student = None
        if config.objective == "controlnet":
            frozen_student = pipe.unet  # the teacher itself: only the ControlNet learns
        elif config.phase == "extend":
            frozen_student = model_io.load_unet(model_io.resolve_model(config.student, "unet", config.comfyui_root),
                                                allow_pickle=config.allow_pickle)
        # One seed for every randomly initialised weight, identical on every process.
        torch.manual_seed(config.seed)
        self.roles = build_roles(
            pipe.unet, self.schedule, student_lora_rank=config.student_lora_rank, fake_lora_rank=config.fake_lora_rank,
            consistency_lora_rank=config.consistency_lora_rank, frozen_student=frozen_student,
            discriminator=config.divergence != "rkl" or config.gan_weight > 0, vae_scale_factor=self.vae_scale_factor,
            gradient_checkpointing=config.gradient_checkpointing)
        trained = {id(p) for ps in self.roles.groups.values() for p in ps}
        for module in self.roles.modules.values():
            module.to(self.device)
            for p in module.parameters():
                if id(p) not in trained:
                    p.data = p.data.to(self.weight_dtype)
        self.guidance, self.guidance_text_encoder = None, None
        if config.cfg_scale != 1.0:
            if config.cfg_teacher:
                gpipe = model_io.load_sd1_checkpoint(model_io.resolve_model(config.cfg_teacher, "checkpoints",
                                                                            config.comfyui_root),
                                                     allow_pickle=config.allow_pickle)
                self.guidance_text_encoder = gpipe.text_encoder.to(self.device, self.weight_dtype).requires_grad_(False)
                self.guidance = UNetDenoiser(gpipe.unet.to(self.device, self.weight_dtype).requires_grad_(False),
                                             self.schedule)
            else:
                self.guidance = self.roles.teacher

    def _autocast_dtype(self) -> torch.dtype:
        """The dtype accelerate's autocast really computes in here (fp16 on a CPU may fall back to fp32)."""
        with self.accelerator.autocast():
            kind = self.device.type
            if torch.is_autocast_enabled(kind):
                return torch.get_autocast_dtype(kind)
        return torch.float32

    def _load_conditioning(self) -> None:
        """Condition extractor, the decoder of the condition term, the reward."""
        config = self.config
        self.extractor = _extractor(config)
        self.decoder = self.vae
        if config.cond_decoder == "taesd":
            self.decoder = model_io.load_taesd_decoder(model_io.resolve_model(config.taesd, "vae_approx", config.comfyui_root),
                                              self.device, self.weight_dtype)
        self.reward_fn = load_reward(config.reward) if config.reward else None

    def _adamw(self, groups: list[tuple[list, float, float]]):
        """AdamW over `(params, lr, beta1)` groups (empty groups dropped)."""
        cfg = self.config
        params = [{"params": ps, "lr": lr, "betas": (beta1, cfg.adam_beta2)} for ps, lr, beta1 in groups if ps]
        return torch.optim.AdamW(params, weight_decay=cfg.weight_decay)

    def _build_optimizers(self) -> dict:
        cfg, g = self.config, self.roles.groups
        b1 = cfg.adam_beta1
        opts = {"generator": self._adamw([(g.get("student", []), cfg.lr_student, b1),
                                          (g["controlnet"], cfg.lr_controlnet, cfg.adam_beta1_controlnet)])}
        if cfg.objective not in ("dsm", "controlnet"):
            opts["fake"] = self._adamw([(g["fake"], cfg.lr_fake, b1), (g["consistency"], cfg.lr_consistency, b1)])
        if "discriminator" in g:
            opts["discriminator"] = self._adamw([(g["discriminator"], cfg.lr_discriminator, b1)])
        names = list(opts)
        # The rates this run asks for: a resume restores the checkpoint's, then `apply_learning_rates`.
        self.learning_rates = {name: [g["lr"] for g in opt.param_groups] for name, opt in opts.items()}
        prepared = self.accelerator.prepare(*opts.values())
        prepared = prepared if isinstance(prepared, (tuple, list)) else [prepared]
        return dict(zip(names, prepared))

    def rng(self, purpose: str, micro: int = 0) -> torch.Generator:
        """The generator of one random draw: a pure function of (seed, step, micro-batch, process, purpose)."""
        key = (((self.config.seed * 1_000_003 + self.step) * 131 + micro) * 1009 + self.accelerator.process_index) \
            * 61 + _PURPOSES[purpose]
        return torch.Generator(device=self.device).manual_seed(key % (2**63 - 1))

    def randn(self, shape, purpose: str, micro: int = 0) -> Tensor:
        return torch.randn(shape, generator=self.rng(purpose, micro), device=self.device)

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_text(self, captions: list[str], encoder=None) -> Tensor:
        """(B, 77, D) hidden states of the frozen text encoder, cached per caption."""
        encoder = encoder or self.text_encoder
        missing = [c for c in dict.fromkeys(captions) if (id(encoder), c) not in self._text_cache]
        if missing:
            ids = model_io.tokenize(self.tokenizer, missing).to(self.device)
            hidden = encoder(ids)[0]
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            for c, h in zip(missing, hidden):
                self._text_cache[(id(encoder), c)] = h
        return torch.stack([self._text_cache[(id(encoder), c)] for c in captions])

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Data latents (B, 4, h, w) in diffusion scale: the mean of the VAE posterior (deterministic)."""
        latents = self.vae.encode((images * 2 - 1).to(self.weight_dtype)).latent_dist.mode()
        return latents.float() * self.latent_scale

    def decode(self, latents: Tensor) -> Tensor:
        """Differentiable latents -> images BCHW in [0, 1] through the SD VAE or TAESD (`--cond-decoder`)."""
        if self.decoder is self.vae:
            images = self.vae.decode((latents / self.latent_scale).to(self.weight_dtype)).sample
        else:  # TAESD decodes diffusion-scale latents directly
            images = self.decoder.decode(latents.to(self.weight_dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def load_batch(self, micro: int) -> dict:
        """Micro-batch `micro` of the current step, on the device, with conditions extracted from the data."""
        index = self.step * self.config.gradient_accumulation_steps + micro
        items = [self.dataset[i] for i in self.order.indices(index)]
        images = torch.stack([it["image"] for it in items]).to(self.device)
        captions = [it["caption"] for it in items]
        with torch.no_grad():
            control = self.extractor.extract(images)
        batch = {"images": images, "captions": captions, "control": control, "micro": micro}
        hint = control
        if self.config.control_dropout > 0:
            # Dropped samples see a blank hint and get no condition term: the student learns the
            # teacher's distribution for a blank control instead of extrapolating to it.
            kept = torch.rand(len(items), generator=self.rng("control_dropout", micro), device=self.device) \
                >= self.config.control_dropout
            hint = control * kept.reshape(-1, 1, 1, 1).to(control.dtype)
            batch["condition_mask"] = kept
        batch["cond"] = Cond(self.encode_text(captions), hint)
        return batch

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        size = self.config.resolution // self.vae_scale_factor
        return (batch, self.roles.student.unet.config.in_channels, size, size)

    def _discriminator_logits(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """(B,) logits of log p_phi / p_theta at (x_t, t) from the fake score's bottleneck features."""
        tap = self.roles.fake_tap
        if self._tapped is not None and self._tapped[0] is x_t:
            features = self._tapped[1]  # the fidelity term's fake-score pass at this very x_t
        else:
            tap.enabled = True
            try:
                self.roles.fake(x_t, t, cond)
            finally:
                tap.enabled = False
            features = tap.value
        self._tapped = None
        return self.roles.discriminator(features)

    def _fake_with_features(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The fake score, keeping its bottleneck features for `_discriminator_logits` at the same x_t."""
        tap = self.roles.fake_tap
        tap.enabled = True
        try:
            x0 = self.roles.fake(x_t, t, cond)
        finally:
            tap.enabled = False
        self._tapped = (x_t, tap.value)
        return x0

    # ------------------------------------------------------------------ the two updates

    def generator_step(self, batch: dict) -> tuple[Tensor, dict, Tensor]:
        """Loss of one student update on `batch` (JDM Eq. 5/9/10, or a baseline); returns (loss, logs, x)."""
        cfg, roles, micro = self.config, self.roles, batch["micro"]
        cond: Cond = batch["cond"]
        n = batch["images"].shape[0]
        z = self.randn(self.latent_shape(n), "z", micro)
        if cfg.objective == "controlnet":
            eps = self.randn(z.shape, "eps", micro)
            t = losses.sample_timesteps(n, 0, 999, self.device, self.rng("t", micro))
            with self.accelerator.autocast():
                loss, logs = losses.fake_score_loss(roles.student, self.encode_images(batch["images"]), eps, t,
                                                    self.schedule, cond)
            return loss, {"controlnet_loss": logs["fake_score_loss"]}, None
        if cfg.objective == "dsm":
            eps = self.randn(z.shape, "eps", micro)
            x_data = self.encode_images(batch["images"])
            with self.accelerator.autocast():
                loss, logs = losses.dsm_controlnet_loss(roles.student, x_data, eps, self.schedule, cond,
                                                        cfg.generator_timestep)
            return loss, logs, None
        with self.accelerator.autocast():
            x = generate_one_step(roles.student, z, cfg.generator_timestep, cond).float()
        t = losses.sample_timesteps(n, cfg.t_min, cfg.t_max, self.device, self.rng("t", micro))
        eps = self.randn(x.shape, "eps", micro)
        terms = dict(divergence=cfg.divergence, fidelity_weight=cfg.fidelity_weight,
                     condition_weight=cfg.condition_weight, reward_weight=cfg.reward_weight,
                     condition_t_max=cfg.condition_t_max, condition_weighting=cfg.condition_weighting,
                     condition_mask=batch.get("condition_mask"))
        if cfg.objective == "jdm":
            control = batch["control"]
            terms.update(consistency_denoise=roles.consistency, decode=self.decode,
                         log_likelihood=lambda img: self.extractor.log_likelihood(img, control, tau=cfg.condition_tau))
            if self.reward_fn is not None:
                captions = batch["captions"]
                terms["reward"] = lambda img: self.reward_fn(img, captions).reshape(-1).float()
        fake = roles.fake
        if cfg.divergence != "rkl":
            terms["discriminator"] = self._discriminator_logits
            fake = self._fake_with_features
        if self.guidance is not None:
            gcond, gunc = self.guidance_conds(batch)
            terms.update(guidance_denoise=self.guidance, guidance_cond=gcond, guidance_uncond=gunc,
                         cfg_scale=cfg.cfg_scale)
        with self.accelerator.autocast():
            loss, logs = losses.generator_loss(x, t, eps, self.schedule, roles.teacher, fake, cond, **terms)
            if cfg.gan_weight > 0:
                # Non-saturating generator GAN term on the same noised student sample (f-distill).
                logits = self._discriminator_logits(self.schedule.add_noise(x, eps, t), t, cond)
                gan = torch.nn.functional.softplus(-logits).mean()
                loss = loss + cfg.gan_weight * gan
                logs["gan_loss"] = gan.detach()
        return loss, logs, x.detach()

    def guidance_conds(self, batch: dict) -> tuple[Cond, Cond]:
        n = len(batch["captions"])
        encoder = self.guidance_text_encoder
        neg = Cond(self.encode_text([self.config.negative_prompt] * n, encoder))
        if encoder is None:  # the teacher guides itself: the real score's pass on the same Cond is reused
            return batch["cond"], neg
        return Cond(self.encode_text(batch["captions"], encoder)), neg

    def fake_score_step(self, batch: dict, x: Tensor | None = None, repeat: int = 0) -> tuple[Tensor, dict]:
        """Loss of one fake-score (Eq. 6) + consistency-LoRA (Eq. 8) + discriminator update on sg(x).

        The three parts go to disjoint parameters: the consistency loss is back-propagated into
        the consistency LoRA only (`inputs=`), the discriminator sees the fake score's features
        without gradient. Returns the summed loss after `backward` (for logging)."""
        cfg, roles, micro = self.config, self.roles, batch["micro"] + 1000 * repeat
        cond: Cond = batch["cond"]
        n = batch["images"].shape[0]
        if x is None:
            with torch.no_grad(), self.accelerator.autocast():
                x = generate_one_step(roles.student, self.randn(self.latent_shape(n), "fake_z", micro),
                                      cfg.generator_timestep, cond).float()
        x = x.detach()
        scale = 1.0 / cfg.gradient_accumulation_steps
        t = losses.sample_timesteps(n, cfg.t_min, cfg.t_max, self.device, self.rng("fake_t", micro))
        eps = self.randn(x.shape, "fake_eps", micro)
        with self.accelerator.autocast():
            fake_loss, logs = losses.fake_score_loss(roles.fake, x, eps, t, self.schedule, cond)
        self._backward(fake_loss * scale, self.roles.groups["fake"])
        total = fake_loss.detach()
        if self.consistency_ema is not None:
            t_k, t_prev = losses.consistency_pairs(n, self.consistency_timesteps, self.rng("cons_t", micro))
            eps_c = self.randn(x.shape, "cons_eps", micro)
            with self.accelerator.autocast():
                c_loss, c_logs = losses.consistency_loss(roles.consistency, self.consistency_target, x, eps_c, t_k,
                                                         t_prev, self.schedule, cond)
            self._backward(cfg.consistency_weight * c_loss * scale, self.roles.groups["consistency"])
            logs.update(c_logs)
            total = total + c_loss.detach()
        if roles.discriminator is not None:
            t_d = losses.sample_timesteps(n, cfg.t_min, cfg.t_max, self.device, self.rng("disc_t", micro))
            eps_d = self.randn(x.shape, "disc_eps", micro)
            x_data = self.encode_images(batch["images"])
            with self.accelerator.autocast():
                with torch.no_grad():
                    tap = roles.fake_tap
                    tap.enabled = True
                    roles.fake(self.schedule.add_noise(x_data, eps_d, t_d), t_d, cond)
                    real_feat = tap.value
                    roles.fake(self.schedule.add_noise(x, eps_d, t_d), t_d, cond)
                    fake_feat = tap.value
                    tap.enabled = False
                d_loss, d_logs = losses.discriminator_loss(roles.discriminator(real_feat),
                                                           roles.discriminator(fake_feat))
            self._backward(d_loss * scale, self.roles.groups["discriminator"])
            logs.update(d_logs)
            total = total + d_loss.detach()
        return total, logs

    @torch.no_grad()
    def consistency_target(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """f^- of Eq. 8: the consistency model with the EMA of its LoRA swapped in."""
        params = self.roles.groups["consistency"]
        self.consistency_ema.store(params)
        self.consistency_ema.copy_to(params)
        try:
            return self.roles.consistency(x_t, t, cond)
        finally:
            self.consistency_ema.restore(params)

    def _backward(self, loss: Tensor, params: list) -> None:
        self.accelerator.backward(loss, inputs=[p for p in params if p.requires_grad])

    # ------------------------------------------------------------------ optimisation plumbing

    def _all_reduce_grads(self, params: list, bucket: int = 2**25) -> None:
        """Average gradients across processes in flat buckets (no full copy of a UNet's gradients)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        for p in params:
            if p.grad is None:  # every process must take part in every bucket
                p.grad = torch.zeros_like(p)
        start = 0
        while start < len(params):
            end, size = start, 0
            while end < len(params) and (size == 0 or size + params[end].numel() <= bucket):
                size += params[end].numel()
                end += 1
            chunk = params[start:end]
            flat = acc.reduce(torch.cat([p.grad.reshape(-1) for p in chunk]), reduction="mean")
            offset = 0
            for p in chunk:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
            start = end

    def generator_params(self) -> list:
        """The generator's trained parameters (student UNet or its LoRA, and the ControlNet)."""
        return [p for group in self.optimizers["generator"].param_groups for p in group["params"]]

    @contextmanager
    def ema_weights(self):
        """Within the block the generator holds its EMA weights (`--ema-decay`), what previews and exports show."""
        if self.ema is None:
            yield
            return
        params = self.generator_params()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def _finite(self, value: Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=self.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) == 0.0

    def _apply(self, name: str) -> dict[str, float]:
        opt = self.optimizers[name]
        params = [p for group in opt.param_groups for p in group["params"]]
        self._all_reduce_grads(params)
        logs = self._clip(name, params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return logs

    def _clip(self, name: str, params: list) -> dict[str, float]:
        """Clip outliers of one player's gradient norm (`--clip-outliers` times the median of its last 100
        norms, `--max-grad-norm` at most). A fixed threshold far below the typical norm would rescale every
        step, and the weighting across t would then only set ratios inside a step."""
        cfg, history = self.config, self.grad_norms[name]
        limit = float("inf")
        if cfg.clip_outliers > 0 and len(history) >= 10:
            limit = cfg.clip_outliers * statistics.median(history[-100:])
        if cfg.max_grad_norm > 0:
            limit = min(limit, cfg.max_grad_norm)
        norm = float(self.accelerator.clip_grad_norm_(params, limit))
        clipped = norm > limit
        if math.isfinite(norm):
            history.append(norm)
            del history[:-100]
        counts = self.clipped[name]
        counts[0] += int(clipped)
        counts[1] += 1
        return {f"grad_norm_{name}": norm, f"clipped_share_{name}": counts[0] / counts[1]}

    def _zero(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def train_step(self) -> dict:
        """One generator update (accumulated over micro-batches) then `fake_updates_per_step` fake-score updates.

        A non-finite loss skips that update (all its micro-batches, on every process) and is counted."""
        cfg = self.config
        logs: dict = {}
        samples = []
        self._zero()
        gen_total = torch.zeros((), device=self.device)
        batches = [self.load_batch(m) for m in range(cfg.gradient_accumulation_steps)]
        for batch in batches:
            loss, glogs, x = self.generator_step(batch)
            gen_total = gen_total + loss.detach()
            if torch.isfinite(loss):
                self.roles.student.activate()
                self.accelerator.backward(loss / cfg.gradient_accumulation_steps)
            samples.append(x)
            logs.update(glogs)
        if not self._finite(gen_total):
            return self._skip(logs)
        logs.update(self._apply("generator"))
        if self.ema is not None:
            self.ema.step(self.generator_params())
        if "fake" in self.optimizers:
            for repeat in range(cfg.fake_updates_per_step):
                self._zero()
                fake_total = torch.zeros((), device=self.device)
                for batch, x in zip(batches, samples):
                    loss, flogs = self.fake_score_step(batch, x if repeat == 0 else None, repeat)
                    fake_total = fake_total + loss
                    logs.update(flogs)
                if not self._finite(fake_total):
                    return self._skip(logs)
                for name in ("fake", "discriminator"):
                    if name in self.optimizers:
                        logs.update(self._apply(name))
                if self.consistency_ema is not None:
                    self.consistency_ema.step(self.roles.groups["consistency"])
        self.nonfinite_run = 0
        logs["generator_loss"] = gen_total / cfg.gradient_accumulation_steps
        return {k: float(v) for k, v in logs.items()}

    def _skip(self, logs: dict) -> dict:
        self._zero()
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("step %d: non-finite loss, update skipped (%d in a row, %d in total)", self.step + 1,
                    self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.config.max_nonfinite:
            found = _checkpoints(self.output_dir) if self.output_dir.is_dir() else []
            kept = (f"the last good checkpoint is {found[-1][1]} (resume with --resume latest, e.g. with lower "
                    "learning rates)") if found else "no checkpoint was written before the streak"
            raise NonFiniteLossError(f"{self.nonfinite_run} consecutive non-finite losses at step {self.step + 1}; "
                                     f"stopping; {kept}")
        return {"nonfinite_skipped": float(self.nonfinite_total)}

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Run until `max_steps`, a stop signal, or too many non-finite losses. Returns an exit status."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        if acc.is_main_process and self.output_dir.is_dir():
            for stale in self.output_dir.glob(f".{_CKPT_PREFIX}*.tmp"):  # left by a kill -9 mid-save
                shutil.rmtree(stale, ignore_errors=True)
        if acc.is_main_process:
            for removed in clean_export_leftovers(cfg, self.output_dir):
                log.info("removed %s, left by an interrupted export", removed)
        if cfg.resume:
            load_checkpoint(self, find_checkpoint(self.output_dir, cfg.resume))
        if cfg.report_to and acc.is_main_process:
            acc.init_trackers("jdm", config={k: v for k, v in cfg.to_dict().items() if v is not None})
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._request_stop)
            except ValueError:  # not the main thread: no graceful stop, the run still works
                pass
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_main_process, desc="jdm")
        status, owed = 0, False
        try:
            while self.step < cfg.max_steps:
                logs = self.train_step()
                self.step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in
                                 ("generator_loss", "fake_score_loss", "consistency_loss", "disc_loss", "dsm_loss",
                                  "controlnet_loss")})
                if cfg.report_to and self.step % cfg.log_every == 0:
                    acc.log(logs, step=self.step)
                if cfg.preview_every and self.step % cfg.preview_every == 0:
                    with self.ema_weights():
                        write_preview(self)
                stop = self._stop_everywhere()
                # A checkpoint due inside a streak of skipped steps is written at the next finite step.
                owed = owed or self.step % cfg.checkpoint_every == 0
                if (owed and self.nonfinite_run == 0) or stop or self.step == cfg.max_steps:
                    save_checkpoint(self)
                    owed = False
                if stop:
                    log.warning("stopped by signal at step %d; resume with --resume latest", self.step)
                    status = 130
                    break
            if self.step >= cfg.max_steps:
                # Every finished run leaves a picture of what it learnt, not only weights.
                with self.ema_weights():
                    final = None
                    if not (cfg.preview_every and self.step % cfg.preview_every == 0):
                        final = write_preview(self)
                    if final is not None:
                        log.info("preview grid (condition | student one step | teacher multi-step): %s", final)
                    export(self)
        except NonFiniteLossError as exc:
            log.error("%s", exc)
            status = 3
        except model_io.NoSpaceError as exc:
            log.error("%s", exc)
            status = 4
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if cfg.report_to:
                acc.end_training()
        return status

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.stop_requested = True
        log.warning("signal %d: finishing the current step, then checkpointing", signum)

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        return float(self.accelerator.reduce(flag, reduction="sum")) > 0


# ---------------------------------------------------------------------- before the first step

#: What a resumed run must share with its checkpoint: the weights and optimiser state only fit these.
#: Learning rates, run length, cadences and outputs may change (learning rates are applied and logged).
RESUME_FIXED = ("ckpt", "control", "objective", "phase", "student", "divergence", "student_lora_rank",
                "fake_lora_rank", "consistency_lora_rank", "cfg_teacher")


def preflight(config: TrainConfig, output_dir: Path) -> Path | None:
    """The checks that can refuse a run and need no model, in seconds (ValueError / FileNotFoundError,
    one line each): every output folder writable, the control's annotator weights present, and the
    resume target found and trained for the same model, control and objective. Returns that target."""
    from jdm_train.export import export_paths

    for folder in sorted({output_dir, *(p.parent for p in export_paths(config, output_dir).values())}):
        _check_writable(folder)
    extractor = _extractor(config)
    for locate in ("weights_path", "model_path"):  # HED / depth: raise MissingWeightsError naming where to put them
        if hasattr(extractor, locate):
            getattr(extractor, locate)()
    if not config.resume:
        return None
    path = find_checkpoint(output_dir, config.resume)
    saved = json.loads((path / "trainer_state.json").read_text()).get("config", {})
    differs = [k for k in RESUME_FIXED if k in saved and _resume_value(k, saved[k]) != _resume_value(k, getattr(config, k))]
    if differs:
        then = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r}" for k in differs)
        now = ", ".join(f"{getattr(config, k)!r}" for k in differs)
        raise ValueError(f"--resume {path}: that checkpoint was trained with {then}; this run asks for {now}. "
                         "Resume with the same values, or start a new run with another --output")
    return path


def _resume_value(key: str, value):
    # A checkpoint given as a name or as a path to the same file is the same model.
    return Path(value).name if key in ("ckpt", "student", "cfg_teacher") and value else value


def _check_writable(folder: Path) -> None:
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jdm-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"output folder {folder} is not writable ({exc.strerror or exc}); "
                         "choose another with --output-dir / --comfyui-root") from None


def _extractor(config: TrainConfig):
    from jdm_train.extractors import extractor_params, get_extractor

    # HED/depth annotator weights are searched in the same ComfyUI root as the models.
    takes_root = any(p.name == "comfyui_root" for p in extractor_params(config.control))
    return get_extractor(config.control, **({"comfyui_root": config.comfyui_root}
                                            if takes_root and config.comfyui_root else {}))


def checkpoint_bytes(trainer: "Trainer") -> int:
    """About what one checkpoint and one export set take on disk: trained weights, two Adam moments
    and the EMAs in float32, plus the exported student and ControlNet."""
    trained = sum(p.numel() for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"])
    averaged = sum(p.numel() for ema, _ in _emas(trainer).values() for p in ema.shadow_params)
    exported = sum(p.numel() for p in trainer.roles.student.unet.parameters()) + \
        sum(p.numel() for p in trainer.roles.controlnet.parameters())
    return 4 * (3 * trained + averaged + exported)


# ---------------------------------------------------------------------- checkpoints

_CKPT_PREFIX = "checkpoint-"


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in output_dir.glob(f"{_CKPT_PREFIX}*"):
        suffix = p.name[len(_CKPT_PREFIX):]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(suffix), p))
    return sorted(found)


def find_checkpoint(output_dir: Path, spec: str) -> Path:
    """`latest` (the newest complete `checkpoint-N/` in `output_dir`) or an explicit folder."""
    if spec == "latest":
        found = _checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume latest: no checkpoint-N folder in {output_dir}")
        return found[-1][1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"--resume: {spec!r} is not a checkpoint folder (no trainer_state.json); "
                         "expected 'latest' or a checkpoint-N folder")
    return path


def replica_digests(trainer: Trainer) -> list[str]:
    """sha256 of every trained tensor, one per process: replicas that drifted apart are an error."""
    import hashlib

    from accelerate.utils import gather_object

    h = hashlib.sha256()
    for key, value in sorted(trainer.roles.trainable_state().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    digests = gather_object([h.hexdigest()]) if trainer.accelerator.num_processes > 1 else [h.hexdigest()]
    if len(set(digests)) > 1:
        raise RuntimeError(f"step {trainer.step}: the {len(digests)} replicas hold different weights ({digests})")
    return digests


def save_checkpoint(trainer: Trainer) -> Path:
    """`checkpoint-N/`: trained weights (safetensors), optimizers + RNG (accelerate), step and config.

    Written into a hidden temporary folder and renamed, so a kill at any moment leaves either
    the previous set of checkpoints or the new one, never a truncated folder."""
    acc = trainer.accelerator
    final = trainer.output_dir / f"{_CKPT_PREFIX}{trainer.step}"
    tmp = trainer.output_dir / f".{_CKPT_PREFIX}{trainer.step}.tmp"
    if acc.is_main_process:
        trainer.output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    digests = replica_digests(trainer)
    try:
        _write_checkpoint(trainer, tmp, final, digests)
    except Exception as exc:
        # torch's zip writer reports a full disk as "unexpected pos": look at the disk before cleaning up.
        full = model_io.is_disk_full(exc) or shutil.disk_usage(trainer.output_dir).free < 2**26
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint would keep the disk full
        if full:
            raise model_io.no_space_error(trainer.output_dir, checkpoint_bytes(trainer)) from None
        raise
    acc.wait_for_everyone()
    return final


def _write_checkpoint(trainer: Trainer, tmp: Path, final: Path, digests: list[str]) -> None:
    acc = trainer.accelerator
    acc.save_state(str(tmp))
    if acc.is_main_process:
        model_io.save_state_dict(tmp / "trainable.safetensors", trainer.roles.trainable_state(),
                                 {"jdm.kind": "trainer_checkpoint", "jdm.config": trainer.config.to_json()})
        for file, (ema, _) in _emas(trainer).items():
            # In the optimizer's parameter order; the step sets where the warm-up is.
            model_io.save_state_dict(tmp / file, {f"{i:05d}": p for i, p in enumerate(ema.shadow_params)},
                                     {"jdm.kind": "trainer_ema", "jdm.ema_step": str(ema.optimization_step)})
        state = {"step": trainer.step, "nonfinite_total": trainer.nonfinite_total, "config": trainer.config.to_dict(),
                 "num_processes": acc.num_processes, "replica_digests": digests,
                 "grad_norms": trainer.grad_norms, "clipped": trainer.clipped}
        _atomic_write_bytes(tmp / "trainer_state.json", json.dumps(state, indent=1, sort_keys=True).encode())
        # Re-saving a step (a resume from an older checkpoint): the old folder is moved aside, not
        # deleted, until the new one is in place.
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        limit = trainer.config.checkpoints_total_limit
        if limit:
            for _, old in _checkpoints(trainer.output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(trainer: Trainer, path: Path) -> None:
    """Restore weights, optimizers and the step from `path` (see `save_checkpoint`)."""
    state = json.loads((path / "trainer_state.json").read_text())
    weights, _ = model_io.read_state_dict(path / "trainable.safetensors")
    trainer.roles.load_trainable_state({k: v.to(trainer.device) for k, v in weights.items()})
    with _messages("accelerate.checkpointing") as notes:
        trainer.accelerator.load_state(str(path))
    if any("Could not load random states" in m for m in notes):  # accelerate says so at INFO only
        log.warning("%s: random_states_%d.pkl could not be read; training goes on, but not bit-for-bit as an "
                    "uninterrupted run would", path, trainer.accelerator.process_index)
    for file, (ema, params) in _emas(trainer).items():
        _load_ema(ema, params(), path / file)
    apply_learning_rates(trainer)
    trainer.grad_norms.update(state.get("grad_norms", {}))
    trainer.clipped.update(state.get("clipped", {}))
    trainer.step = int(state["step"])
    trainer.nonfinite_total = int(state.get("nonfinite_total", 0))
    log.info("resumed from %s at step %d", path, trainer.step)


@contextmanager
def _messages(logger_name: str):
    """The messages a library logs (INFO and up) inside the block, as a list."""
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def apply_learning_rates(trainer: Trainer) -> None:
    """After a resume the optimisers hold the checkpoint's learning rates: set this run's, and say so."""
    for name, opt in trainer.optimizers.items():
        for group, lr in zip(opt.param_groups, trainer.learning_rates[name]):
            if group["lr"] != lr:
                log.warning("resume: %s learning rate %g (the checkpoint's) -> %g (this run's)", name, group["lr"], lr)
                group["lr"] = lr


def _emas(trainer: Trainer) -> dict:
    """Checkpoint file -> EMAModel: the generator's average and the consistency target f^-."""
    found = {"ema.safetensors": (trainer.ema, trainer.generator_params),
             "consistency_ema.safetensors": (trainer.consistency_ema, lambda: trainer.roles.groups["consistency"])}
    return {file: (ema, params) for file, (ema, params) in found.items() if ema is not None}


def _load_ema(ema, params: list, path: Path) -> None:
    if not path.is_file():
        log.warning("%s has no %s; that average starts from the resumed weights", path.parent, path.name)
        ema.shadow_params = [p.detach().clone() for p in params]
        return
    shadows, meta = model_io.read_state_dict(path)
    if len(shadows) != len(ema.shadow_params):
        raise ValueError(f"{path}: {len(shadows)} EMA tensors, the model has {len(ema.shadow_params)}")
    for i, s in enumerate(ema.shadow_params):
        s.copy_(shadows[f"{i:05d}"])
    ema.optimization_step = int(meta["jdm.ema_step"])


# ---------------------------------------------------------------------- previews


@torch.no_grad()
def write_preview(trainer: Trainer, count: int = 4) -> Path | None:
    """`preview-N.png`: one row per fixed sample, condition | student one-step | teacher multi-step."""
    if not trainer.accelerator.is_main_process:
        return None
    cfg = trainer.config
    items = [trainer.dataset[i] for i in range(min(count, len(trainer.dataset)))]
    images = torch.stack([it["image"] for it in items]).to(trainer.device)
    captions = [it["caption"] for it in items]
    control = trainer.extractor.extract(images)
    cond = Cond(trainer.encode_text(captions), control)
    uncond = Cond(trainer.encode_text([cfg.negative_prompt] * len(items)))
    gen = torch.Generator(device=trainer.device).manual_seed(cfg.seed + 1)
    noise = torch.randn(trainer.latent_shape(len(items)), generator=gen, device=trainer.device)
    with trainer.accelerator.autocast():
        student = generate_one_step(trainer.roles.student, noise, cfg.generator_timestep, cond).float()
        teacher = ddim_reference(trainer.roles.teacher, noise, cond, uncond, cfg.preview_teacher_steps,
                                 max(cfg.cfg_scale, 1.0), trainer.schedule).float()
    return write_preview_grid(trainer.output_dir / f"preview-{trainer.step:06d}.png",
                              [control, trainer.decode(student), trainer.decode(teacher)])


# ---------------------------------------------------------------------- exports


def export(trainer: Trainer) -> dict[str, Path]:
    """The run's ComfyUI exports (`export.write_exports`), written by the main process only."""
    acc = trainer.accelerator
    written: dict[str, Path] = {}
    if acc.is_main_process:
        written = write_exports(trainer.config, trainer.roles, trainer.teacher_path.name, trainer.output_dir)
        for kind, path in written.items():
            log.info("exported %s: %s", kind, path)
    acc.wait_for_everyone()
    return written


def run(config: TrainConfig) -> int:
    """Train from a validated config; the `jdm-train` entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError, model_io.NoSpaceError) as exc:  # user errors: files, data, annotators, disk
        log.error("%s", exc)
        return 2
    return trainer.train()
