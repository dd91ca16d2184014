"""Unified-Bench on any unified model: each adapter (UAE, Janus, a transformers captioner + a
diffusers pipeline, a user's class) captions and generates on its tiny random instance, seeded per
item (same seed, same output; another seed, another output; the same with or without batch-mates),
and the runner runs end to end on each; bad settings are one-line errors naming the flag."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uae.apps import unibench
from uae.images import open_image
from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION
from uae.unified.protocol import RunSettings

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Unified-Bench" / "UniBench" / "sample"
HELPERS = ROOT / "tests" / "unified_helpers.py"
FAST = ["--steps", "2", "--height", "32", "--width", "32", "--max_new_tokens", "6", "--scorer_weights", "tiny",
        "--num_workers", "0", "--no_cache", "--models", "clip"]
SETTINGS = RunSettings(caption_instruction=RELEASE_CAPTION_INSTRUCTION, max_new_tokens=6, steps=2, height=32, width=32)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The three random models of uae.random_weights.unified, built once for the module."""
    from uae.random_weights.unified import build_captioner, build_generator, build_janus

    d = tmp_path_factory.mktemp("unified")
    return {"janus": build_janus(d / "janus"), "captioner": build_captioner(d / "captioner"),
            "generator": build_generator(d / "generator")}


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    """A LoRA (PEFT's folder) for the tiny captioner's language model, and a copy of it holding one
    tensor more, at a module the model does not have (PEFT would drop it without a word)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    d = tmp_path_factory.mktemp("loras")
    model = AutoModelForImageTextToText.from_pretrained(tiny["captioner"])
    get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)")).save_pretrained(
        d / "lora")
    shutil.copytree(d / "lora", d / "extra")
    weights = load_file(d / "extra" / "adapter_model.safetensors")
    key = next(k for k in weights if ".layers.0." in k)
    save_file({**weights, key.replace(".layers.0.", ".layers.9."): weights[key].clone()}, d / "extra" / "adapter_model.safetensors")
    return {"lora": d / "lora", "extra": d / "extra"}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Three of the sample photos (the runner's tests use all six)."""
    d = tmp_path_factory.mktemp("refs")
    for p in sorted(SAMPLE.iterdir())[:3]:
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def images(refs):
    return [open_image(p) for p in sorted(refs.iterdir())]


def _pixels(images):
    return [np.asarray(im) for im in images]


def _seeded(model, images):
    """Captions and images: per-item seeds make them independent of batch-mates; a seed repeats its
    output and another seed changes it."""
    caps = model.caption(images[:2], [1, 2])
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)
    assert model.caption(images[:1], [1]) == caps[:1]                     # alone or in a batch: the same
    assert model.caption(images[1:2], [2]) == caps[1:]
    assert model.caption(images[:1], [3]) != caps[:1]                     # another seed, another caption
    texts = ["a red cube on a table", "a mountain lake"]
    ims = model.generate(texts, [1, 2])
    assert len(ims) == 2 and all(isinstance(im, Image.Image) for im in ims)
    again = model.generate(texts[1:], [2]) + model.generate(texts[:1], [1])
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(ims), _pixels(again[::-1])))
    assert not np.array_equal(_pixels(model.generate(texts[:1], [3]))[0], _pixels(ims)[0])
    settings = model.settings()
    json.dumps(settings)
    assert settings["batch_invariant"] is True
    return caps, ims


# ---------------------------------------------------------------------------- the adapters

