"""jdm_train.evaluate: FID against independent references, consistency, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jdm_train import evaluate


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy_sqrtm():
    """Against the textbook formula with scipy's general matrix square root (pytorch-fid's way)."""
    from scipy import linalg

    rng = np.random.default_rng(0)
    for d in (2, 5, 16):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        c1, c2 = _spd(rng, d), _spd(rng, d)
        covmean = linalg.sqrtm(c1 @ c2).real
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean)
        assert evaluate.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-7, abs=1e-7)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    """Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 (Wasserstein-2 squared)."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_fid_of_samples_tracks_the_gaussian_distance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=gen)
    y = torch.randn(4000, 4, generator=gen)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5])
    assert evaluate.fid(x, y) < 0.02
    assert evaluate.fid(x, y + shift) == pytest.approx(float((shift**2).sum()), abs=0.1)
    # std 2 vs 1 in every dim: (2 - 1)^2 * 4 = 4
    assert evaluate.fid(x, 2 * y) == pytest.approx(4.0, abs=0.2)
    with pytest.raises(ValueError, match="features"):
        evaluate.fid(x[:1], y)


def test_score_consistency_is_zero_on_the_data_and_not_on_blanks():
    eval_set = evaluate.demo_eval_set(4, "canny")
    ref = torch.randn(4, 9)

    class Feats(evaluate.FeatureNet):
        def features(self, images):
            return images.mean(dim=(2, 3)).repeat(1, 3)

    data_row = evaluate.score(eval_set.images, eval_set, Feats().features(eval_set.images), Feats(), 0, 0.0)
    assert data_row["consistency"] == 0.0
    assert data_row["fid"] == pytest.approx(0.0, abs=1e-6)
    grey = torch.full_like(eval_set.images, 0.5)
    assert evaluate.score(grey, eval_set, ref, Feats(), 1, 0.0)["consistency"] > 0.01
    table = evaluate.format_table({"data": data_row})
    assert table.splitlines()[2].startswith("| data | ")


def test_clip_features_and_score_with_a_tiny_local_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    net = evaluate.ClipFeatures(tmp_path / "clip")
    images = torch.rand(3, 3, 64, 64)
    feats = net.features(images)
    assert feats.shape == (3, 16)
    score = net.clip_score(images, ["a red circle on a grey background"] * 3)
    assert score.shape == (3,) and (score >= 0).all() and (score <= 100).all()
    # Independent reference: cosine of the model's own embeddings, computed here.
    tok = net.tokenizer(["a red circle on a grey background"], padding="max_length", max_length=77, return_tensors="pt")
    txt = net._tensor(net.model.get_text_features(input_ids=tok.input_ids))
    cos = torch.nn.functional.cosine_similarity(feats[:1], txt)
    assert score[0].item() == pytest.approx(100 * max(cos.item(), 0.0), abs=1e-4)
    with pytest.raises(ValueError, match="CLIPModel"):
        evaluate.ClipFeatures(tmp_path)


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path):
    """Teacher reference, student with ControlNet and blanked control, JSON and table, on real tiny models."""
    from jdm_train import fixtures, model_io
    from jdm_train.demo import FEATURES_PATH

    if not FEATURES_PATH.is_file():
        pytest.fail(f"shipped demo feature network {FEATURES_PATH} missing")
    ckpt = fixtures.write_tiny_sd1_checkpoint(tmp_path / "tiny.safetensors")
    pipe = model_io.load_sd1_checkpoint(ckpt)
    student = model_io.save_unet_ldm(tmp_path / "student.safetensors", pipe.unet, {"jdm.kind": "student", "jdm.timestep": "999"})
    cn = fixtures.make_controlnet(pipe.unet)
    control = model_io.save_controlnet_ldm(tmp_path / "cn.safetensors", cn, {"jdm.kind": "controlnet", "jdm.control": "canny"})
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--ckpt", str(ckpt), "--features", str(FEATURES_PATH), "--student", str(student),
                        "--controlnet", str(control), "--n", "6", "--teacher-steps", "2", "--batch", "4",
                        "--blank-control", "--shuffled-control", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert set(rows) == {"teacher (2-step DDIM, no control)", "data (held-out images)", "student (1 step, control)",
                         "student (1 step, blank control)", "student (1 step, shuffled control)"}
    assert rows["data (held-out images)"]["consistency"] == 0.0
    assert rows["data (held-out images)"]["edge_f1"] == pytest.approx(1.0)  # canny of the images is the control
    assert 0.0 <= rows["student (1 step, blank control)"]["edge_f1"] < 1.0
    for r in rows.values():
        assert np.isfinite(r["fid"]) and r["fid"] >= 0.0
        assert set(r["caption_agreement"]) == {"background", "colours", "all"}
        assert all(0.0 <= v <= 1.0 for v in r["caption_agreement"].values())
    assert rows["data (held-out images)"]["caption_agreement"]["background"] > 0.8
    assert rows["data (held-out images)"]["judge"] == {"background": 1.0, "colours": 1.0, "kinds": 1.0}
    assert all(0.0 <= r["background_bits"] <= 2.0 for r in rows.values())
    assert rows["student (1 step, control)"]["nfe"] == 1
    assert rows["teacher (2-step DDIM, no control)"]["fid"] == pytest.approx(0.0, abs=1e-6)


