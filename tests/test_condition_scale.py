"""The condition term is a log-likelihood of the whole condition (a pixel sum), so that Eq. 5's weight
keeps its meaning and the condition direction per latent element does not change with resolution."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jdm_train import config, losses
from jdm_train.demo.data import ShapesDataset
from jdm_train.extractors import clear_cache, get_extractor
from jdm_train.schedule import NoiseSchedule

sys.path.insert(0, str(Path(__file__).parent))
from test_extractors_models import random_hed_state_dict, write_hed, write_tiny_dpt  # noqa: E402

S = NoiseSchedule()


def up2(v: torch.Tensor) -> torch.Tensor:
    return F.interpolate(v, scale_factor=2, mode="nearest")


def _images(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "shapes":
        data = ShapesDataset(resolution=64)
        return torch.stack([data[seed * n + i]["image"] for i in range(n)])
    mode = "nearest" if kind == "blocks" else "bilinear"
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=64, mode=mode)


# Each extractor's operator has a scale of its own (canny's 3x3 Sobel, the lowres factor, the depth
# model's input size), so the images are ones whose condition survives a 2x nearest upsampling:
# shapes for edges, 8x8 blocks for an 8x lowres, smooth images for the networks.
CASES = {"canny": "shapes", "lowres": "blocks", "hed": "smooth", "depth": "smooth"}


@pytest.mark.parametrize("name", list(CASES))
def test_log_likelihood_of_a_2x_upsampled_image_and_condition_is_4x(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clear_cache()
    params = {}
    if name == "hed":
        params = {"weights": str(write_hed(tmp_path, random_hed_state_dict()))}
    elif name == "depth":
        write_tiny_dpt(tmp_path / "dpt")
        params = {"model": str(tmp_path / "dpt")}
    ext = get_extractor(name, **params)
    kind = CASES[name]
    cond = ext.extract(_images(kind, 8, 0))
    drawn = _images(kind, 8, 1)  # another image drawn for that condition: a likelihood well below its maximum
    with torch.no_grad():
        small = ext.log_likelihood(drawn, cond, tau=0.5).sum()
        large = ext.log_likelihood(up2(drawn), up2(cond), tau=0.5).sum()
    assert small < 0
    assert large / small == pytest.approx(4.0, rel=0.1)  # a mean would give 1
    clear_cache()


def _direction_ratio(x: torch.Tensor, weighting: str) -> float:
    """RMS per latent element of the condition direction over that of the fidelity direction."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(3)
    eps = F.interpolate(torch.randn(n, 4, 4, 4, generator=g), size=x.shape[-2:], mode="nearest")
    t = torch.tensor([150, 400, 650, 900][:n])
    # Element-wise Gaussian denoisers (data N(m, 0.5^2)) and a decoder that upsamples 8x: the models
    # themselves are the same at every size, so what changes with size is only the condition term.
    real = lambda v, tt, c: _gaussian_x0(v, tt, 0.3)  # noqa: E731
    fake = lambda v, tt, c: _gaussian_x0(v, tt, -0.2)  # noqa: E731
    decode = lambda z: torch.sigmoid(F.interpolate(z[:, :3], scale_factor=8, mode="nearest"))  # noqa: E731
    # lowres, whose evidence grows with the area: an edge map's grows with the length of its edges
    # (2x, not 4x, when an image is scaled 2x), whatever the reduction.
    ext = get_extractor("lowres")
    c = ext.extract(decode(x.flip(0)))
    common = dict(consistency_denoise=fake, decode=decode, condition_weighting=weighting)
    g_fid, _ = losses.generator_direction(x, t, eps, S, real, fake, **common)
    g_all, _ = losses.generator_direction(x, t, eps, S, real, fake, log_likelihood=lambda im: ext.log_likelihood(im, c),
                                          **common)
    rms = lambda v: v.pow(2).mean().sqrt()  # noqa: E731
    return float(rms(g_all - g_fid) / rms(g_fid))


def _gaussian_x0(x_t, t, mean, std=0.5):
    alpha, sigma = S.alpha_sigma(t, x_t)
    return mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x_t - alpha * mean)


@pytest.mark.parametrize("weighting", losses.CONDITION_WEIGHTINGS)
def test_condition_to_fidelity_ratio_per_latent_element_is_the_same_at_64_and_128_px(weighting):
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.randn(4, 4, 4, 4, generator=g), size=8, mode="nearest")  # 64 px latents
    small, large = _direction_ratio(x, weighting), _direction_ratio(up2(x), weighting)  # 128 px, scaled alike
    assert small > 0.01
    assert large / small == pytest.approx(1.0, rel=0.2)  # with a pixel mean it would be 1/4


def test_demo_defaults_hold_no_objective_key():
    """`--ckpt demo` may size the run (resolution, learning rates, EMA, the teacher's CFG) but never
    change the objective: what the demo measures is what an SD1.5 user runs."""
    from jdm_train.demo import TRAIN_DEFAULTS

    assert set(config.OBJECTIVE_KEYS) <= {f.name for f in config.fields(config.TrainConfig)}
    assert not set(TRAIN_DEFAULTS) & set(config.OBJECTIVE_KEYS)
    for key in ("condition_weight", "condition_tau", "condition_weighting", "control_dropout"):
        assert key in config.OBJECTIVE_KEYS
