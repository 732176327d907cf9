"""Train the demo world's small SD1.x teacher: `python -m jdm_train.demo.train_teacher`.

The teacher is the SD1.x architecture at small width, trained from scratch on
`jdm_train.demo.data` in two stages, as latent diffusion is:

1. VAE (`AutoencoderKL`, 4 levels as SD's: 64x64x3 pixels <-> 8x8x4 latents, the same
   48x compression and factor 8 as SD1.x, so ControlNet hint encoders and latent sizes work
   unchanged) on random 32x32 crops (the VAE is convolutional; crops make a step cheaper).
   The loss is L1 + L2 with the shapes' pixels weighted `1 + --vae-fg-weight` times the
   background's, plus SD's small KL: with a plain pixel loss the background (80-95% of the
   pixels) dominates, and the decoder draws shapes as blobs of the wrong colour (the first demo
   teacher's VAE kept the right colours in 21% of held-out images and the right kinds in 9%).
   Its latent scale is then folded into `quant_conv`/`post_quant_conv` so that SD's own
   `scaling_factor` (`ldm_convert.SD1_LATENT_SCALE`) gives unit-variance latents, as every SD1.x consumer assumes.
2. UNet (`UNet2DConditionModel`, eps-prediction on the SD1.5 DDPM schedule, cross-attention
   at the 8x8 and 4x4 latent levels, where shapes are 1-3 cells wide and colour is bound to
   shape) jointly with a small `CLIPTextModel` over the real CLIP tokenizer (vocab 49408), on
   cached latents, with 10% caption dropout so that classifier-free guidance works.

Stages cache their results in `--work`, so an interrupted run resumes. The result is written
in the single-file SD1.x (LDM) layout by `jdm_train.model_io.save_sd1_checkpoint`, in fp16,
together with a sample grid of held-out captions and its quality (`quality.json`: how often
the data, the VAE's reconstructions and the teacher's samples show what their captions say,
read by `jdm_train.demo.judge`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from jdm_train import model_io
from jdm_train.demo import data
from jdm_train.files import atomic_write, save_image_grid
from jdm_train.ldm_convert import SD1_LATENT_SCALE
from jdm_train.schedule import NoiseSchedule

MAX_TOKENS = 77
LATENT_SIZE = 8  # 64 px / 8: the VAE has 4 levels (see the module docstring)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    # GroupNorm(32) is fixed by the SD1.x layout (model I/O infers no group count) and normalises
    # every group of channels over the whole image, which erases absolute colour in flat regions
    # unless a group holds several channels: 64 at 64x64 and 32x32 (2 per group; the full-resolution
    # level costs most of a step), 128 at 16x16 and 8x8, where shapes are decided.
    block_out_channels=(64, 64, 128, 128),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=SD1_LATENT_SCALE,
)
# Widths are multiples of 32 because SD1.x consumers (ComfyUI's LDM modules) hard-code GroupNorm(32).
# Three levels (8x8, 4x4, 2x2 latents): a fourth at 1x1 adds modules (per-call overhead on CPU)
# and sees nothing. Cross-attention at 8x8 and 4x4, where a caption's colour meets its shape.
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 96, 128),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,  # SD1's 8 heads: what model I/O and ComfyUI assume
    norm_num_groups=32,
)
# The 49408-row token embedding dominates the size: hidden 64 keeps it at 6.3 MB in fp16.
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=1,
    max_position_embeddings=MAX_TOKENS,
    # One 64-wide head: what model I/O infers for a 64-wide encoder (clip_heads_for), as CLIP-L's 64-dim heads.
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def build_models() -> tuple:
    """Freshly initialised (unet, vae, text_encoder) of the demo teacher's architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return UNet2DConditionModel(**UNET_CONFIG), AutoencoderKL(**VAE_CONFIG), CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def clip_tokenizer():
    """The real CLIP BPE tokenizer (vocab 49408), built offline by model I/O."""
    return model_io.load_tokenizer()


# ----------------------------------------------------------------------------- data


def cached_images(work: Path, n: int) -> Tensor:
    """Training images 0..n-1 as uint8 (n, 3, 64, 64), rendered once into `work`."""
    path = work / f"images_{n}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    imgs = torch.stack([torch.from_numpy(data.render(data.scene(data.TRAIN_START + i))).permute(2, 0, 1) for i in range(n)])
    _save_atomic(imgs, path)
    return imgs


def _lr(step: int, steps: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) + base * 0.02


def _cycle_lr(step: int, cycles: list[int], base: float) -> float:
    """`_lr` restarted at the start of every cycle (SGDR's warm restarts): a longer run can continue
    a finished one exactly, since the first cycle's steps are the finished run's."""
    for length in cycles:
        if step < length:
            return _lr(step, length, base)
        step -= length
    return base * 0.02