def test_run_sampler_control_modes():
    """given / blank / shuffled reach the generator as the image's own, zero, and the next image's condition."""
    control = torch.rand(5, 3, 8, 8)
    eval_set = evaluate.EvalSet([f"c{i}" for i in range(5)], torch.rand(5, 3, 8, 8), control, "canny")
    echo = lambda captions, c, noise: c  # noqa: E731
    noise = torch.zeros(5, 4, 1, 1)
    given, _ = evaluate.run_sampler(echo, eval_set, noise, batch=2)
    blank, _ = evaluate.run_sampler(echo, eval_set, noise, batch=2, control_mode="blank")
    shuffled, _ = evaluate.run_sampler(echo, eval_set, noise, batch=2, control_mode="shuffled")
    assert torch.equal(given, control) and torch.equal(blank, torch.zeros_like(control))
    assert torch.equal(shuffled[:4], control[1:]) and torch.equal(shuffled[4], control[0])
    with pytest.raises(ValueError, match="control_mode"):
        evaluate.run_sampler(echo, eval_set, noise, control_mode="zeros")


def test_edge_f1_tolerates_one_pixel():
    from jdm_train.evaluate import edge_f1

    c = torch.zeros(1, 1, 16, 16)
    c[..., 8, 2:14] = 1
    assert edge_f1(c, c) == pytest.approx(1.0)
    assert edge_f1(c.roll(1, dims=2), c) == pytest.approx(1.0)
    assert edge_f1(c.roll(2, dims=2), c) == 0.0
    half = c.clone()
    half[..., 8, 8:14] = 0
    # precision 1, recall 7/12 (the dilation reaches one pixel past the cut)
    assert edge_f1(half, c) == pytest.approx(2 * (7 / 12) / (1 + 7 / 12))