def test_janus_adapter(tiny, images):
    from uae.unified.janus import JanusAdapter

    model = JanusAdapter(str(tiny["janus"]), SETTINGS)
    _, ims = _seeded(model, images)
    assert all(im.size == (32, 32) for im in ims)                         # fixed by the checkpoint
    s = model.settings()
    assert s["generation"]["image_tokens"] == 16 and s["generation"]["not_applicable"] == ["steps", "height", "width"]
    assert s["caption"]["sampling"]["temperature"] == 0.7 and s["caption"]["instruction"] == RELEASE_CAPTION_INSTRUCTION
    # The image before the instruction, as DeepSeek's demo and transformers' Janus docs write it.
    prompt = model.caption_prompt()
    assert prompt.startswith("<|User|>: <image_placeholder>\nYou are an expert") and prompt.endswith("\n\n<|Assistant|>:")
    # Batched captions run (one call per batch, first seed) and say they are not batch-invariant;
    # dit_batching leaves Janus images as they are (each image draws from its own generator).
    batched = JanusAdapter(str(tiny["janus"]), RunSettings(**{**SETTINGS.to_dict(), "caption_batching": True,
                                                               "dit_batching": True}))
    assert len(batched.caption(images[:2], [1, 2])) == 2
    again = batched.generate(["a red cube on a table", "a mountain lake"], [1, 2])   # _seeded's texts and seeds
    assert len(again) == 2 and all(np.array_equal(a, b) for a, b in zip(_pixels(again), _pixels(ims)))
    assert batched.settings()["batch_invariant"] is False and batched.settings()["generation"]["batch_invariant"]


def test_pipeline_adapter(tiny, images):
    from uae.unified.pipeline import PipelineAdapter

    model = PipelineAdapter(str(tiny["captioner"]), str(tiny["generator"]), SETTINGS)
    _, ims = _seeded(model, images)
    assert all(im.size == (32, 32) for im in ims)
    s = model.settings()
    assert s["generation"]["pipeline"] == "StableDiffusion3Pipeline" and s["generation"]["num_inference_steps"] == 2
    assert s["caption"]["sampling"]["top_k"] == 50                        # from the captioner's generation_config.json
    # dit_batching: one call with one generator per image, the same noise; equal up to rounding.
    batched = PipelineAdapter(str(tiny["captioner"]), str(tiny["generator"]),
                              RunSettings(**{**SETTINGS.to_dict(), "dit_batching": True}))
    b = _pixels(batched.generate(["a red cube on a table", "a mountain lake"], [1, 2]))
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 2 for x, y in zip(b, _pixels(ims)))


def test_uae_model_is_the_facade(tiny_ckpt, tiny_uae, images):
    """--model uae gives what the runner gave before adapters: UAE.caption / UAE.generate with the
    run's settings."""
    from uae.unified.uae_model import UAEModel

    model = UAEModel(str(tiny_ckpt), SETTINGS)
    caps = model.caption(images[:2], [5, 6])
    assert caps == tiny_uae.caption(images[:2], seed=[5, 6], max_new_tokens=6, temperature=0.7, top_k=None,
                                    top_p=None, repetition_penalty=None, batch=False)
    ims = model.generate(caps, [5, 6])
    ref = tiny_uae.generate(caps, seed=[5, 6], height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
                            progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(ims), _pixels(ref)))
    assert model.name == "uae" and model.settings()["batch_invariant"] is True


def test_uae_with_another_captioner(tiny_ckpt, tiny_uae, tiny, images):
    """The Tab. 3 swap: captions from a transformers VLM, images from UAE's own generation path."""
    from uae.unified.captioner import TransformersCaptioner
    from uae.unified.uae_model import UAEModel

    model = UAEModel(str(tiny_ckpt), SETTINGS, captioner=str(tiny["captioner"]), captioner_label="qwen")
    caps = model.caption(images[:2], [1, 2])
    assert caps == TransformersCaptioner(str(tiny["captioner"]), SETTINGS).caption(images[:2], [1, 2])
    ref = tiny_uae.generate(caps, seed=[1, 2], height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
                            progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(model.generate(caps, [1, 2])), _pixels(ref)))
    assert model.name == "qwen+uae" and model.settings()["caption"]["captioner"] == str(tiny["captioner"])


# ---------------------------------------------------------------------------- the runner

def _run(out, *flags, refs=None):
    return unibench.main(["--ref_path", str(refs), "--output_dir", str(out), *FAST, *map(str, flags)])