# ----------------------------------------------------------------------------- stage 1: VAE


def background_colours(n: int) -> Tensor:
    """Background colour of training images 0..n-1, (n, 3) in [-1, 1] (read off their scenes)."""
    rgb = [data.BACKGROUNDS[data.scene(data.TRAIN_START + i).background] for i in range(n)]
    return torch.tensor(rgb, dtype=torch.float32) / 255 * 2 - 1


def reconstruction_loss(rec: Tensor, x: Tensor, background: Tensor, fg_weight: float, grad_weight: float) -> Tensor:
    """Pixel L1 + L2 with shape pixels (those off the image's `background` (B, 3)) weighted `1 + fg_weight`,
    plus `grad_weight` times the L1 between horizontal and vertical image differences (edges).

    Images (B, 3, H, W) in [-1, 1]. The weights are normalised per batch, so the loss of a batch of
    plain backgrounds is the plain pixel loss.
    """
    d = rec - x
    fg = ((x - background[:, :, None, None]).abs().amax(1, keepdim=True) > 0.1).float()
    w = 1 + fg_weight * fg
    loss = (w * (d.abs() + d.pow(2))).mean() / w.mean()
    if grad_weight:
        loss = loss + grad_weight * ((d[..., 1:, :] - d[..., :-1, :]).abs().mean() + (d[..., 1:] - d[..., :-1]).abs().mean())
    return loss


def train_vae(vae, images: Tensor, backgrounds: Tensor, steps: int, batch: int, lr: float, seed: int, log,
              crop: int = 32, fg_weight: float = 4.0, grad_weight: float = 0.0, state: dict | None = None,
              checkpoint=None, every: int = 250) -> None:
    """`reconstruction_loss` + KL (SD's weight 1e-6) on random `crop` x `crop` crops of uint8 `images`
    (N, 3, H, W) whose background colours are `backgrounds` (N, 3) in [-1, 1].

    `state` (from `checkpoint`, called every `every` steps) resumes an interrupted run exactly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Start with a small posterior std (log-variance -6): with diffusers' init (std ~1) the
        # decoder first sees mostly sampling noise, which wastes a short CPU budget.
        vae.quant_conv.bias[vae.config.latent_channels :] -= 6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if state is not None:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
        log(f"vae resumed at step {start}")
    vae.train()
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        oy, ox = (int(v) for v in torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=gen))
        x = images[idx, :, oy : oy + crop, ox : ox + crop].float().div(255) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        kl = post.kl().mean()
        # SD's weighting: 1e-6 * KL summed over latents vs. reconstruction summed over pixels.
        loss = reconstruction_loss(rec, x, backgrounds[idx], fg_weight, grad_weight) + 1e-6 * kl / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            l1 = (rec - x).abs().mean().item()
            log(f"vae step {step}/{steps} loss {loss.item():.4f} l1 {l1:.4f} kl {kl.item():.1f} ({time.time() - t0:.0f}s)")
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint({"vae": vae.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step + 1})
    vae.eval()


@torch.no_grad()
def fold_latent_scale(vae, images: Tensor, target_std: float = 1.0 / SD1_LATENT_SCALE) -> float:
    """Rescale the latent space so that raw latents have std `target_std` (exact reparametrisation).

    quant_conv's mean rows are multiplied by k (log-variance rows shifted by 2 log k) and
    post_quant_conv's inputs divided by k: the decoder of the new latent k*z equals the old
    decoder of z. Returns k.
    """
    x = images[:512].float().div(255) * 2 - 1
    std = vae.encode(x).latent_dist.mean.std().item()
    k = target_std / std
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


@torch.no_grad()
def encode_all(vae, images: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image, already multiplied by the scaling factor."""
    means, stds = [], []
    for i in range(0, images.shape[0], chunk):
        post = vae.encode(images[i : i + chunk].float().div(255) * 2 - 1).latent_dist
        means.append(post.mean * SD1_LATENT_SCALE)
        stds.append(post.std * SD1_LATENT_SCALE)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- stage 2: UNet + text encoder