@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad")  # the probe must run without autograd
def test_bench_control_runs_and_scores_three_controls(tmp_path, capsys):
    from jdm_train.bench import control

    grid = tmp_path / "grid.png"
    assert control.main(["--n", "4", "--every", "1", "--max-steps", "1", "--output-dir", str(tmp_path),
                         "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    table, _, rest = out.strip().rpartition("share of updates clipped:")
    table = table.strip().splitlines()
    assert table[-4].startswith("| step | s | L1 own | F1 own | L1 blank")
    assert table[-2].startswith("| 0 |") and table[-1].startswith("| 1 |")
    assert "generator" in rest.splitlines()[0] and "fake" in rest.splitlines()[0]
    cm = rest.strip().splitlines()[-6:]  # the consistency model against the fake score's mean
    assert cm[0] == ("| t | - | FID f | FID mean | FID f-mean | FID 95% lo | FID 95% hi "
                     "| F1 f | F1 mean | F1 f-mean | F1 95% lo | F1 95% hi |")
    assert [row.split("|")[1].strip() for row in cm[2:]] == ["100", "300", "500", "700"]
    from PIL import Image

    assert Image.open(grid).size == (4 * 64, 4 * 64)  # control | own | blank | shuffled, 4 samples


def test_paired_bootstrap_interval_matches_the_normal_one_for_a_mean():
    """Independent reference: for a difference of means the bootstrap interval is close to
    +-1.96 sd / sqrt(n); the same resample on both sides cancels what the pairs share."""
    from jdm_train.bench.control import paired_bootstrap

    gen = torch.Generator().manual_seed(0)
    shared = 10 * torch.randn(400, generator=gen, dtype=torch.float64)  # large, common to both sides
    a = shared + 0.3 + torch.randn(400, generator=gen, dtype=torch.float64)
    b = shared
    diff, lo, hi = paired_bootstrap(lambda i: float(a[i].mean() - b[i].mean()), 400, boots=2000)
    half = 1.96 * float((a - b).std()) / 400 ** 0.5
    assert diff == pytest.approx(float((a - b).mean()))
    assert lo == pytest.approx(diff - half, abs=0.25 * half) and hi == pytest.approx(diff + half, abs=0.25 * half)
    assert lo > 0  # a true difference of 0.3 is resolved by 400 pairs despite the shared sd of 10


@pytest.mark.parametrize("pairs", ["noise", "ode"])
def test_consistency_only_updates_move_the_consistency_lora_alone(tmp_path, pairs):
    """`bench control --consistency-steps`: Eq. 8 alone, everything else frozen (also with ODE pairs,
    whose extra pass is the fake score's, without its LoRA)."""
    from jdm_train import cli
    from jdm_train.bench.control import train_consistency_only
    from jdm_train.train import Trainer

    trainer = Trainer(cli.parse_args(["--ckpt", "demo", "--output-dir", str(tmp_path), "--consistency-pairs", pairs]))
    assert trainer.players.consistency_ode is (trainer.roles.fake if pairs == "ode" else None)
    before = {k: v.clone() for k, v in trainer.roles.trainable_state().items()}
    train_consistency_only(trainer, 2)
    after = trainer.roles.trainable_state()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"consistency"}
    assert trainer.step == 2  # fresh random streams for every update


def test_teacher_sampler_with_a_controlnet_sees_the_control(tmp_path):
    """A fresh ControlNet (zero convolutions) leaves the teacher's DDIM samples unchanged; a trained
    one changes them, and differently for different controls."""
    from jdm_train import fixtures, model_io
    from jdm_train.denoisers import new_controlnet

    pipe = model_io.load_sd1_checkpoint(fixtures.write_tiny_sd1_checkpoint(tmp_path / "tiny.safetensors"))
    samplers = evaluate.Samplers(pipe)
    torch.manual_seed(0)
    cn = new_controlnet(pipe.unet, samplers.vae_scale_factor)
    control = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    noise, captions = samplers.noise(2, 64, 0), ["a red circle", "a blue square"]
    plain = samplers.teacher(3, 2.0)(captions, control, noise)
    assert torch.allclose(samplers.teacher(3, 2.0, controlnet=cn)(captions, control, noise), plain, atol=1e-6)
    with torch.no_grad():
        for p in cn.controlnet_down_blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = samplers.teacher(3, 2.0, controlnet=cn)(captions, control, noise)
    b = samplers.teacher(3, 2.0, controlnet=cn)(captions, control.flip(0), noise)
    assert (a - plain).abs().max() > 1e-3 and (a - b).abs().max() > 1e-3


def _held_out_folder(root, n: int = 3):
    """n captioned images in the trainer's layout: .txt captions, and one caption from metadata.jsonl."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        a = np.full((80, 64, 3), 30, np.uint8)
        a[10 + 8 * i : 40 + 8 * i, 12:52] = rng.integers(60, 255, 3)
        Image.fromarray(a).save(root / f"img{i}.png")
        if i:
            (root / f"img{i}.txt").write_text(f"a box number {i}\n")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "a box from jsonl"}) + "\n")
    (root / "notes.png").write_bytes(b"not an image")  # skipped, as the trainer does
    return root


def test_folder_eval_set_reads_the_trainers_layout_and_extracts_conditions(tmp_path):
    from jdm_train.data import load_image
    from jdm_train.extractors import get_extractor

    folder = _held_out_folder(tmp_path / "held_out")
    es = evaluate.folder_eval_set(folder, 2, "canny", 32)
    assert es.captions == ["a box from jsonl", "a box number 1"] and es.control_name == "canny"
    assert es.images.shape == (2, 3, 32, 32)
    assert torch.equal(es.images[1], load_image(folder / "img1.png", 32))
    assert torch.equal(es.control, get_extractor("canny").extract(es.images))
    assert es.control.abs().sum() > 0  # the boxes have edges
    assert len(evaluate.folder_eval_set(folder, 100, "canny", 32).captions) == 3
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.folder_eval_set(folder, 1, "canny", 32)


def test_cli_with_held_out_data_and_inception_weights(tmp_path, capsys):
    """`--data FOLDER --inception FILE` outside the demo: the user's images and the FID Inception."""
    from jdm_train import fixtures
    from jdm_train.inception import FIDInceptionV3, file_state_dict

    torch.manual_seed(0)
    torch.save(file_state_dict(FIDInceptionV3()), tmp_path / "pt_inception.pth")
    ckpt = fixtures.write_tiny_sd1_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "eval.json"
    argv = ["--ckpt", str(ckpt), "--data", str(_held_out_folder(tmp_path / "held_out")), "--resolution", "64",
            "--n", "8", "--teacher-steps", "2", "--inception", str(tmp_path / "pt_inception.pth"), "--out", str(out)]
    assert evaluate.main(argv) == 0
    assert "3 captioned images, fewer than --n 8" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["feature_net"] == "inception-v3-fid" and res["n"] == 3 and res["data"].endswith("held_out")
    rows = res["rows"]
    assert rows["data (held-out images)"]["consistency"] == 0.0
    assert rows["teacher (2-step DDIM, no control)"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(rows["data (held-out images)"]["fid"])
    with pytest.raises(ValueError, match="--inception FILE or --clip DIR"):
        evaluate.main(argv[:-4] + ["--out", str(out)])


def test_evaluate_does_not_import_the_demo_teacher_script():
    """train_teacher may sample through evaluate.Samplers; evaluate never imports train_teacher."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, jdm_train.evaluate; print('jdm_train.demo.train_teacher' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert "train_teacher" not in Path(evaluate.__file__).read_text(encoding="utf-8")


def test_bench_paper_trains_the_controlnet_row_for_its_own_steps_and_writes_the_table(tmp_path):
    import json

    from jdm_train.bench import paper

    row = paper.TEACHER_CONTROLNET
    assert paper.main(["--rows", row, "--steps", "1", "--controlnet-steps", "2", "--n", "2", "--teacher-steps", "2",
                       "--batch-size", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["controlnet_steps"] == 2 and set(results["rows"]) == {"teacher, 2-step DDIM, no control", row}
    assert (tmp_path / "runs" / paper._slug(row) / "checkpoint-2").is_dir()
    assert 0 <= results["rows"][row]["edge_f1"] <= 1
    assert (tmp_path / f"grid_{paper._slug(row)}.png").is_file() and row in (tmp_path / "table.md").read_text()