def _check_run(out, n, size=(32, 32)):
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["valid"] == n and res["summary"]["failed"] == 0
    assert len(res["captions"]) == n and all(isinstance(c, str) for c in res["captions"].values())
    assert all(Image.open(p).size == size for p in (out / "recon").iterdir())
    assert (out / "report.html").exists() and (out / "model.json").exists()
    return res


def test_runner_on_janus(tiny, refs, tmp_path, capsys):
    a = tmp_path / "a"
    assert _run(a, "--model", "janus", "--checkpoint", tiny["janus"], refs=refs) == 0
    res = _check_run(a, 3)
    assert res["meta"]["model"] == "janus" and res["meta"]["model_settings"]["generation"]["image_tokens"] == 16
    # Batch size and resuming change nothing: every caption and image has its own seed.
    b = tmp_path / "b"
    assert _run(b, "--model", "janus", "--checkpoint", tiny["janus"], "--batch_size", 1, refs=refs) == 0
    for p in (a / "recon").iterdir():
        assert p.read_bytes() == (b / "recon" / p.name).read_bytes()
    assert json.loads((b / "results.json").read_text())["captions"] == res["captions"]
    # A rerun into the same folder with another model or seed would mix two runs' outputs: refused.
    before = {p.name: p.read_bytes() for p in (a / "recon").iterdir()}
    for flags, change in ((["--model", "pipeline", "--captioner", tiny["captioner"], "--generator", tiny["generator"]],
                           "model 'janus' then, 'pipeline' now"),
                          (["--model", "janus", "--checkpoint", tiny["janus"], "--seed", 7], "seed 42 then, 7 now")):
        assert _run(a, *flags, refs=refs) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "holds outputs made with other settings" in err[-1] and change in err[-1], err[-1]
    assert {p.name: p.read_bytes() for p in (a / "recon").iterdir()} == before


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_janus_over_two_processes_gives_the_one_process_outputs(tiny, refs, tmp_path):
    """torchrun, 2 CPU processes, batches of 1 dealt round-robin: the captions, images and JSON of
    one process (an in-process run, one thread as in the workers)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = ["--model", "janus", "--checkpoint", tiny["janus"], "--batch_size", 1, "--increment_seed", "--ref_path",
             refs, *FAST]
    assert unibench.main([*map(str, flags), "--output_dir", str(tmp_path / "p1")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(ROOT / "Unified-Bench" / "run_unibench.py"),
                           *map(str, flags), "--output_dir", str(tmp_path / "p2")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One log per node: the first process's info lines only (the other logs warnings and errors).
    assert "process 0/2: 2 batch(es)" in proc.stderr and "process 1/2" not in proc.stderr
    one, two = (json.loads((tmp_path / p / "results.json").read_text()) for p in ("p1", "p2"))
    one.pop("meta"), two.pop("meta")
    assert one == two
    for png in (tmp_path / "p1" / "recon").iterdir():
        assert png.read_bytes() == (tmp_path / "p2" / "recon" / png.name).read_bytes()


def test_runner_on_a_pipeline(tiny, refs, tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--model", "pipeline", "--captioner", tiny["captioner"], "--generator", tiny["generator"],
                "--model_args", '{"max_sequence_length": 64}', refs=refs) == 0
    res = _check_run(out, 3)
    assert res["meta"]["model_settings"]["generation"]["call_kwargs"] == {"max_sequence_length": 64}
    assert res["meta"]["model_label"] == "captioner + generator"


def test_runner_on_uae_with_another_captioner(tiny_ckpt, tiny, refs, tmp_path):
    out = tmp_path / "run"
    assert _run(out, "--model", "uae", "--checkpoint", tiny_ckpt, "--captioner", tiny["captioner"], refs=refs) == 0
    res = _check_run(out, 3)
    assert res["meta"]["model_name"] == "captioner+uae"


def test_runner_on_a_users_class(refs, tmp_path, monkeypatch):
    """module:Class from a file path and from a dotted module name; the class gets the run's
    settings (size) and --model_args."""
    out = tmp_path / "file"
    assert _run(out, "--model", f"{HELPERS}:EchoModel", "--model_args", '{"words": 2, "prefix": "a photo"}',
                "--height", 24, "--width", 40, refs=refs) == 0
    res = _check_run(out, 3, size=(40, 24))
    assert all(c.startswith("a photo of mean colour") and len(c.split(": ")[1].split()) == 2
               for c in res["captions"].values())
    assert res["meta"]["model_settings"]["prefix"] == "a photo"
    monkeypatch.syspath_prepend(str(HELPERS.parent))
    out2 = tmp_path / "module"
    (tmp_path / "args.yaml").write_text("words: 2\nprefix: a photo\n")
    assert _run(out2, "--model", "unified_helpers:EchoModel", "--model_args", tmp_path / "args.yaml",
                "--height", 24, "--width", 40, refs=refs) == 0
    assert json.loads((out2 / "results.json").read_text())["captions"] == res["captions"]
    for p in (out / "recon").iterdir():
        assert p.read_bytes() == (out2 / "recon" / p.name).read_bytes()


def test_runner_regenerates_given_captions(tiny_ckpt, tiny, refs, tmp_path, monkeypatch):
    """Captions of another model (--captions_from) regenerated by a pipeline without a captioner
    (the decoder swap) or by UAE (the Tab. 3 captioner swap, from files): the model never captions."""
    from uae.unified.uae_model import UAEModel

    caps = tmp_path / "caps"
    caps.mkdir()
    given = {p.stem: f"a photo of {p.stem}, seen by another model\n" for p in refs.iterdir()}
    for stem, text in given.items():
        (caps / f"{stem}.txt").write_text(text)
    monkeypatch.setattr(UAEModel, "caption", lambda *a, **k: pytest.fail("UAE captioned"))
    for name, flags in {"pipeline": ["--model", "pipeline", "--generator", tiny["generator"]],
                        "uae": ["--model", "uae", "--checkpoint", tiny_ckpt]}.items():
        out = tmp_path / name
        assert _run(out, *flags, "--captions_from", caps, refs=refs) == 0
        res = _check_run(out, 3)
        assert res["captions"] == {p.name: given[p.stem] for p in refs.iterdir()}
    assert res["meta"]["model_label"] == Path(tiny_ckpt).name and res["meta"]["model_name"] == "uae"
    (caps / f"{sorted(given)[0]}.txt").unlink()                           # one reference without a caption
    assert _run(tmp_path / "partial", "--model", "pipeline", "--generator", tiny["generator"], "--captions_from",
                caps, refs=refs) == 2


def _generator_lora(source, folder, seed=0):
    """A stage-3 style LoRA of pipeline `source` in diffusers' format (uae.rl.flow_backends), B nonzero."""
    from peft import LoraConfig

    from uae.rl.flow_backends import backend_for
    from uae.unified.pipeline import load_text_to_image

    pipe = load_text_to_image(str(source), torch.float32, "--generator")
    backend = backend_for(pipe, 32, 32, "--generator")
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(backend.lora_targets),
                                            init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    backend.save_lora(pipe.transformer, folder)
    return folder


