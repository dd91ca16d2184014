"""Steps and guidance the user leaves unset are each model's own: a diffusers pipeline's __call__
defaults (SD3 28 steps and guidance 7.0, FLUX.1-dev 3.5, ...), UAE's release 40 and 5.0; what the
user gives wins; settings() record the values used and which were the model's defaults
(RunSettings.model_defaults carries what was left unset; its numbers stay UAE's, never None)."""

import inspect

import numpy as np
import pytest

from uae.apps import demo, unibench
from uae.config import parse_config
from uae.errors import UAEError
from uae.unified.protocol import RunSettings

UNSET = RunSettings(height=32, width=32, model_defaults=("steps", "guidance_scale"))


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    pass


@pytest.fixture(scope="module")
def generator():
    from uae.random_weights.unified import resolve

    return resolve("tiny", "generator")


def _pixels(images):
    return [np.asarray(im) for im in images]


def test_pipeline_uses_its_own_defaults_unless_given(generator):
    from diffusers import StableDiffusion3Pipeline

    from uae.unified.pipeline import DiffusersGenerator

    own = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    steps, guidance = own["num_inference_steps"].default, own["guidance_scale"].default
    assert (steps, guidance) != (40, 5.0)                                 # not UAE's
    gen = DiffusersGenerator(generator, UNSET)
    s = gen.settings_dict()
    assert (s["num_inference_steps"], s["guidance_scale"]) == (steps, guidance)
    assert s["model_defaults"] == ["guidance_scale", "num_inference_steps"]
    assert "num_inference_steps" not in gen.run_args and "guidance_scale" not in gen.run_args
    # The images are those of the same values given explicitly.
    explicit = DiffusersGenerator(generator, RunSettings(height=32, width=32, steps=steps, guidance_scale=guidance))
    assert explicit.settings_dict()["model_defaults"] == []
    a, b = gen.generate(["a red cube"], [3]), explicit.generate(["a red cube"], [3])
    assert np.array_equal(_pixels(a)[0], _pixels(b)[0])
    # What the user gives wins.
    given = DiffusersGenerator(generator, RunSettings(height=32, width=32, steps=2, guidance_scale=1.5))
    s = given.settings_dict()
    assert (s["num_inference_steps"], s["guidance_scale"], s["model_defaults"]) == (2, 1.5, [])
    with pytest.raises(UAEError, match=r"--model_args \['num_inference_steps'\]: set by --steps too"):
        DiffusersGenerator(generator, RunSettings(height=32, width=32, steps=2), {"num_inference_steps": 3})
    s = DiffusersGenerator(generator, UNSET, {"num_inference_steps": 3}).settings_dict()
    assert s["model_defaults"] == ["guidance_scale"] and s["call_kwargs"] == {"num_inference_steps": 3}


def test_uae_keeps_its_release_values(tiny_uae):
    from uae.unified.uae_model import UAEModel, release_generation_defaults

    release = release_generation_defaults()
    assert release == {"steps": 40, "guidance_scale": 5.0} == {k: getattr(RunSettings(), k) for k in release}
    s = UAEModel.from_model(tiny_uae, UNSET).settings()["generation"]
    assert (s["num_inference_steps"], s["guidance_scale"]) == (40, 5.0)
    assert s["model_defaults"] == ["steps", "guidance_scale"]
    given = RunSettings(height=32, width=32, steps=3, guidance_scale=1.5, model_defaults=("guidance_scale",))
    s = UAEModel.from_model(tiny_uae, given).settings()["generation"]
    assert (s["num_inference_steps"], s["guidance_scale"], s["model_defaults"]) == (3, 5.0, ["guidance_scale"])


def test_flags_leave_steps_and_guidance_unset():
    cfg = parse_config(unibench.UniBenchConfig, [])
    assert cfg.steps is None and cfg.guidance_scale is None
    settings = RunSettings.from_config(cfg, "cpu", "float32")
    assert (settings.steps, settings.guidance_scale, settings.model_defaults) == (40, 5.0, ("steps", "guidance_scale"))
    cfg = parse_config(unibench.UniBenchConfig, ["--steps", "7"])
    settings = RunSettings.from_config(cfg, "cpu", "float32")
    assert (settings.steps, settings.guidance_scale, settings.model_defaults) == (7, 5.0, ("guidance_scale",))
    with pytest.raises(UAEError, match="model_defaults"):
        RunSettings(model_defaults=("height",))
    # The demo (UAE only): unset ones are left to UAE.generate's defaults, given ones passed.
    cfg = parse_config(demo.DemoConfig, ["--input_text", "a cat"])
    assert "num_inference_steps" not in cfg.generate_kwargs() and "guidance_scale" not in cfg.generate_kwargs()
    cfg = parse_config(demo.DemoConfig, ["--input_text", "a cat", "--steps", "3"])
    assert cfg.generate_kwargs()["num_inference_steps"] == 3