def _ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def train_unet(unet, text_encoder, ids: Tensor, empty_ids: Tensor, lat_mean: Tensor, lat_std: Tensor,
               cycles: list[int], batch: int, lr: float, seed: int, log, p_uncond: float = 0.1, state: dict | None = None,
               checkpoint=None):
    """Denoising score matching `|| eps_theta(x_t, t, text) - eps ||^2` (SD's objective), t ~ U{0..999},
    for `sum(cycles)` steps of cosine learning-rate cycles.

    Returns EMA copies (decay 0.999) of the UNet and text encoder, which sample better than
    the raw weights after a short run.
    """
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    start = 0
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
    unet.train()
    text_encoder.train()
    t0 = time.time()
    steps = sum(cycles)
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = _cycle_lr(step, cycles, lr)
        idx = torch.randint(0, ids.shape[0], (batch,), generator=gen)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < p_uncond
        tok[drop] = empty_ids
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        emb = text_encoder(tok).last_hidden_state
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=emb).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if checkpoint is not None and (step + 1) % 250 == 0:
            checkpoint({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                         "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step + 1})
    return ema_unet.eval(), ema_text.eval()


# ----------------------------------------------------------------------------- sampling


def sample_images(unet, vae, text_encoder, tokenizer, captions: list[str], steps: int = 25, cfg: float = 4.0,
                  seed: int = 0) -> Tensor:
    """Teacher samples for `captions`: images (B, 3, 64, 64) in [0, 1], `steps` DDIM steps with CFG."""
    from jdm_train.evaluate import Samplers

    samplers = Samplers(SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer))
    return samplers.teacher(steps, cfg)(captions, None, samplers.noise(len(captions), data.IMAGE_SIZE, seed))


def _save_atomic(obj, path: Path) -> None:
    # The script's own resumable caches (tensors and state dicts only, read back with weights_only);
    # a crash mid-write must not leave a truncated cache that the next run trusts.
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jdm_train.demo.train_teacher", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "demo_teacher.safetensors",
                   help="where to write the single-file SD1.x checkpoint (fp16)")
    p.add_argument("--work", type=Path, default=Path("jdm_teacher_work"), help="cache directory for stages and logs")
    p.add_argument("--n-train", type=int, default=20000, help="number of distinct training images")
    p.add_argument("--vae-steps", type=int, default=12000,
                   help="VAE optimisation steps (4000 gave reconstructions whose shapes the judge names 37%% of the time, "
                        "12000: 82%%)")
    p.add_argument("--vae-batch", type=int, default=8, help="VAE batch size (32x32 crops)")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="VAE peak learning rate")
    p.add_argument("--vae-fg-weight", type=float, default=4.0,
                   help="extra weight of shape pixels over background pixels in the VAE's pixel loss")
    p.add_argument("--vae-grad-weight", type=float, default=0.0,
                   help="weight of an L1 on image gradients (edges) in the VAE's loss (at 2 it slowed learning colours)")
    p.add_argument("--unet-steps", type=int, nargs="+", default=[5000, 10000],
                   help="UNet + text-encoder optimisation steps, as one or more cosine cycles with warm restarts "
                        "(5000 steps drew the captions' shape colours 58%% of the time and kinds 48%%)")
    p.add_argument("--unet-batch", type=int, default=32, help="UNet batch size")
    p.add_argument("--unet-lr", type=float, default=1e-3, help="UNet + text-encoder peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    # One thread: on a shared, oversubscribed CPU two OpenMP threads spin-wait on each other and
    # did ~5x less work per CPU-second than one (measured while 6 developers shared 2 cores).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--grid-n", type=int, default=32, help="held-out captions in the sample grid")
    p.add_argument("--grid-steps", type=int, default=25, help="DDIM steps of the sample grid")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale of the sample grid (saved as jdm.cfg)")
    p.add_argument("--eval-n", type=int, default=128,
                   help="held-out captions scored by jdm_train.demo.judge at the end (quality.json); 0 skips it")
    p.add_argument("--eval-cfgs", type=float, nargs="+", default=[2.0, 4.0, 6.0], help="guidance scales scored at the end")
    return p.parse_args(argv)


def _logger(path: Path):
    """`log(msg)`: a timestamped line on stdout and appended to `path`."""
    logf = open(path, "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    return log


def _vae_stage(args: argparse.Namespace, vae, images: Tensor, log) -> None:
    """Stage 1: train the VAE and fold its latent scale (or load the cached result), then freeze it."""
    work = args.work
    vae_path, vae_state_path = work / "vae.pt", work / "vae_state.pt"
    if vae_path.exists():
        vae.load_state_dict(torch.load(vae_path, weights_only=True))
        vae.eval()
    else:
        state = torch.load(vae_state_path, weights_only=True) if vae_state_path.exists() else None
        train_vae(vae, images, background_colours(args.n_train), args.vae_steps, args.vae_batch, args.vae_lr, args.seed,
                  log, fg_weight=args.vae_fg_weight, grad_weight=args.vae_grad_weight, state=state,
                  checkpoint=lambda s: _save_atomic(s, vae_state_path))
        k = fold_latent_scale(vae, images)
        log(f"latent scale folded: k={k:.4f}")
        _save_atomic(vae.state_dict(), vae_path)
    vae.requires_grad_(False)
    if args.eval_n > 0:
        from jdm_train.demo import judge

        held_images, held_captions = data.batch(range(data.HELDOUT_START, data.HELDOUT_START + args.eval_n))
        rec = judge.vae_reconstructions(vae, held_images)
        log(f"vae reconstruction L1 on {args.eval_n} held-out images: {(rec - held_images).abs().mean().item():.4f} "
            f"(in [0,1] units); caption scores {judge.caption_scores(rec, held_captions)}")


def _unet_stage(args: argparse.Namespace, unet, vae, text_encoder, tokenizer, images: Tensor, log):
    """Stage 2: encode (or load) the latents, then train UNet and text encoder on them; returns their EMAs."""
    work = args.work
    lat_path = work / "latents.pt"
    if lat_path.exists():
        lat_mean, lat_std = torch.load(lat_path, weights_only=True)
    else:
        lat_mean, lat_std = encode_all(vae, images)
        _save_atomic((lat_mean, lat_std), lat_path)
    log(f"latents {tuple(lat_mean.shape)} std {lat_mean.std().item():.3f} mean {lat_mean.mean().item():.3f}")

    captions = [data.caption(data.TRAIN_START + i) for i in range(args.n_train)]
    ids = model_io.tokenize(tokenizer, captions)
    empty_ids = model_io.tokenize(tokenizer, [""])[0]
    state_path = work / "unet_state.pt"
    state = torch.load(state_path, weights_only=True) if state_path.exists() else None
    return train_unet(unet, text_encoder, ids, empty_ids, lat_mean, lat_std, args.unet_steps, args.unet_batch,
                      args.unet_lr, args.seed, log, state=state, checkpoint=lambda s: _save_atomic(s, state_path))


def _write_teacher(args: argparse.Namespace, argv, unet, vae, text_encoder, tokenizer, train_seconds: float, log) -> None:
    """The held-out sample grid, the fp16 single-file checkpoint and (with --eval-n) its quality."""
    work = args.work
    held = [data.caption(data.HELDOUT_START + i) for i in range(args.grid_n)]
    grid = sample_images(unet, vae, text_encoder, tokenizer, held, steps=args.grid_steps, cfg=args.cfg)
    save_image_grid(work / "samples_heldout_captions.png", grid, ncol=8, gap=2, scale=2)
    (work / "samples_heldout_captions.txt").write_text("\n".join(held) + "\n")

    metadata = {
        "jdm.kind": "teacher",
        "jdm.base": "demo",
        "jdm.config": json.dumps({"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": TEXT_CONFIG}),
        "jdm.train_command": "python -m jdm_train.demo.train_teacher "
                             + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "jdm.train_seconds": f"{train_seconds:.0f}",
        "jdm.cfg": f"{args.cfg:g}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_io.save_sd1_checkpoint(args.out, unet.half(), vae.half(), text_encoder.half(), metadata)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    if args.eval_n > 0:
        evaluate_teacher(args.out, work / "quality.json", args.eval_n, args.grid_steps, args.eval_cfgs, log)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log = _logger(args.work / "log.txt")

    t_start = time.time()
    log(f"args {vars(args)}")
    tokenizer = clip_tokenizer()
    unet, vae, text_encoder = build_models()
    log(f"parameters: unet {_count(unet)}, vae {_count(vae)}, text encoder {_count(text_encoder)}")
    images = cached_images(args.work, args.n_train)
    log(f"{images.shape[0]} images ready ({time.time() - t_start:.0f}s)")

    _vae_stage(args, vae, images, log)
    ema_unet, ema_text = _unet_stage(args, unet, vae, text_encoder, tokenizer, images, log)
    train_seconds = time.time() - t_start
    log(f"training done in {train_seconds:.0f}s")
    _write_teacher(args, argv, ema_unet, vae, ema_text, tokenizer, train_seconds, log)
    return 0


def _count(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def evaluate_teacher(path: Path, out: Path, n: int, steps: int, cfgs: list[float], log) -> dict:
    """Caption scores (`jdm_train.demo.judge`) of the written fp16 teacher on `n` held-out captions:
    data, VAE reconstructions, and samples at each guidance scale in `cfgs`; written to `out` as JSON."""
    from jdm_train.demo import judge

    pipe = model_io.load_sd1_checkpoint(path)
    scores = judge.teacher_quality(pipe, n, steps, tuple(cfgs))
    for name, sc in scores.items():
        log(f"quality {name}: " + " ".join(f"{k} {v:.3f}" for k, v in sc.items()))
    out.write_text(json.dumps({"teacher": str(path), "n": n, "steps": steps, "scores": scores}, indent=2) + "\n")
    return scores


if __name__ == "__main__":
    raise SystemExit(main())
