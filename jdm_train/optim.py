"""Optimisers of the players, their learning rates (warm-up included), gradient averaging across
processes and outlier clipping: what the loop does between a backward and the next forward."""

from __future__ import annotations

import logging
import math
import statistics

import torch

from jdm_train.config import TrainConfig

log = logging.getLogger("jdm_train")


def build_optimizers(config: TrainConfig, groups: dict[str, list]) -> dict[str, torch.optim.Optimizer]:
    """AdamW per player: the generator (student + ControlNet), the fake score with the consistency
    LoRA (updated together on the same sample), the discriminator."""

    def adamw(parts: list[tuple[list, float, float]]):
        params = [{"params": ps, "lr": lr, "betas": (beta1, config.adam_beta2)} for ps, lr, beta1 in parts if ps]
        return torch.optim.AdamW(params, weight_decay=config.weight_decay, fused=_fusable(parts))

    b1 = config.adam_beta1
    opts = {"generator": adamw([(groups.get("student", []), config.lr_student, b1),
                                (groups["controlnet"], config.lr_controlnet, config.adam_beta1_controlnet)])}
    if config.objective not in ("dsm", "controlnet"):
        opts["fake"] = adamw([(groups["fake"], config.lr_fake, b1), (groups["consistency"], config.lr_consistency, b1)])
    if "discriminator" in groups:
        opts["discriminator"] = adamw([(groups["discriminator"], config.lr_discriminator, b1)])
    return opts


def _fusable(parts: list[tuple[list, float, float]]) -> bool:
    """torch's fused AdamW (one kernel for all tensors; 4x faster than the per-tensor loop for the demo
    ControlNet's 210 tensors on one CPU thread) takes float32 tensors on the CPU or CUDA."""
    params = [p for ps, _, _ in parts for p in ps]
    return bool(params) and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)


def generator_params(groups: dict[str, list]) -> list:
    """The generator's trained parameters in its optimiser's order (student UNet or its LoRA, then
    the ControlNet): the order of its EMA in checkpoints."""
    return list(groups.get("student", [])) + list(groups["controlnet"])


def base_rates(optimizers: dict) -> dict[str, list[float]]:
    """The learning rates a run asks for, per optimiser and group (before warm-up)."""
    return {name: [g["lr"] for g in opt.param_groups] for name, opt in optimizers.items()}


def set_learning_rates(optimizers: dict, rates: dict[str, list[float]], step: int, warmup_steps: int) -> None:
    """This run's rates at `step`, ramped linearly over the first `warmup_steps` updates. Set before
    every update, so a resumed run uses its own rates (a changed rate is logged once) and the
    ramp needs no scheduler state in the checkpoint."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    for name, opt in optimizers.items():
        for group, lr in zip(opt.param_groups, rates[name]):
            group["lr"] = lr * factor


def report_resumed_rates(optimizers: dict, rates: dict[str, list[float]]) -> None:
    """After a resume the optimisers hold the checkpoint's rates: say which this run changes."""
    for name, opt in optimizers.items():
        for group, lr in zip(opt.param_groups, rates[name]):
            if group["lr"] != lr:
                log.warning("resume: %s learning rate %g (the checkpoint's) -> %g (this run's)", name, group["lr"], lr)


def all_reduce_grads(accelerator, params: list, bucket: int = 2**25) -> None:
    """Average gradients across processes in flat buckets (no full copy of a UNet's gradients).

    By hand, not DDP: one frozen base carries several players' adapters, which DDP's
    one-module-one-backward model does not fit."""
    if accelerator.num_processes == 1:
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
        flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in chunk]), reduction="mean")
        offset = 0
        for p in chunk:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        start = end


def clip_limit(config: TrainConfig, history: list[float]) -> float:
    """`--clip-outliers` times the median of the player's last 100 norms, `--max-grad-norm` at most.
    A fixed threshold far below the typical norm would rescale every step, and the weighting
    across t would then only set ratios inside a step."""
    limit = math.inf
    if config.clip_outliers > 0 and len(history) >= 10:
        limit = config.clip_outliers * statistics.median(history[-100:])
    if config.max_grad_norm > 0:
        limit = min(limit, config.max_grad_norm)
    return limit


def record_norm(history: list[float], counts: list[int], norm: float, limit: float) -> dict[str, float]:
    """Keep `norm` in the clipper's history (finite ones, the last 100) and count clipped updates."""
    if math.isfinite(norm):
        history.append(norm)
        del history[:-100]
    counts[0] += int(norm > limit)
    counts[1] += 1
    return {"grad_norm": norm, "clipped_share": counts[0] / counts[1]}