def test_runner_loads_a_generator_lora_in_diffusers_format(tiny, tiny_ckpt, refs, tmp_path, capsys):
    """--generator_lora: a stage-3 LoRA of a pipeline (diffusers' format) changes its images; one
    that does not fit the pipeline, or a model without a pipeline, is a one-line error."""
    caps = tmp_path / "caps"
    caps.mkdir()
    for p in refs.iterdir():
        (caps / f"{p.stem}.txt").write_text(f"a photo of {p.stem}")
    flags = ["--model", "pipeline", "--generator", tiny["generator"], "--captions_from", caps]
    lora = _generator_lora(tiny["generator"], tmp_path / "lora")
    assert _run(tmp_path / "base", *flags, refs=refs) == 0
    assert _run(tmp_path / "lora_run", *flags, "--generator_lora", lora, refs=refs) == 0
    moved = [np.abs(np.asarray(Image.open(tmp_path / "base" / "recon" / p.name), dtype=np.int16)
                    - np.asarray(Image.open(tmp_path / "lora_run" / "recon" / p.name), dtype=np.int16)).mean()
             for p in (tmp_path / "base" / "recon").iterdir()]
    assert len(moved) == 3 and min(moved) > 1, moved
    recorded = json.loads((tmp_path / "lora_run" / "model.json").read_text())
    assert recorded["settings"]["generation"]["generator_lora"] == str(lora)
    # A FLUX LoRA onto the SD3 pipeline: no tensor of it has a place there.
    from uae.random_weights.unified import resolve

    flux_lora = _generator_lora(resolve("tiny-flux", "generator"), tmp_path / "flux_lora")
    for bad, says in ((flux_lora, "does not fit StableDiffusion3Pipeline"),
                      (tmp_path / "caps", "no pytorch_lora_weights.safetensors there")):
        capsys.readouterr()
        assert _run(tmp_path / f"bad_{bad.name}", *flags, "--generator_lora", bad, refs=refs) == 2
        assert says in capsys.readouterr().err
    assert _run(tmp_path / "uae", "--model", "uae", "--checkpoint", tiny_ckpt, "--generator_lora", lora,
                refs=refs) == 2
    assert "UAEModel has no diffusers pipeline to load a LoRA onto" in capsys.readouterr().err


