"""Greedy captions (--do_sample false): every model's captioning side decodes the most likely token
at each step, so a caption is the same for any seed, and settings() say so; sampling flags that
greedy decoding cannot honour are one-line errors."""

import pytest
from PIL import Image

from uae.apps import unibench
from uae.errors import UAEError
from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION
from uae.unified.protocol import RunSettings

GREEDY = RunSettings(caption_instruction=RELEASE_CAPTION_INSTRUCTION, max_new_tokens=6, do_sample=False, height=32,
                     width=32)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from uae.random_weights.unified import build_captioner, build_janus

    d = tmp_path_factory.mktemp("greedy")
    return {"captioner": build_captioner(d / "captioner"), "janus": build_janus(d / "janus")}


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (48, 40), (200, 30, 60))


def _greedy_everywhere(model, image, sampling):
    first, second = model.caption([image], [1]), model.caption([image], [2])
    assert first == second and first[0]
    assert sampling["do_sample"] is False and sampling["decoding"] == "greedy"
    assert sampling["temperature"] == sampling["top_k"] == sampling["top_p"] == "unused: greedy"
    return first


def test_transformers_captioner_greedy(tiny, image):
    from uae.unified.captioner import TransformersCaptioner

    model = TransformersCaptioner(str(tiny["captioner"]), GREEDY)
    _greedy_everywhere(model, image, model.settings_dict()["sampling"])
    assert "temperature" not in model.sampling and "top_k" not in model.sampling
    sampled = TransformersCaptioner(str(tiny["captioner"]), RunSettings(**{**GREEDY.to_dict(), "do_sample": True}))
    assert sampled.caption([image], [1]) != sampled.caption([image], [2])  # the tiny model's sampling does vary


def test_janus_greedy(tiny, image):
    from uae.unified.janus import JanusAdapter

    model = JanusAdapter(str(tiny["janus"]), GREEDY)
    _greedy_everywhere(model, image, model.settings()["caption"]["sampling"])


def test_uae_greedy(tiny_ckpt, tiny_uae, image):
    """UAE's own captioner (the encoder, as demo.py calls it) and the runner's UAE adapter."""
    from uae.unified.uae_model import UAEModel

    model = UAEModel(str(tiny_ckpt), GREEDY)
    caps = _greedy_everywhere(model, image, model.settings()["caption"]["sampling"])
    assert tiny_uae.caption([image], seed=7, max_new_tokens=6, do_sample=False) == caps
    with pytest.raises(UAEError, match="apply to sampling"):
        tiny_uae.caption([image], max_new_tokens=6, do_sample=False, top_k=1)


def test_greedy_flags(capsys):
    from uae.config import parse_config

    cfg = parse_config(unibench.UniBenchConfig, ["--do_sample", "false", "--temperature", "0"])
    assert RunSettings.from_config(cfg, "cpu", "float32").do_sample is False
    for flags, message in [(["--temperature", "0"], "--temperature 0.0: sampling needs a temperature above 0; for "
                                                     "greedy captions use --do_sample false"),
                           (["--do_sample", "false", "--top_k", "1"], "--top_k 1 applies to sampling")]:
        assert unibench.main(flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err)
