"""(The `world` fixture, a tiny checkpoint and data folder, is in conftest.py.)

What can refuse a run does so before the first step, as one line; a resume keeps what the user
asked for (its learning rates) or refuses what cannot fit (another model, control or objective);
a streak of non-finite losses does not lose a due checkpoint."""

import json
import logging
import time
from pathlib import Path


from jdm_train import cli, fixtures, train
from jdm_train.checkpoint import find_checkpoint
from jdm_train.config import TrainConfig

RES = "64"


def _argv(world, out, *extra):
    return ["--ckpt", str(world["ckpt"]), "--data", str(world["data"]), "--resolution", RES,
            "--output-dir", str(out), "--seed", "0", *extra]


def _fake_checkpoint(out: Path, **config) -> Path:
    """A checkpoint folder as far as the pre-flight reads it: its trainer_state.json."""
    folder = out / "checkpoint-3"
    folder.mkdir(parents=True)
    state = {"step": 3, "config": {**TrainConfig(ckpt="tiny.safetensors").to_dict(), **config}}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_resume_of_another_control_or_model_is_refused_before_any_model_loads(world, tmp_path, caplog, monkeypatch):
    loads = []
    monkeypatch.setattr(train.model_io, "load_sd1_checkpoint", lambda *a, **k: loads.append(a))
    out = tmp_path / "out"
    _fake_checkpoint(out, control="canny")
    assert cli.main(_argv(world, out, "--control", "lowres", "--resume", "latest")) == 2
    assert "--control 'canny'" in caplog.text and "'lowres'" in caplog.text
    other = tmp_path / "other"
    _fake_checkpoint(other, ckpt="v1-5-pruned-emaonly.safetensors")
    assert cli.main(_argv(world, other, "--resume", "latest")) == 2
    assert "v1-5-pruned-emaonly.safetensors" in caplog.text
    assert loads == []  # refused before the teacher was read


def test_resume_latest_without_a_checkpoint_is_a_one_line_error(world, tmp_path, caplog, monkeypatch):
    loads = []
    monkeypatch.setattr(train.model_io, "load_sd1_checkpoint", lambda *a, **k: loads.append(a))
    assert cli.main(_argv(world, tmp_path / "none", "--resume", "latest")) == 2
    assert "no checkpoint-N folder" in caplog.text and "Traceback" not in caplog.text
    assert loads == []


def test_unwritable_output_folder_is_refused_before_any_model_loads(world, tmp_path, caplog, monkeypatch):
    loads = []
    monkeypatch.setattr(train.model_io, "load_sd1_checkpoint", lambda *a, **k: loads.append(a))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli.main(_argv(world, blocker / "out")) == 2
    assert "not writable" in caplog.text
    assert loads == []


def test_missing_annotator_weights_are_refused_before_any_model_loads(world, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("AUX_ANNOTATOR_CKPTS_PATH", raising=False)
    loads = []
    monkeypatch.setattr(train.model_io, "load_sd1_checkpoint", lambda *a, **k: loads.append(a))
    assert cli.main(_argv(world, tmp_path / "out", "--control", "hed", "--comfyui-root", str(tmp_path / "ComfyUI"))) == 2
    assert "ControlNetHED" in caplog.text and loads == []


def test_a_checkpoint_whose_vae_is_not_8x_is_refused_before_training(world, tmp_path, caplog):
    ckpt = fixtures.write_tiny_sd1_checkpoint(tmp_path / "vae2x.safetensors", vae={"block_out_channels": (32, 32)})
    start = time.perf_counter()
    status = cli.main(["--ckpt", str(ckpt), "--data", str(world["data"]), "--resolution", RES,
                       "--output-dir", str(tmp_path / "out"), "--max-steps", "50"])
    assert status == 2
    assert "downsamples 2x" in caplog.text and "8x" in caplog.text
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert time.perf_counter() - start < 120


def test_learning_rates_given_with_resume_are_applied_and_said(world, tmp_path, caplog):
    out = tmp_path / "out"
    common = ("--control", "canny", "--checkpoint-every", "1")
    assert cli.main(_argv(world, out, "--max-steps", "1", *common)) == 0
    config = cli.parse_args(_argv(world, out, "--max-steps", "2", "--resume", "latest", "--lr-controlnet", "0.25",
                                  "--lr-fake", "0.125", *common))
    trainer = train.Trainer(config)
    trainer.resume(find_checkpoint(trainer.output_dir, "latest"))
    lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in trainer.optimizers.items()}
    assert lrs["generator"][-1] == 0.25 and lrs["fake"][0] == 0.125
    assert "learning rate" in caplog.text and "0.25" in caplog.text


def test_a_checkpoint_due_inside_a_nonfinite_streak_is_written_at_the_next_finite_step(world, tmp_path, monkeypatch):
    module = tmp_path / "nan_on_two_and_three.py"
    module.write_text(
        "CALLS = [0]\n"
        "def reward(images, prompts):\n"
        "    CALLS[0] += 1\n"
        "    r = images.mean(dim=(1, 2, 3))\n"
        "    return r * float('nan') if CALLS[0] in (2, 3) else r\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert cli.main(_argv(world, out, "--max-steps", "5", "--checkpoint-every", "3", "--max-nonfinite", "4",
                          "--reward", "nan_on_two_and_three:reward")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_a_streak_before_any_checkpoint_names_no_folder(world, tmp_path, monkeypatch, caplog):
    module = tmp_path / "always_nan.py"
    module.write_text("def reward(images, prompts):\n    return images.mean(dim=(1, 2, 3)) * float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert cli.main(_argv(world, out, "--max-steps", "6", "--checkpoint-every", "5", "--max-nonfinite", "2",
                              "--reward", "always_nan:reward")) == 3
    assert "no checkpoint was written" in caplog.text
    assert str(out) not in caplog.text.split("non-finite")[-1]
    assert not list(out.glob("checkpoint-*"))


def test_a_full_disk_during_a_checkpoint_says_so_and_leaves_no_partial_checkpoint(world, tmp_path, monkeypatch, caplog):
    import errno

    out = tmp_path / "out"
    real = train.model_io.save_state_dict

    def full(path, *a, **k):
        if Path(path).name == "trainable.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(train.model_io, "save_state_dict", full)
    assert cli.main(_argv(world, out, "--max-steps", "2", "--checkpoint-every", "1")) == 4
    assert "no space left in" in caplog.text and "GB" in caplog.text
    assert not [p for p in out.iterdir() if "checkpoint" in p.name]


def test_unreadable_random_states_on_resume_are_a_warning(world, tmp_path, caplog):
    out = tmp_path / "out"
    assert cli.main(_argv(world, out, "--max-steps", "1", "--checkpoint-every", "1")) == 0
    (out / "checkpoint-1" / "random_states_0.pkl").write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING):
        assert cli.main(_argv(world, out, "--max-steps", "2", "--checkpoint-every", "1", "--resume", "latest")) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("random_states_0.pkl" in r.getMessage() for r in warnings)
