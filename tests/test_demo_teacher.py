"""The shipped demo teacher and feature network: they load, and the teacher's samples follow captions."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from jdm_train import evaluate, model_io
from jdm_train.demo import FEATURES_PATH, TEACHER_PATH, data, teacher_path
from jdm_train.demo import features as feats
from jdm_train.demo import train_teacher


@pytest.fixture(scope="module")
def samplers():
    return evaluate.Samplers(model_io.load_sd1_checkpoint(teacher_path()))


@pytest.fixture(scope="module")
def feature_net():
    return feats.load_feature_net()


def test_shipped_teacher_is_a_small_fp16_sd1_checkpoint(samplers):
    assert teacher_path() == TEACHER_PATH
    assert TEACHER_PATH.stat().st_size < 25e6  # the budget for the shipped teacher
    sd, meta = model_io.read_state_dict(TEACHER_PATH)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert meta["jdm.kind"] == "teacher"
    assert meta["jdm.train_command"].startswith("python -m jdm_train.demo.train_teacher")
    pipe = samplers.pipe
    assert pipe.tokenizer.vocab_size == 49408
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert samplers.vae_scale_factor == 8


def test_feature_net_reads_held_out_data(feature_net):
    images, captions = data.batch(range(data.HELDOUT_START, data.HELDOUT_START + 96))
    agree = feats.caption_agreement(feature_net, images, captions)
    assert agree["background"] > 0.95 and agree["objects"] > 0.8


def test_teacher_samples_follow_their_captions(samplers, feature_net):
    """Agreement of samples with their own captions beats agreement with shuffled captions (chance)."""
    captions = [data.caption(data.HELDOUT_START + i) for i in range(24)]
    images = samplers.teacher(steps=10, cfg=4.0)(captions, None, samplers.noise(len(captions), 64, seed=0))
    own = feats.caption_agreement(feature_net, images, captions)
    shuffled = captions[1:] + captions[:1]
    other = feats.caption_agreement(feature_net, images, shuffled)
    # Measured at commit time: background 1.00 own vs 0.25 shuffled, colours 0.92 vs 0.04.
    assert own["background"] >= 0.9
    assert own["background"] > other["background"] + 0.5
    assert own["colours"] >= 0.7 and own["colours"] > other["colours"] + 0.5


def test_vae_reconstructs_the_world(samplers):
    images, _ = data.batch(range(data.HELDOUT_START, data.HELDOUT_START + 8))
    vae = samplers.pipe.vae
    with torch.no_grad():
        lat = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert lat.shape == (8, 4, 8, 8)
    assert 0.5 < lat.std().item() < 2.0  # unit-ish variance under SD's 0.18215 (folded in by the script)
    rec = samplers.codec.decode(lat)
    assert (rec - images).abs().mean().item() < 0.03  # 0.0157 on 128 held-out images (the script's log)


def test_train_teacher_script_runs_and_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "teacher.safetensors"
    argv = ["--work", str(tmp_path / "work"), "--out", str(out), "--n-train", "16", "--vae-steps", "2",
            "--vae-batch", "2", "--unet-steps", "2", "--unet-batch", "2", "--grid-n", "2", "--grid-steps", "2",
            "--threads", "1", "--eval-n", "2", "--eval-cfgs", "4"]
    rc = train_teacher.main(argv)
    assert rc == 0
    pipe = model_io.load_sd1_checkpoint(out)
    assert pipe.unet.config.block_out_channels == list(train_teacher.UNET_CONFIG["block_out_channels"])
    assert pipe.vae.config.block_out_channels == list(train_teacher.VAE_CONFIG["block_out_channels"])
    assert evaluate.Samplers(pipe).vae_scale_factor == 8
    meta = model_io.read_metadata(out)
    assert meta["jdm.kind"] == "teacher" and meta["jdm.cfg"] == "4"
    assert out.stat().st_size < 25e6  # the default architecture fits the budget (fp16)
    assert (tmp_path / "work" / "samples_heldout_captions.png").is_file()
    quality = json.loads((tmp_path / "work" / "quality.json").read_text())["scores"]
    assert set(quality) == {"data", "vae", "teacher 2 steps cfg 4"} and quality["data"]["all"] == 1.0
    # a second run reuses the cached images, VAE and latents (read back with weights_only)
    caches = sorted(p.name for p in (tmp_path / "work").glob("*.pt"))
    assert caches and not list((tmp_path / "work").glob(".*.tmp"))
    assert train_teacher.main(argv) == 0
    assert (tmp_path / "work" / "log.txt").read_text().count("latent scale folded") == 1  # the VAE was not retrained


def test_vae_training_resumes_exactly_and_weights_shapes():
    """A run stopped at a checkpoint and resumed ends with the same weights as one run straight
    through; the loss weights pixels off the background more."""
    from diffusers import AutoencoderKL

    images = torch.stack([torch.from_numpy(data.render(data.scene(i))).permute(2, 0, 1) for i in range(8)])
    backgrounds = train_teacher.background_colours(8)
    cfg = dict(train_teacher.VAE_CONFIG, block_out_channels=(32, 32, 32, 32))

    def run(state=None, saved=None):
        torch.manual_seed(0)
        vae = AutoencoderKL(**cfg)
        train_teacher.train_vae(vae, images, backgrounds, 4, 2, 1e-3, 0, lambda m: None, crop=16, state=state,
                                checkpoint=None if saved is None else lambda s: saved.append(copy.deepcopy(s)), every=2)
        return vae

    straight = run()
    saved = []
    run(saved=saved)
    assert [s["step"] for s in saved] == [2]
    resumed = run(state=saved[0])
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k

    x = torch.zeros(1, 3, 4, 4)
    x[..., 0, 0] = 1.0  # one shape pixel on a black (zero) background
    bg = torch.zeros(1, 3)
    rec = torch.zeros_like(x)
    plain = train_teacher.reconstruction_loss(rec, x, bg, 0.0, 0.0)
    weighted = train_teacher.reconstruction_loss(rec, x, bg, 4.0, 0.0)
    assert weighted > 3 * plain


@pytest.mark.slow
def test_train_teacher_reproduces_the_shipped_quality(tmp_path):
    """The committed command retrains a teacher whose FID to held-out data (demo features) is within
    25% (+2) of the shipped teacher's, and whose caption agreement is within 0.15."""
    meta = model_io.read_metadata(TEACHER_PATH)
    argv = meta["jdm.train_command"].split()[3:]
    argv = [a for i, a in enumerate(argv) if a not in ("--work", "--out") and (i == 0 or argv[i - 1] not in ("--work", "--out"))]
    out = tmp_path / "teacher.safetensors"
    assert train_teacher.main(argv + ["--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    net = evaluate.DemoFeatures(FEATURES_PATH)
    eval_set = evaluate.demo_eval_set(128, "canny")
    data_feats = net.features(eval_set.images)
    res = {}
    for name, path in (("shipped", TEACHER_PATH), ("retrained", out)):
        s = evaluate.Samplers(model_io.load_sd1_checkpoint(path))
        imgs, _ = evaluate.run_sampler(s.teacher(25, 4.0), eval_set, s.noise(128, 64, 0))
        res[name] = (evaluate.fid(net.features(imgs), data_feats), net.agreement(imgs, eval_set.captions)["all"])
    print(f"teacher reproduction (FID to held-out data, caption agreement): {res}")  # shown with -s / -rP
    assert res["retrained"][0] <= 1.25 * res["shipped"][0] + 2.0, res
    assert res["retrained"][1] >= res["shipped"][1] - 0.15, res


def test_random_captions_are_parsed_by_the_feature_module():
    rng = random.Random(0)
    for _ in range(50):
        cap = data.caption(rng.randrange(0, 10**6))
        bg, objs, _ = feats.parse_caption(cap)
        assert bg in data.BACKGROUNDS and 1 <= len(objs) <= 2
    with pytest.raises(ValueError, match="caption"):
        feats.parse_caption("a photo of a cat")


def test_unet_cycles_restart_the_learning_rate_and_continue_a_finished_run():
    """`--unet-steps 5000 10000` repeats a 5000-step run's schedule exactly for its first 5000 steps
    (so a longer run continues a finished one), then warms up and decays again over 10000."""
    lr = train_teacher._cycle_lr
    assert [lr(s, [5000, 10000], 1e-3) for s in range(0, 5000, 97)] == \
        [train_teacher._lr(s, 5000, 1e-3) for s in range(0, 5000, 97)]
    assert lr(5000, [5000, 10000], 1e-3) == pytest.approx(1e-3 / 100)  # warm-up restarts
    assert lr(5100, [5000, 10000], 1e-3) == pytest.approx(1e-3 * 1.02)  # the peak (plus the 2% floor)
    assert lr(14999, [5000, 10000], 1e-3) == pytest.approx(1e-3 * 0.02, rel=1e-3)
    assert train_teacher.parse_args(["--unet-steps", "7"]).unet_steps == [7]
