"""Scorers: parity with each model called through its own processor, symmetry, gradients, text."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from uae.scoring.scorers import SCORERS, load_scorer
from uae.random_weights import tiny_scorer_dir


@pytest.fixture(scope="module")
def scorers():
    return {name: load_scorer(name, str(tiny_scorer_dir() / name)) for name in SCORERS}


def _pil_pairs():
    a = Image.fromarray(data.astronaut())
    b = Image.fromarray(data.chelsea())                      # 451x300: non-square
    c = Image.fromarray(data.coffee()).resize((333, 157))
    return [(a, b), (b, c), (c, a)]


def _u8(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("name", SCORERS)
def test_parity_with_the_models_own_processor(scorers, name):
    from reference_scorers import ReferenceEncoder

    s = scorers[name]
    ref = ReferenceEncoder(name, tiny_scorer_dir() / name)
    with torch.no_grad():
        ours = s.similarity([_u8(a) for a, _ in _pil_pairs()], [_u8(b) for _, b in _pil_pairs()])
    for (a, b), got in zip(_pil_pairs(), ours):
        assert abs(float(got) - ref.similarity(a, b)) < 1e-5


@pytest.mark.parametrize("name", SCORERS)
def test_identical_is_one_and_swap_is_symmetric(scorers, name):
    (a, b), _, _ = _pil_pairs()
    with torch.no_grad():
        same = scorers[name].similarity([_u8(a)], [_u8(a)])
        ab = scorers[name].similarity([_u8(a)], [_u8(b)])
        ba = scorers[name].similarity([_u8(b)], [_u8(a)])
    assert abs(float(same) - 1.0) < 1e-5
    assert torch.allclose(ab, ba, atol=1e-6) and float(ab) < 1.0


@pytest.mark.parametrize("name", SCORERS)
def test_gradients_reach_float_images(scorers, name):
    x = torch.rand(2, 3, 64, 80, requires_grad=True)
    target = torch.rand(2, 3, 64, 80)
    sim = scorers[name].similarity(x, target)
    sim.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_text_features_long_captions(scorers):
    long = "a very detailed description of a red cube on a wooden table " * 12  # > 77 tokens
    for name in ("clip", "longclip"):
        with torch.no_grad():
            t = scorers[name].encode_text([long, "a cat"])
            i = scorers[name].encode_images([_u8(_pil_pairs()[0][0])])
        assert t.shape[0] == 2 and t.shape[1] == i.shape[1]
        assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():  # LongCLIP reads past 77 tokens: the tail of a long caption changes its feature
        lc = scorers["longclip"]
        a, b = lc.encode_text([long + " and a blue sphere", long + " and a green pyramid"])
    assert not torch.allclose(a, b)
