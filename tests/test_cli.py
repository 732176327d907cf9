"""The trainer's command line: flags, --config files, precedence and error messages."""

import json

import pytest

from jdm_train.cli import _FLAGS, build_parser, parse_args
from jdm_train.config import TrainConfig


def test_defaults_and_flags():
    cfg = parse_args(["--ckpt", "sd15.safetensors", "--control", "hed", "--max-steps", "7", "--gradient-checkpointing"])
    assert (cfg.ckpt, cfg.control, cfg.max_steps, cfg.gradient_checkpointing) == ("sd15.safetensors", "hed", 7, True)
    assert cfg.batch_size == TrainConfig().batch_size and cfg.divergence == "rkl"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_merges_and_flags_win(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"ckpt": "a.safetensors", "max-steps": 50, "lr_fake": 1, "divergence": "js", "batch_size": 2}
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text('ckpt = "a.safetensors"\n"max-steps" = 50\nlr_fake = 1\ndivergence = "js"\nbatch_size = 2\n')
    cfg = parse_args(["--config", str(path), "--max-steps", "3"])
    assert cfg.ckpt == "a.safetensors" and cfg.divergence == "js"
    assert cfg.max_steps == 3  # the flag wins over the file
    assert cfg.lr_fake == 1.0 and isinstance(cfg.lr_fake, float)


def test_config_round_trips_through_json():
    cfg = parse_args(["--ckpt", "x", "--cfg-scale", "2.5", "--reward", "m:f"])
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--ckpt", "x", "--batch-size", "0"], "--batch-size"),
        (["--ckpt", "x", "--resolution", "500"], "--resolution"),
        (["--ckpt", "x", "--control", "sketch"], "--control"),
        (["--ckpt", "x", "--divergence", "kl"], "--divergence"),
        (["--ckpt", "x", "--divergence", "js"], "--batch-size"),
        (["--ckpt", "x", "--phase", "extend"], "--student"),
        (["--ckpt", "x", "--reward", "no_colon"], "--reward"),
        (["--ckpt", "x", "--t-min", "900", "--t-max", "100"], "--t-min"),
        (["--ckpt", "x", "--max-steps", "many"], "--max-steps"),
        ([], "--ckpt"),
    ],
)
def test_bad_values_exit_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_bad_config_file_keys_and_types(tmp_path, capsys):
    bad_key = tmp_path / "a.json"
    bad_key.write_text(json.dumps({"ckpt": "x", "max_stepz": 3}))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad_key)])
    assert "max_stepz" in capsys.readouterr().err
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('ckpt = "x"\nmax_steps = "ten"\n')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad_type)])
    assert "max_steps" in capsys.readouterr().err


def test_every_flag_has_help_and_every_field_a_flag():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    names = {f for f, *_ in _FLAGS}
    assert names == set(TrainConfig.__dataclass_fields__)
    for name in names:
        assert actions[name].help and len(actions[name].help) > 15, name


def test_demo_defaults_data():
    assert parse_args(["--ckpt", "demo"]).data == "demo"


def test_demo_training_defaults_yield_to_flags_and_config(tmp_path):
    from jdm_train.demo import TRAIN_DEFAULTS
    from jdm_train.demo.data import IMAGE_SIZE

    config = parse_args(["--ckpt", "demo"])
    assert TRAIN_DEFAULTS["resolution"] == IMAGE_SIZE
    assert all(getattr(config, k) == v for k, v in TRAIN_DEFAULTS.items())
    assert parse_args(["--ckpt", "demo", "--cfg-scale", "1"]).cfg_scale == 1.0
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text("lr_controlnet = 2e-4\n")
    assert parse_args(["--ckpt", "demo", "--config", str(cfg_file)]).lr_controlnet == 2e-4
    assert parse_args(["--ckpt", "other.safetensors"]).cfg_scale == TrainConfig().cfg_scale


def test_config_choice_lists_match_the_losses_they_select():
    # config.py stays free of torch, so it spells these out again; they must not drift apart.
    from jdm_train import config, losses

    assert config.DIVERGENCES == losses.DIVERGENCES
    assert config.CONDITION_WEIGHTINGS == losses.CONDITION_WEIGHTINGS
