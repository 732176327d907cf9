"""Trainer features users expect from diffusers' and kohya's trainers: validation grids of their own
prompts and control images (on disk and in tensorboard), exports during the run and from any
checkpoint, learning-rate warm-up, export precision; and the structure they rest on: models
built in code and handed to the Trainer, random streams that cannot collide."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jdm_train import cli, export, fixtures
from jdm_train.config import TrainConfig
from jdm_train.players import RandomStreams

RES = 64


def _argv(world, out, *extra):
    return ["--ckpt", str(world["ckpt"]), "--data", str(world["data"]), "--resolution", str(RES),
            "--output-dir", str(out), "--seed", "0", "--control", "canny", *extra]


def test_validation_grid_of_the_users_prompts_and_control_images_on_disk_and_in_tensorboard(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    control = np.zeros((40, 40, 3), np.uint8)
    control[10:30, 20] = 255  # a vertical edge
    Image.fromarray(control).save(tmp_path / "edge.png")
    out = tmp_path / "run"
    status = cli.main(_argv(world, out, "--max-steps", "1", "--validation-every", "1", "--validation-teacher-steps", "2",
                            "--validation-prompt", "a box number 1", "--validation-prompt", "a box number 3",
                            "--validation-image", str(tmp_path / "edge.png"), "--report-to", "tensorboard"))
    assert status == 0
    grid = np.asarray(Image.open(out / "validation-000001.png").convert("RGB"))
    assert grid.shape == (2 * RES, 3 * RES, 3)  # two prompts; condition | student | teacher
    shown = grid[:RES, :RES, 0]
    assert shown[:, RES // 2 - 2: RES // 2 + 2].max() > 150 and shown[:, :RES // 4].max() == 0  # the user's map, resized
    assert np.array_equal(grid[:RES, :RES], grid[RES:, :RES])  # one image for both prompts
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "tensorboard logged nothing"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert "validation" in acc.Tags()["images"]
    image = acc.Images("validation")[0]
    assert (image.width, image.height) == (3 * RES, 2 * RES)


def test_validation_flags_are_refused_before_any_work(world, tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_args(_argv(world, tmp_path, "--validation-image", str(tmp_path / "missing.png"),
                             "--validation-prompt", "x"))
    with pytest.raises(SystemExit):  # three prompts, two images
        (tmp_path / "a.png").write_bytes(b"")
        cli.parse_args(_argv(world, tmp_path, *sum((["--validation-prompt", p] for p in "abc"), []),
                             "--validation-image", str(tmp_path / "a.png"), "--validation-image", str(tmp_path / "a.png")))
    assert cli.parse_args(_argv(world, tmp_path, "--preview-every", "3")).validation_every == 3  # the earlier name


def test_export_every_and_the_export_command_write_what_the_run_exports(world, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="jdm_train")
    status = cli.main(_argv(world, out, "--max-steps", "2", "--export-every", "1", "--checkpoint-every", "1",
                            "--ema-decay", "0.5", "--lr-controlnet", "1e-2"))
    assert status == 0
    assert caplog.text.count("exported controlnet") == 2  # after step 1, and at the end
    run_student = load_file(out / "jdm.safetensors")
    run_controlnet = load_file(out / "jdm_canny.safetensors")

    written = export.export_checkpoint(out / "checkpoint-2", output_dir=tmp_path / "again")
    again = load_file(written["controlnet"])
    assert again.keys() == run_controlnet.keys()
    assert all(torch.equal(again[k], run_controlnet[k]) for k in again)  # the EMA weights, as the run exported
    assert all(torch.equal(v, run_student[k]) for k, v in load_file(written["student"]).items())

    assert export.main([str(out / "checkpoint-1"), "--output-dir", str(tmp_path / "half"), "--save-precision", "fp16"]) == 0
    half = load_file(tmp_path / "half" / "jdm_canny.safetensors")
    assert {v.dtype for v in half.values()} == {torch.float16}
    differs = [k for k in half if not torch.equal(half[k], run_controlnet[k].half())]
    assert differs, "checkpoint-1 holds the weights of step 1, not the final ones"


def test_export_command_names_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export.main([str(tmp_path)])
    assert exc.value.code == 2 and "not a training checkpoint" in capsys.readouterr().err


def _tiny_models(config: TrainConfig):
    """A run's models built in code: no checkpoint file anywhere."""
    from jdm_train.build import Models, make_extractor
    from jdm_train.codec import Codec
    from jdm_train.denoisers import build_roles
    from jdm_train.schedule import NoiseSchedule
    from jdm_train.model_io import load_tokenizer

    text_encoder = fixtures.make_text_encoder().requires_grad_(False)
    unet = fixtures.make_unet(cross_attention_dim=text_encoder.config.hidden_size)
    roles = build_roles(unet, NoiseSchedule())
    return Models(Codec(load_tokenizer(), text_encoder, fixtures.make_vae().requires_grad_(False)), roles,
                  make_extractor(config), "in-code")


def test_trainer_takes_models_built_in_code_and_warms_up_its_learning_rates(world, tmp_path):
    from jdm_train.data import CaptionedImageFolder
    from jdm_train.train import Trainer

    config = TrainConfig(ckpt="never-read.safetensors", data=str(world["data"]), resolution=RES,
                         output_dir=str(tmp_path), lr_warmup_steps=4, lr_controlnet=0.4, max_steps=2)
    trainer = Trainer(config, models=_tiny_models(config), dataset=CaptionedImageFolder(world["data"], RES))
    seen = []
    for _ in range(2):
        logs = trainer.train_step()
        trainer.step += 1
        seen.append(trainer.optimizers["generator"].param_groups[-1]["lr"])
        assert np.isfinite(logs["generator_loss"])
    assert seen == pytest.approx([0.1, 0.2])  # (step + 1) / 4 of the rate asked for
    assert trainer.export()["controlnet"].is_file()


def test_random_streams_are_a_function_of_every_coordinate_and_never_shared():
    streams = RandomStreams(seed=3, process=0, device=torch.device("cpu"))
    draw = lambda **k: streams.randn((8,), step=k.pop("step", 5), purpose=k.pop("purpose", "eps"), **k)  # noqa: E731
    assert torch.equal(draw(micro=1), draw(micro=1))
    # The arithmetic key micro + 1000 * repeat of earlier versions gave these two one stream.
    assert not torch.equal(draw(micro=1000, repeat=0), draw(micro=0, repeat=1))
    draws = [draw(step=s, micro=m, repeat=r, purpose=p) for s in range(3) for m in range(3) for r in range(2)
             for p in ("eps", "t")]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    other = RandomStreams(seed=3, process=1, device=torch.device("cpu"))
    assert not torch.equal(draw(), other.randn((8,), 5, "eps"))
