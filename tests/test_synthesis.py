"""`--data prompts.txt`: the demo teacher draws the training images from captions, into a folder
the trainer reads; an interrupted or edited list redraws only what is missing, identically."""

import logging

import numpy as np
import torch
from PIL import Image

from jdm_train import cli
from jdm_train.build import build_models
from jdm_train.data import CaptionedImageFolder
from jdm_train.demo import data as demo_data
from jdm_train.demo import judge
from jdm_train.schedule import NoiseSchedule
from jdm_train.synthesis import synthesise


def _prompts(tmp_path, captions):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(captions) + "\n\n", encoding="utf-8")  # blank lines are not prompts
    return path


def test_a_prompt_list_is_drawn_by_the_teacher_then_trained_on(tmp_path, caplog):
    captions = [demo_data.caption(demo_data.HELDOUT_START + i) for i in range(4)]
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="jdm_train")
    status = cli.main(["--ckpt", "demo", "--data", str(_prompts(tmp_path, captions)), "--output-dir", str(out),
                       "--max-steps", "1", "--synthesis-steps", "10", "--validation-teacher-steps", "2"])
    assert status == 0
    folder = out / "synthesised"
    dataset = CaptionedImageFolder(folder, 64)
    items = [dataset[i] for i in range(len(dataset))]
    assert [it["caption"] for it in items] == captions
    images = torch.stack([it["image"] for it in items])
    assert images.shape == (4, 3, 64, 64)
    # The teacher's images, not noise: their backgrounds follow the captions as the teacher's do.
    assert judge.caption_scores(images, captions)["background"] >= 0.75
    assert "the teacher drew 4 training images" in caplog.text
    assert (out / "jdm_canny.safetensors").is_file()


def test_an_interrupted_or_edited_list_redraws_only_what_is_missing_identically(tmp_path):
    config = cli.parse_args(["--ckpt", "demo", "--output-dir", str(tmp_path)])
    models = build_models(config, torch.device("cpu"), torch.float32, NoiseSchedule())
    captions = [demo_data.caption(demo_data.HELDOUT_START + i) for i in range(3)]
    folder = tmp_path / "drawn"
    draw = lambda prompts: synthesise(prompts, folder, models, NoiseSchedule(), resolution=64, steps=3, cfg=4.0,  # noqa: E731
                                      batch=2, show=False)
    assert draw(captions) == [0, 1, 2]
    first = np.asarray(Image.open(folder / "000001.png"), dtype=np.int16)
    (folder / "000001.png").unlink()  # a kill before item 1 was written
    assert draw(captions) == [1]
    again = np.asarray(Image.open(folder / "000001.png"), dtype=np.int16)
    assert np.abs(again - first).max() <= 1  # item noise depends on (seed, index) only (batched maths may round apart)
    edited = captions[:2] + [demo_data.caption(demo_data.HELDOUT_START + 7)]
    assert draw(edited) == [2]
    assert (folder / "000002.txt").read_text() == edited[2]
    assert draw(edited) == []


def test_an_empty_prompt_list_is_refused_before_any_model_loads(tmp_path, caplog):
    status = cli.main(["--ckpt", "demo", "--data", str(_prompts(tmp_path, [])), "--output-dir", str(tmp_path / "o")])
    assert status == 2
    assert "no prompts" in caplog.text and "expected one caption per line" in caplog.text


def test_ode_pairs_are_the_teachers_ddim_samples_cached_and_redrawn_when_settings_change(tmp_path, monkeypatch):
    from jdm_train.denoisers import Cond
    from jdm_train.sampling import ddim_reference
    from jdm_train.synthesis import ode_pairs

    config = cli.parse_args(["--ckpt", "demo", "--output-dir", str(tmp_path), "--synthesis-steps", "3"])
    schedule = NoiseSchedule()
    models = build_models(config, torch.device("cpu"), torch.float32, schedule)
    captions = [demo_data.caption(demo_data.HELDOUT_START + i) for i in range(5)]
    pairs = ode_pairs(config, models, schedule, captions, tmp_path, batch=2, show=False)
    assert pairs["noise"].shape == pairs["latents"].shape == (5, 4, 8, 8)
    # Item 3 alone, by the sampler itself, with the run's guidance (the real score's, --cfg-scale).
    codec = models.codec
    alone = ddim_reference(models.roles.teacher, pairs["noise"][3:4], Cond(codec.encode_text(captions[3:4])),
                           Cond(codec.encode_text([""])), 3, config.cfg_scale, schedule)
    torch.testing.assert_close(pairs["latents"][3:4], alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(pairs["latents"][0], pairs["latents"][1])  # each item its own noise

    teacher = models.roles.teacher

    def refuse(*args, **kwargs):
        raise AssertionError("a cached pair file was drawn again")

    monkeypatch.setattr(models.roles, "teacher", refuse)
    again = ode_pairs(config, models, schedule, captions, tmp_path, batch=4, show=False)
    assert torch.equal(again["latents"], pairs["latents"]) and torch.equal(again["noise"], pairs["noise"])
    monkeypatch.setattr(models.roles, "teacher", teacher)
    config.cfg_scale = 2.0  # another guidance: other pairs, drawn again
    other = ode_pairs(config, models, schedule, captions, tmp_path, batch=4, show=False)
    assert torch.equal(other["noise"], pairs["noise"]) and not torch.allclose(other["latents"], pairs["latents"])