def test_runner_on_tiny_names(refs, tmp_path):
    """`tiny` builds the embedded random models (into the test session's cache) and picks tiny scorers."""
    out = tmp_path / "run"
    flags = [f for f in FAST if f not in ("--scorer_weights", "tiny")]
    code = unibench.main(["--ref_path", str(refs), "--output_dir", str(out), "--model", "pipeline", "--captioner",
                          "tiny", "--generator", "tiny", *flags])
    assert code == 0
    res = _check_run(out, 3)
    assert res["meta"]["scorer_weights"] == "tiny" and res["meta"]["model_name"] == "tiny-captioner+tiny-generator"


# ---------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("flags, message", [
    (["--model", "bogus"], "--model bogus: choose uae, janus, pipeline, or module:Class"),
    (["--model", "pipeline", "--captioner", "tiny"], "--model pipeline needs --generator"),
    (["--model", "pipeline", "--generator", "tiny"], "--model pipeline needs --generator (a diffusers text-to-image "
                                                     "pipeline) and --captioner"),
    (["--generator", "tiny"], "--generator applies to --model pipeline"),
    (["--model", "janus", "--captioner", "tiny"], "--captioner applies to --model pipeline and --model uae"),
    (["--model", "janus", "--model_args", "{}"], "--model_args applies to"),
    (["--model", "x.py:A", "--model_args", "[1, 2]"], "--model_args: expected a mapping"),
    (["--model", "x.py:A", "--model_args", "{a: [1"], "--model_args: neither JSON nor YAML"),
    (["--model", "x.py:A", "--model_args", "nope.yaml"], "--model_args nope.yaml: no such file"),
])
def test_bad_flags(flags, message, capsys):
    assert unibench.main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("flags, message", [
    (["--model", "janus", "--checkpoint", "{ckpt}"], "--checkpoint {ckpt} is a UAE checkpoint"),
    (["--model", "janus", "--checkpoint", "{captioner}"], "holds a 'qwen2_5_vl' model, not a Janus checkpoint"),
    (["--model", "janus", "--checkpoint", "{nowhere}"], "--checkpoint {nowhere}: could not read a transformers"),
    (["--model", "pipeline", "--captioner", "{generator}", "--generator", "{generator}"],
     "--captioner {generator}: could not read a transformers config.json"),
    (["--model", "pipeline", "--captioner", "{captioner}", "--generator", "{ckpt}"],
     "--generator {ckpt} is a UAE checkpoint"),
    (["--model", "pipeline", "--captioner", "{captioner}", "--generator", "{janus}"],
     "--generator {janus}: no diffusers pipeline there"),
    (["--model", "pipeline", "--captioner", "{captioner}", "--generator", "{generator}", "--model_args",
      '{"bogus": 1}'], "--model_args ['bogus']: StableDiffusion3Pipeline.__call__ takes no such argument"),
    (["--model", "uae", "--checkpoint", "{ckpt}", "--captioner", "{ckpt}"], "--captioner {ckpt} is a UAE checkpoint"),
    (["--model", "uae", "--checkpoint", "{janus}"], "--checkpoint {janus} holds a 'janus' model, not a UAE checkpoint"),
    (["--model", "uae", "--checkpoint", "{generator}"], "--checkpoint {generator} is a diffusers pipeline"),
    (["--model", "{helpers}:NoCaption"], "does not implement uae.unified.UnifiedModel: missing caption"),
    (["--model", "{helpers}:Missing"], "has no 'Missing'"),
    (["--model", "{nowhere}.py:A"], "no such file"),
    (["--model", "no_such_module_here:A"], "no module named 'no_such_module_here'"),
    (["--model", "{helpers}:EchoModel", "--model_args", '{"colour": 1}'], "--model_args: "),
    (["--model", "{helpers}:WrongCount"], "returned 2 caption(s) for 3 input(s)"),
    (["--model", "janus", "--checkpoint", "{janus}", "--captioner_lora", "{nowhere}"],
     "--captioner_lora {nowhere}: not a PEFT adapter folder"),
    (["--model", "uae", "--checkpoint", "{ckpt}", "--captioner_lora", "{lora}"],
     "--captioner_lora: UAEModel has no transformers captioner"),
    (["--model", "janus", "--checkpoint", "{janus}", "--captioner_lora", "{lora}"],
     "--captioner_lora {lora} does not fit the captioner (RuntimeError: Error(s) in loading state_dict"),
    (["--model", "pipeline", "--captioner", "{captioner}", "--generator", "{generator}", "--captioner_lora",
      "{extra}"], "--captioner_lora {extra} does not fit the captioner: 1 tensor(s) of the file have no place"),
])
def test_bad_models(flags, message, tiny, tiny_ckpt, loras, refs, tmp_path, capsys):
    """A model of the wrong kind, or one that cannot caption: a one-line error naming the flag, exit 2."""
    paths = {"ckpt": tiny_ckpt, "helpers": HELPERS, "nowhere": tmp_path / "nowhere", **tiny, **loras}

    def fill(text):
        for k, v in paths.items():
            text = text.replace("{" + k + "}", str(v))
        return text

    flags = [fill(f) for f in flags]
    code = _run(tmp_path / "run", *flags, refs=refs)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-5:]
    assert fill(message) in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("flags, weights", [
    ([], "tiny"), (["--model", "janus"], "tiny"), (["--model", "pipeline", "--captioner", "tiny", "--generator", "tiny"], "tiny"),
    (["--captioner", "org/vlm"], "official"), (["--model", "janus", "--checkpoint", "org/janus"], "official"),
    (["--model", "pipeline", "--captioner", "org/vlm", "--generator", "tiny"], "official"),
    (["--model", "pipeline", "--captioner", "org/vlm", "--generator", "org/t2i"], "official"),
    (["--model", "my_model.py:Mine"], "official"), (["--recon_from", "{tmp}"], "official"),
])
def test_scorer_weights_auto_are_tiny_only_for_an_all_tiny_model(flags, weights, tmp_path):
    """`--scorer_weights auto` (the default): random scorers only when every loaded model is an
    embedded random one; another model, a user's class and another system's reconstructions are
    scored with the official weights, whatever --checkpoint's default."""
    from uae.config import parse_config
    from uae.scoring.scorers import resolve_scorer_weights

    cfg = parse_config(unibench.UniBenchConfig, [f.replace("{tmp}", str(tmp_path)) for f in flags])
    assert resolve_scorer_weights(cfg.scorer_weights, cfg.model_is_tiny()) == weights


def test_unified_never_imports_the_random_weight_builders():
    """The adapters only see folders and hub ids; the runner resolves `tiny` (the house's layering)."""
    import ast

    for p in (ROOT / "uae" / "unified").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("uae.random_weights") for n in names), p.name
