"""Scorers: parity with each model called through its own processor, symmetry, gradients, text."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from uae.scoring.scorers import SCORERS, load_scorer, tiny_scorer_dir


@pytest.fixture(scope="module")
def scorers():
    return {name: load_scorer(name, weights="tiny") for name in SCORERS}


def _pil_pairs():
    a = Image.fromarray(data.astronaut())
    b = Image.fromarray(data.chelsea())                      # 451x300: non-square
    c = Image.fromarray(data.coffee()).resize((333, 157))
    return [(a, b), (b, c), (c, a)]


def _u8(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def _reference_similarity(name, a, b):
    """Independent computation: the model and its own processor (one pair at a time)."""
    import open_clip
    from transformers import AutoImageProcessor, CLIPModel, Dinov2Model, DINOv3ViTModel

    def norm(x):
        return torch.nn.functional.normalize(x.float(), dim=-1)

    folder = tiny_scorer_dir() / name
    if name == "longclip":
        from open_clip.model import build_model_from_openai_state_dict

        from uae.scoring.scorers import load_specs

        spec = load_specs()["longclip"]
        state = torch.load(folder / spec["filename"], weights_only=True)
        # LongCLIP's own rule for its two position tables, applied independently here.
        mask = torch.zeros(state["positional_embedding"].shape[0], 1)
        mask[:20] = 1
        state["positional_embedding"] = state["positional_embedding"] * mask + state.pop("positional_embedding_res") * (1 - mask)
        model = build_model_from_openai_state_dict(state, cast_dtype=None).float().eval()
        p = spec["preprocess"]
        tf = open_clip.image_transform(224, is_train=False, mean=p["mean"], std=p["std"], interpolation="bicubic")
        fa, fb = model.encode_image(tf(a)[None]), model.encode_image(tf(b)[None])
    else:
        proc = AutoImageProcessor.from_pretrained(folder)
        cls = {"clip": CLIPModel, "dinov2": Dinov2Model, "dinov3": DINOv3ViTModel}[name]
        model = cls.from_pretrained(folder).eval()
        pa = proc(images=a, return_tensors="pt").pixel_values
        pb = proc(images=b, return_tensors="pt").pixel_values
        if name == "clip":
            fa, fb = (model.get_image_features(pixel_values=p).pooler_output for p in (pa, pb))
        else:
            fa, fb = (model(pixel_values=p).last_hidden_state[:, 0] for p in (pa, pb))
    return float((norm(fa) * norm(fb)).sum())


@pytest.mark.parametrize("name", SCORERS)
def test_parity_with_the_models_own_processor(scorers, name):
    s = scorers[name]
    with torch.no_grad():
        ours = s.similarity([_u8(a) for a, _ in _pil_pairs()], [_u8(b) for _, b in _pil_pairs()])
        for (a, b), got in zip(_pil_pairs(), ours):
            assert abs(float(got) - _reference_similarity(name, a, b)) < 1e-5


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
