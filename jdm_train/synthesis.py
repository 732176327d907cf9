"""A training set the teacher draws from a list of captions (`--data prompts.txt`).

JDM needs images only to extract conditions from (the condition term compares the student's
sample with c = extract(image)); the teacher's own multi-step samples are images of the very
distribution the student matches, so a user with SD1.5 and a prompt list can train a control
without a dataset. The images go into a captioned folder (`data.CaptionedImageFolder` layout):
one PNG and one caption file per prompt line, each written atomically and skipped when already
there, so an interrupted synthesis resumes where it stopped. Item i's noise is a function of
(seed, i) alone: the same image whatever the batch, the process count or the interruptions."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from jdm_train.denoisers import Cond
from jdm_train.files import atomic_write, save_image_grid
from jdm_train.randomness import keyed_generator
from jdm_train.sampling import ddim_reference


def is_prompt_list(data: str | None) -> bool:
    return bool(data) and data.lower().endswith(".txt") and Path(data).is_file()


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a prompt list; none is a ValueError naming the file."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--data {path}: not a readable UTF-8 prompt list ({exc})") from None
    if not prompts:
        raise ValueError(f"--data {path}: no prompts (expected one caption per line)")
    return prompts


def missing(prompts: list[str], folder: Path) -> list[int]:
    """Items whose image is absent or whose caption file says something else (an edited list)."""
    out = []
    for i, prompt in enumerate(prompts):
        image, caption = folder / f"{i:06d}.png", folder / f"{i:06d}.txt"
        if not (image.is_file() and caption.is_file() and caption.read_text(encoding="utf-8") == prompt):
            out.append(i)
    return out


def item_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    return torch.randn(shape, generator=keyed_generator(("synthesis", seed, index)))


@torch.no_grad()
def synthesise(prompts: list[str], folder: Path, models, schedule, *, resolution: int, steps: int, cfg: float,
               negative: str = "", seed: int = 0, batch: int = 8, share: tuple[int, int] = (0, 1),
               autocast: Callable = contextlib.nullcontext, show: bool = True) -> list[int]:
    """Draw the missing items of `prompts` into `folder` with the teacher (DDIM `steps`, CFG `cfg`);
    this process draws every `share[1]`-th item from `share[0]`. Returns the indices it drew."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    todo = missing(prompts, folder)[share[0]::share[1]]
    codec = models.codec
    for start in tqdm(range(0, len(todo), batch), desc="teacher draws the training set", disable=not show or not todo):
        chunk = todo[start:start + batch]
        captions = [prompts[i] for i in chunk]
        shape = codec.latent_shape(1, resolution)[1:]
        noise = torch.stack([item_noise(shape, seed, i) for i in chunk])
        latents = teacher_samples(models, schedule, noise, captions, steps=steps, cfg=cfg, negative=negative,
                                  autocast=autocast)
        images = codec.decode(latents).cpu()
        for i, caption, image in zip(chunk, captions, images):
            (folder / f"{i:06d}.png").unlink(missing_ok=True)  # an edited prompt's old image must not count as done
            with atomic_write(folder / f"{i:06d}.txt") as tmp:
                tmp.write_text(caption, encoding="utf-8")
            save_image_grid(folder / f"{i:06d}.png", image[None], ncol=1)  # last: its presence marks the item done
    return todo


def teacher_samples(models, schedule, noise: torch.Tensor, captions: list[str], *, steps: int, cfg: float,
                    negative: str = "", autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """The teacher's deterministic DDIM samples (latents, float32, on the device) from `noise`, one per caption."""
    codec = models.codec
    cond = Cond(codec.encode_text(captions))
    uncond = Cond(codec.encode_text([negative] * len(captions)))
    with autocast():
        return ddim_reference(models.roles.teacher, noise.to(codec.device), cond, uncond, steps, cfg, schedule).float()


def draw_training_set(config, models, schedule, folder: Path, share: tuple[int, int] = (0, 1),
                      autocast: Callable = contextlib.nullcontext, show: bool = True) -> Path:
    """`--data prompts.txt` with the run's `--synthesis-steps`, `--synthesis-cfg`, negative prompt and seed."""
    import logging

    drawn = synthesise(read_prompts(config.data), folder, models, schedule, resolution=config.resolution,
                       steps=config.synthesis_steps, cfg=config.synthesis_cfg, negative=config.negative_prompt,
                       seed=config.seed, share=share, autocast=autocast, show=show)
    if drawn:
        logging.getLogger("jdm_train").info("process %d: the teacher drew %d training images into %s", share[0],
                                            len(drawn), folder)
    return folder


# --------------------------------------------------------------------------- the teacher's ODE pairs

PAIRS_FILE = "ode_pairs.safetensors"


def pair_key(config, captions: list[str]) -> dict[str, str]:
    """What a cached pair file must have been drawn with to be reused (the file's metadata)."""
    import json

    return {"format": "jdm_ode_pairs", "steps": str(config.synthesis_steps), "cfg": str(config.cfg_scale),
            "negative": config.negative_prompt, "seed": str(config.seed), "resolution": str(config.resolution),
            "captions": json.dumps(captions)}


@torch.no_grad()
def ode_pairs(config, models, schedule, captions: list[str], folder: Path,
              autocast: Callable = contextlib.nullcontext, batch: int = 64, show: bool = True) -> dict:
    """The regression term's pairs (ours, as DMD's regression loss): for each caption a noise z and the
    teacher's deterministic DDIM sample from it (`--synthesis-steps`, guidance `--cfg-scale`, the real
    score's own), as latents. Written to `folder/ode_pairs.safetensors` with what they were drawn with,
    and reused when that matches, so a resumed run does not draw them again.

    The ODE is a fixed map from noise to image: a one-step student can be regressed onto it without the
    blur of regressing onto data (the DSM baseline), which anchors its shapes and colours to the
    teacher's from the first steps, while distribution matching does the rest."""
    from tqdm.auto import tqdm

    from jdm_train import model_io

    path, key = folder / PAIRS_FILE, pair_key(config, captions)
    if path.is_file():
        tensors, meta = model_io.read_state_dict(path)
        if meta == key:
            return {"noise": tensors["noise"], "latents": tensors["latents"], "captions": captions}
    shape = models.codec.latent_shape(1, config.resolution)[1:]
    noise = torch.stack([torch.randn(shape, generator=keyed_generator(("ode_pairs", config.seed, i)))
                         for i in range(len(captions))])
    latents = []
    for start in tqdm(range(0, len(captions), batch), desc="teacher draws the regression pairs", disable=not show):
        latents.append(teacher_samples(models, schedule, noise[start:start + batch], captions[start:start + batch],
                                       steps=config.synthesis_steps, cfg=config.cfg_scale,
                                       negative=config.negative_prompt, autocast=autocast).cpu())
    pairs = {"noise": noise.contiguous(), "latents": torch.cat(latents).contiguous()}
    folder.mkdir(parents=True, exist_ok=True)
    model_io.save_state_dict(path, pairs, key)
    return {**pairs, "captions": captions}
