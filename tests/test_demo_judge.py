"""The demo world's caption judge reads real images right and catches wrong backgrounds, colours and kinds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jdm_train.demo import data, judge


def _image(scene: data.Scene) -> torch.Tensor:
    return torch.from_numpy(data.render(scene)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def heldout():
    return data.batch(range(data.HELDOUT_START, data.HELDOUT_START + 64))


def test_real_images_score_one_and_shuffled_captions_near_chance(heldout):
    images, captions = heldout
    assert judge.caption_scores(images, captions) == {"background": 1.0, "colours": 1.0, "kinds": 1.0,
                                                      "kinds_per_object": 1.0, "all": 1.0}
    other = judge.caption_scores(images, captions[1:] + captions[:1])
    assert other["background"] < 0.5 and other["colours"] < 0.2 and other["all"] < 0.1


def test_mild_blur_keeps_the_reading(heldout):
    images, captions = heldout
    k = torch.tensor([0.25, 0.5, 0.25])
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None]).expand(3, 1, 3, 3), groups=3)
    assert judge.caption_scores(blurred, captions)["kinds"] >= 0.95


@pytest.mark.parametrize("kind", data.SHAPES)
def test_each_kind_is_read_at_the_smallest_size(kind):
    scene = data.Scene(0, "grey", (data.Shape(kind, "red", 20.0, 30.0, 6.0),), None)
    found = judge.read_objects(_image(scene), "grey")
    assert set(found) == {"red"} and found["red"][0] == kind


def test_a_blob_is_no_kind_and_a_wrong_kind_or_colour_is_caught():
    square = _image(data.Scene(0, "black", (data.Shape("square", "yellow", 32.0, 32.0, 14.0),), None))
    caption = "a yellow square on a black background"
    assert judge.caption_scores(square[None], [caption])["all"] == 1.0
    assert judge.caption_scores(square[None], ["a yellow circle on a black background"])["kinds"] == 0.0
    assert judge.caption_scores(square[None], ["a red square on a black background"])["colours"] == 0.0
    assert judge.caption_scores(square[None], ["a yellow square on a grey background"])["background"] == 0.0
    # A heavy blur leaves a yellow blob that matches no template well.
    blob = square
    for _ in range(12):
        blob = F.avg_pool2d(F.pad(blob[None], (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0]
    found = judge.read_objects(blob, "black")
    assert found["yellow"][0] is None, found


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="caption"):
        judge.caption_scores(torch.zeros(2, 3, 64, 64), ["a red circle on a grey background"])


def test_background_entropy_counts_the_backgrounds_used(heldout):
    images, _ = heldout
    black = images[:1] * 0 + 20 / 255  # the world's black
    white = images[:1] * 0 + 240 / 255
    # 3 black, 1 white: -(3/4 log2 3/4 + 1/4 log2 1/4) = 0.811 bits, written out
    assert judge.background_entropy(torch.cat([black, black, black, white])) == pytest.approx(0.8113, abs=1e-4)
    assert judge.background_entropy(torch.cat([white] * 5)) == 0.0
    assert judge.background_entropy(images) > 1.9  # the data: 4 backgrounds, about uniform
