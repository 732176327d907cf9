"""`python -m jdm_train` / `jdm-train`: the trainer's command line.

Precedence: `TrainConfig` defaults < keys of `--config FILE` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from jdm_train.config import (
    COND_DECODERS,
    CONDITION_WEIGHTINGS,
    CONSISTENCY_PAIRS,
    CONTROLS,
    DIVERGENCES,
    MIXED_PRECISION,
    OBJECTIVES,
    PHASES,
    SAVE_PRECISIONS,
    RENAMED_KEYS,
    TrainConfig,
    load_config_file,
)

# (flag, type or "flag" for store_true, choices, help). Defaults are read off TrainConfig.
_FLAGS: list[tuple[str, object, tuple | None, str]] = [
    ("ckpt", str, None, "Teacher SD1.x checkpoint: a path, a file name in <root>/models/checkpoints, or 'demo' "
                        "for the shipped demo teacher (which also sets demo-sized defaults: jdm_train.demo.TRAIN_DEFAULTS)."),
    ("control", str, CONTROLS, "Condition the ControlNet learns to obey."),
    ("data", str, None, "Folder of training images with captions (a .txt beside each image, or a diffusers "
                        "imagefolder metadata.jsonl with file_name/text), or a prompts .txt file (one caption per "
                        "line) from which the teacher draws the images first (--synthesis-steps, --synthesis-cfg; "
                        "cached in <output-dir>/synthesised, resumable). Defaults to the procedural demo set "
                        "with --ckpt demo."),
    ("comfyui_root", str, None, "ComfyUI folder: models are resolved in and exported to its models/ folders."),
    ("output", str, None, "Export name: models/unet/<output>.safetensors and "
                          "models/controlnet/<output>_<control>.safetensors."),
    ("output_dir", str, None, "Folder for checkpoints, validation grids and exports (default: <root>/models/jdm_runs/"
                              "<output> with a ComfyUI root, else ./jdm-output/<output>)."),
    ("student", str, None, "Student UNet to freeze in --phase extend (file in models/unet or a path)."),
    ("cfg_teacher", str, None, "Guidance teacher B for decoupled CFG (JDM Sec. 3.1); default: the teacher."),
    ("allow_pickle", "flag", None, "Allow loading .ckpt/.pt pickled checkpoints (only for files you trust)."),
    ("max_steps", int, None, "Number of generator updates."),
    ("batch_size", int, None, "Images per process per micro-batch."),
    ("gradient_accumulation_steps", int, None, "Micro-batches accumulated per update."),
    ("resolution", int, None, "Training resolution in pixels (images are resized and center-cropped; "
                              "a multiple of 64)."),
    ("seed", int, None, "Seed of every random draw (data order, noise, timesteps)."),
    ("objective", str, OBJECTIVES, "jdm: the JDM objective (Eq. 5); dsm: the DSM-ControlNet baseline; "
                                   "vsd: the implicit-VSD baseline (fidelity only, no condition term); controlnet: an ordinary "
                                   "multi-step ControlNet on the frozen teacher (denoising loss at random t)."),
    ("divergence", str, DIVERGENCES, "f-divergence weighting of the fidelity term (f-distill); rkl is plain JDM."),
    ("phase", str, PHASES, "joint: train student UNet + ControlNet; extend: freeze --student, train a new "
                           "ControlNet (JDM Sec. 3.2.1)."),
    ("generator_timestep", int, None, "Timestep t_g at which the student is evaluated on pure noise."),
    ("t_min", int, None, "Smallest diffusion timestep drawn for the distribution-matching terms."),
    ("t_max", int, None, "Largest diffusion timestep drawn for the distribution-matching terms."),
    ("cfg_scale", float, None, "Decoupled CFG scale w of the guidance teacher (1 = off)."),
    ("negative_prompt", str, None, "Prompt of the unconditional branch of the guidance teacher."),
    ("reward", str, None, "Differentiable reward MODULE:FUNCTION taking images BCHW in [0,1] and prompts, "
                          "returning (B,) (JDM Eq. 9): a log-probability of the whole image (sum per-pixel "
                          "terms over pixels, as the condition term does)."),
    ("fidelity_weight", float, None, "Weight of the fidelity (distribution-matching) term."),
    ("condition_weight", float, None, "Weight of the condition term grad log p(c|x_t) (1 = Eq. 5)."),
    ("condition_tau", float, None, "Per-pixel temperature tau of log p(c|x) = -sum_pixels d(h(x), c) / tau."),
    ("condition_t_max", int, None, "Apply the condition term only at diffusion timesteps t <= this (999: always, "
                                   "as Eq. 5); near t=999 the consistency model's x0 is a blur."),
    ("condition_weighting", str, CONDITION_WEIGHTINGS, "Timestep weighting of the condition term: eq5 shares "
                            "the fidelity term's lambda_t (Eq. 5); snr multiplies it by alpha_t^2/sigma_t^2, "
                            "a gradient on the consistency model's x0 at the same scale at every t (but "
                            "DMD's normalisation); x0: that x0 gradient alone, without lambda_t or DMD's normalisation."),
    ("control_dropout", float, None, "Share of training samples whose control is blanked (no condition term, "
                                     "fidelity only), so that a blank control gives the teacher's distribution."),
    ("reward_weight", float, None, "Weight of the reward term."),
    ("gan_weight", float, None, "Weight of the generator's GAN term (needs a discriminator; 0 = off)."),
    ("consistency_weight", float, None, "Weight of the consistency-LoRA loss (JDM Eq. 8)."),
    ("consistency_points", int, None, "Points of the consistency-training discretisation from t=0 (the boundary "
                                      "f(x, 0) = x) to 999, Karras rho=7 spacing (CT/iCT)."),
    ("consistency_ema", float, None, "EMA decay of the consistency LoRA that gives the stop-gradient target "
                                     "f^- of Eq. 8 (0 = the online weights, detached)."),
    ("consistency_pairs", str, CONSISTENCY_PAIRS, "How the lower point of a consistency pair is made: noise = from "
                                                  "the same sample and noise (consistency training, Eq. 8 as written); "
                                                  "ode = one DDIM step of the fake score (consistency distillation on "
                                                  "the student's own ODE; one more fake-score pass)."),
    ("regression_weight", float, None, "Weight of the regression term (ours, as DMD's regression loss): the "
                                       "one-step student from a pair's noise against the teacher's DDIM sample "
                                       "from it (--synthesis-steps, --cfg-scale), given that sample's control "
                                       "(0 = off). Anchors shapes and colours while distribution matching sharpens."),
    ("regression_pairs", int, None, "Number of (noise, teacher DDIM sample) pairs the teacher draws before "
                                    "training for --regression-weight (cached in <output-dir>/ode_pairs.safetensors)."),
    ("fake_updates_per_step", int, None, "Fake-score/consistency/discriminator updates per generator update."),
    ("student_lora_rank", int, None, "Rank of the student's LoRA on the frozen base (0 = full student weights)."),
    ("fake_lora_rank", int, None, "Rank of the fake score's LoRA on the frozen base (0 = full weights)."),
    ("consistency_lora_rank", int, None, "Rank of the consistency LoRA on the fake score."),
    ("cond_decoder", str, COND_DECODERS, "Decoder for the condition term: the SD VAE, or TAESD from "
                                         "models/vae_approx (cheaper)."),
    ("taesd", str, None, "TAESD decoder file (name in models/vae_approx or a path)."),
    ("lr_student", float, None, "Learning rate of the student UNet (or its LoRA)."),
    ("lr_controlnet", float, None, "Learning rate of the ControlNet."),
    ("lr_fake", float, None, "Learning rate of the fake score."),
    ("lr_consistency", float, None, "Learning rate of the consistency LoRA."),
    ("lr_discriminator", float, None, "Learning rate of the discriminator head."),
    ("adam_beta1", float, None, "AdamW beta1 of every optimizer but the ControlNet's (0: no momentum, as DMD)."),
    ("adam_beta1_controlnet", float, None, "AdamW beta1 of the ControlNet. A fresh ControlNet learns its hint path "
                                           "through the noisy distillation gradient only with momentum."),
    ("adam_beta2", float, None, "AdamW beta2 of every optimizer."),
    ("weight_decay", float, None, "AdamW weight decay."),
    ("lr_warmup_steps", int, None, "Ramp every learning rate linearly from 0 over this many updates."),
    ("max_grad_norm", float, None, "Absolute gradient-norm clip of every optimiser (0 = off)."),
    ("clip_outliers", float, None, "Clip a player's gradient norm at this multiple of the median of its last 100 "
                                   "norms (after 10 steps; 0 = off): clips outliers, not every step."),
    ("ema_decay", float, None, "Exponential moving average of the generator (student and ControlNet) with this "
                               "decay; validation grids and exports use the average (0 = off, the last weights)."),
    ("mixed_precision", str, MIXED_PRECISION, "Autocast precision (accelerate)."),
    ("gradient_checkpointing", "flag", None, "Recompute activations in the backward pass (less memory)."),
    ("cpu", "flag", None, "Train on the CPU even when an accelerator is present."),
    ("threads", int, None, "torch CPU threads (0 = torch's default, one per core; beside other busy "
                           "processes fewer threads degrade more gracefully, python -m jdm_train.bench threads)."),
    ("checkpoint_every", int, None, "Write checkpoint-N/ every this many steps."),
    ("checkpoints_total_limit", int, None, "Keep only the newest this many checkpoints."),
    ("resume", str, None, "'latest' or a checkpoint-N folder to continue from."),
    ("synthesis_steps", int, None, "DDIM steps of the teacher drawing a prompt list's training images."),
    ("synthesis_cfg", float, None, "Classifier-free guidance of the teacher drawing a prompt list's training images."),
    ("validation_every", int, None, "Write validation-N.png (condition | student one step | teacher multi-step) "
                                    "every this many steps, and log it to the tracker (0 = only at the end)."),
    ("validation_prompt", "append", None, "A caption of the validation grid (repeatable). Without it the grid "
                                          "shows the first training items."),
    ("validation_image", "append", None, "A control image of the validation grid (repeatable; the map itself, "
                                         "as ComfyUI's ControlNet nodes take it), paired with --validation-prompt: "
                                         "equal numbers, or one of either for all of the other."),
    ("validation_teacher_steps", int, None, "DDIM steps of the teacher reference in validation grids."),
    ("export_every", int, None, "Also write the ComfyUI exports every this many steps, so a run can be tried "
                                "before it ends (0 = only at the end; `python -m jdm_train.export CHECKPOINT` "
                                "exports any checkpoint)."),
    ("save_precision", str, SAVE_PRECISIONS, "Precision of the exported weights (a full SD1.5 student is 3.4 GB "
                                             "in fp32, 1.7 GB in fp16)."),
    ("log_every", int, None, "Log losses to trackers every this many steps."),
    ("report_to", str, None, "Tracker for the logs: tensorboard, wandb or all (accelerate)."),
    ("max_nonfinite", int, None, "Stop after this many consecutive non-finite losses."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jdm-train",
        description="Distil an SD1.x checkpoint into a one-step student with a ControlNet by Joint Distribution "
                    "Matching (arXiv 2503.06652) and f-divergence matching (arXiv 2502.15681).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file with the same keys as the flags; "
                                                         "flags given on the command line win.")
    defaults = TrainConfig()
    for name, kind, choices, help_text in _FLAGS:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if kind == "flag":
            parser.add_argument(flag, dest=name, action="store_true", help=help_text)
            continue
        if kind == "append":
            parser.add_argument(flag, dest=name, action="append", metavar=name.upper(), help=help_text)
            continue
        old = [f"--{k.replace('_', '-')}" for k, v in RENAMED_KEYS.items() if v == name]  # earlier names still work
        parser.add_argument(flag, *old, dest=name, type=kind, choices=choices, metavar=None if choices else name.upper(),
                            help=f"{help_text} (default: {default})")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and `--config FILE`) into a validated TrainConfig; bad values exit with status 2."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    try:
        values = load_config_file(given.pop("config")) if "config" in given else {}
        values.update(given)
        config = TrainConfig.from_dict(values)
        if config.ckpt == "demo":
            from jdm_train.demo import TRAIN_DEFAULTS

            config.data = "demo" if config.data is None else config.data
            for key, value in TRAIN_DEFAULTS.items():
                if key not in values:
                    setattr(config, key, value)
        return config.validate()
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def passive_openmp_waits() -> None:
    """Before torch is imported: OpenMP threads that wait sleep instead of spinning (unless the user
    set OMP_WAIT_POLICY). Spinning threads fight any other busy process for its core: on a 2-core
    machine beside one busy process a demo step took over 60 s with 2 spinning threads, 1.8 s with
    2 passive ones and 2.1 s with 1 (`python -m jdm_train.bench threads`)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    passive_openmp_waits()
    config = parse_args(argv)
    from jdm_train.train import run  # accelerate is imported only when training

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
