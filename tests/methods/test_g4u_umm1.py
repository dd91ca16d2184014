"""Stage 2 for the paper's UMM-1 family beyond UAE: a user's class (docs/examples/llm_conditioned_sd3.py)
whose SD3 DiT is conditioned on the projected hidden states of the same Qwen2.5-VL that captions.
Its images follow the captioner's LoRA, a run trains that LoRA with rewards from those images, the
manifest says the LoRA serves both sides, and the runner's --captioner_lora changes its images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import train_grpo
from conftest import REFS, ROOT, read_metrics, train_g4u

EXAMPLE = f"{ROOT / 'docs' / 'examples' / 'llm_conditioned_sd3.py'}:LLMConditionedSD3"
TINY = json.dumps({"captioner": "tiny", "generator": "tiny"})
MODEL = ["--model", EXAMPLE, "--model_args", TINY]


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    pass


def _g4u(out, *extra, reward=None):
    return train_g4u(out, *MODEL, *extra, reward=reward)


def _pixels(images):
    return [np.asarray(im).astype(np.int16) for im in images]


def test_its_images_follow_the_captioners_lora():
    from uae.rl.captioners import add_captioner_lora
    from uae.train import parse
    from uae.unified.loading import load_model
    from uae.unified.protocol import RunSettings

    settings = RunSettings(steps=2, guidance_scale=3.0, height=32, width=32)
    model = load_model(EXAMPLE, settings, model_args=TINY)
    assert model.conditions_generator
    texts, seeds = ["a red cat on a mat", "a rocket"], [3, 4]
    base = _pixels(model.generate(texts, seeds))
    cfg = parse(["--config", "tiny_g4u", "--data", "x", *MODEL])[0]
    lm = add_captioner_lora(model.captioner.model, cfg)
    model.captioner.model = lm                             # as stage 2 puts the model that trains there
    assert all(np.array_equal(a, b) for a, b in zip(base, _pixels(model.generate(texts, seeds))))  # B = 0
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    moved = _pixels(model.generate(texts, seeds))
    assert all(np.abs(a - b).mean() > 1 for a, b in zip(base, moved))
    with lm.disable_adapter():
        assert all(np.array_equal(a, b) for a, b in zip(base, _pixels(model.generate(texts, seeds))))


def _lora_b(path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_B" in k}


def test_a_run_trains_the_llm_and_the_runner_loads_it_for_both_sides(tmp_path, capsys):
    from uae.apps import unibench

    seen = []

    def reward(images, *args):  # a reward that depends only on the images: the generator's conditioning is the
        seen.append(len(images))  # only way the captions' LLM reaches it
        return [float(np.asarray(im, dtype=np.float32).mean()) / 255 for im in images]

    out = tmp_path / "run"
    assert _g4u(out, "--max_iterations", 3, "--prompts_per_iteration", 1, "--group_size", 4, "--max_new_tokens", 6,
                "--learning_rate", 0.05, reward=reward) == 0
    assert seen == [4, 4, 4]
    assert [r["step"] for r in read_metrics(out) if "reward_mean" in r] == [1, 2, 3]
    final = out / "final"
    manifest = json.loads((final / "uae_checkpoint.json").read_text())
    assert manifest["lora_sides"] == ["caption", "image"] and manifest["model"] == EXAMPLE
    assert manifest["model_args"] == json.loads(TINY)
    assert any(float(v.abs().max()) > 0 for v in _lora_b(final / "captioner_lora").values())  # it learned
    # uae-export cannot load a class's captioner: it says how to merge the LoRA instead.
    from uae.apps import export

    assert export.main(["--checkpoint", str(final), "--output_dir", str(tmp_path / "exported")]) == 2
    assert "merge captioner_lora/ onto it with PEFT" in capsys.readouterr().err

    pixels, captions = {}, {}
    for name, lora in (("base", []), ("trained", ["--captioner_lora", final / "captioner_lora"])):
        flags = ["--ref_path", REFS, "--output_dir", tmp_path / name,
                 "--max_new_tokens", 6, "--steps", 2, "--height", 32, "--width", 32, "--models", "clip",
                 "--scorer_weights", "tiny", "--num_workers", 0, "--no_cache", *MODEL, *lora]
        assert unibench.main([str(a) for a in flags]) == 0
        captions[name] = json.loads((tmp_path / name / "results.json").read_text())["captions"]
        pixels[name] = {p.stem: _pixels([Image.open(p)])[0] for p in sorted((tmp_path / name / "recon").iterdir())}
    assert pixels["base"].keys() == pixels["trained"].keys() and pixels["base"]
    # The LoRA loads onto both sides (that the images follow it for one fixed caption, not only
    # through other captions: test_the_same_captions_give_other_images_once_trained).
    assert captions["base"] != captions["trained"]
    assert any(np.abs(pixels["base"][k] - pixels["trained"][k]).mean() > 1 for k in pixels["base"])


def test_the_same_captions_give_other_images_once_trained(tmp_path):
    """The runner's generator reads the LoRA (not only the captions it writes): regenerate one fixed
    caption with the base and with a LoRA loaded by the runner's own loader."""
    from uae.rl.captioners import add_captioner_lora
    from uae.train import parse
    from uae.unified.loading import apply_captioner_lora, load_model
    from uae.unified.protocol import RunSettings

    settings = RunSettings(steps=2, guidance_scale=3.0, height=32, width=32)
    trained = load_model(EXAMPLE, settings, model_args=TINY)
    lm = add_captioner_lora(trained.captioner.model, parse(["--config", "tiny_g4u", "--data", "x", *MODEL])[0])
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    lm.save_pretrained(tmp_path / "captioner_lora")
    (tmp_path / "uae_checkpoint.json").write_text(json.dumps({"lora_sides": ["caption", "image"]}))
    trained.captioner.model = lm
    expected = _pixels(trained.generate(["a cat"], [7]))

    loaded = load_model(EXAMPLE, settings, model_args=TINY)
    base = _pixels(loaded.generate(["a cat"], [7]))
    apply_captioner_lora(loaded, str(tmp_path / "captioner_lora"))
    again = _pixels(loaded.generate(["a cat"], [7]))
    assert np.abs(base[0] - again[0]).mean() > 1
    assert np.abs(expected[0] - again[0]).max() <= 1  # the same LoRA, saved and loaded: the trained images


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    def err(*flags):
        assert train_grpo.main(["--stage", "g4u", "--data", "x", *map(str, flags)]) == 2
        return capsys.readouterr().err

    assert "leave --frozen_generator unset" in err(*MODEL, "--frozen_generator", "true")
    assert "only --model janus generates its images as tokens" in err(*MODEL, "--train_tokens", "both")
    assert "--model_args is for --model module:Class" in err("--model", "janus", "--model_args", TINY)
    assert "uses --model_args" in err(*MODEL, "--captioner", "tiny")
    assert "choose uae, janus, pipeline, or module:Class" in err("--model", "nonsense")
    # A class without a captioning side cannot be trained: said before anything trains.
    plain = tmp_path / "plain.py"
    plain.write_text((ROOT / "docs" / "examples" / "my_model.py").read_text())
    msg = err("--config", "tiny_g4u", "--model", f"{plain}:EchoModel", "--output_dir", tmp_path / "o", "--data",
              REFS, "--scorer_weights", "tiny", "--device", "cpu")
    assert "EchoModel has no transformers captioner to train" in msg and "Traceback" not in msg
