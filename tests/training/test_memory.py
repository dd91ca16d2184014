"""Fitting the real models (issue 15), checked where a CPU can: the precision policy of every
trainer, 8-bit AdamW, gradient checkpointing of the LLM, stage 3's prompt-embedding cache and
freed encoder, EMA on the CPU, and demo.py's --offload refusing to run without a GPU."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import demo
import train_sft

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "Unified-Bench" / "UniBench" / "sample.jsonl"


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    """A tiny checkpoint stored in bf16, as the release's weights are."""
    from uae.random_weights import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("bf16") / "ckpt", "tiny", seed=0, dtype="bfloat16")


def _run(kind, ckpt, out, *extra):
    from uae.train import parse
    from uae.training.run import Run

    if kind.startswith("sft"):
        from uae.config import parse_config
        from uae.methods.sft import SFTConfig
        from uae.methods.sft import SFTRecipe

        cfg = parse_config(SFTConfig, ["--config", "configs/sft/tiny.yaml", "--checkpoint", str(ckpt), "--output_dir",
                                       str(out), "--validation_steps", "0", "--max_steps", "1", *map(str, extra)])
        run = Run(cfg, "test")
        recipe = SFTRecipe(run)
    else:
        from uae.methods.cold_start import ColdStartRecipe
        from uae.methods.g4u import G4URecipe
        from uae.methods.u4g import U4GRecipe

        cfg = parse(["--config", f"configs/grpo/tiny_{kind}.yaml", "--checkpoint", str(ckpt), "--output_dir", str(out),
                     "--max_steps", "1", "--scorer_weights", "tiny", "--image_log_steps", "0", *map(str, extra)])[0]
        run = Run(cfg, "test")
        recipe = {"cold_start": ColdStartRecipe, "g4u": G4URecipe, "u4g": U4GRecipe}[kind](run)
    run.train(recipe, cfg.max_steps, kind)
    return recipe


def _frozen_and_trained(recipe):
    """(dtypes of the frozen weights, of the trained ones). A frozen LoRA (the LLM's in SFT, the
    DiT's in g4u) stays fp32 like any LoRA, as the release's PEFT wrapping keeps it: not counted."""
    from uae.models.decoder import unreachable_modules

    trained = {id(p) for p in recipe.trainable}
    dit = recipe.model.decoder.pipe.transformer
    # A fully trained DiT loads in fp32; the modules whose output never reaches the image are
    # frozen inside it (they cannot learn) and keep its fp32.
    unreachable = {id(p) for name in unreachable_modules(dit) for p in dit.get_submodule(name).parameters()}
    modules = [dit, recipe.model.decoder.pipe.vae]
    if recipe.model.encoder is not None:
        modules += [recipe.model.encoder]
    frozen = {p.dtype for m in modules for n, p in m.named_parameters()
              if id(p) not in trained | unreachable and "lora_" not in n}
    return frozen, {p.dtype for p in recipe.trainable}


@pytest.mark.parametrize("kind, extra", [("sft", ["--dit_mode", "lora"]), ("sft", ["--dit_mode", "full"]),
                                         ("cold_start", []), ("g4u", []), ("u4g", [])])
def test_precision_policy_bf16_frozen_fp32_trained(kind, extra, bf16_ckpt, tmp_path):
    recipe = _run(kind, bf16_ckpt, tmp_path / "run", "--mixed_precision", "bf16", *extra)
    frozen, trained = _frozen_and_trained(recipe)
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    state = [v for s in recipe.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    assert state and {v.dtype for v in state} == {torch.float32}
    scorers = getattr(getattr(recipe, "reward", None), "funcs", None)
    if scorers:
        assert {p.dtype for f in scorers for p in f.fn.scorer.parameters()} == {torch.bfloat16}
    if extra == ["--dit_mode", "full"]:  # saved in the dtype of the files it came from, not fp32
        with safe_open(str(tmp_path / "run" / "final" / "dit" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_without_mixed_precision_everything_is_fp32(tiny_ckpt, tmp_path):
    recipe = _run("u4g", tiny_ckpt, tmp_path / "run")
    assert _frozen_and_trained(recipe) == ({torch.float32}, {torch.float32})


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_adamw8bit_keeps_8bit_state_and_says_how_to_install_it(tiny_ckpt, tmp_path, monkeypatch, capsys):
    recipe = _run("sft", tiny_ckpt, tmp_path / "run", "--optimizer", "adamw8bit", "--max_steps", 2)
    kinds = {type(v).__name__ for s in recipe.optimizer.state.values() for v in s.values()}
    assert "OptimState8bit" in kinds
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # as if torchao were not installed
    code = train_sft.main(["--config", "configs/sft/tiny.yaml", "--checkpoint", str(tiny_ckpt), "--output_dir",
                           str(tmp_path / "none"), "--optimizer", "adamw8bit", "--max_steps", "1"])
    assert code == 2 and "pip install torchao" in capsys.readouterr().err


def test_llm_gradient_checkpointing_gives_the_same_gradient(tiny_ckpt, tmp_path):
    from uae.images import to_uint8
    from uae.training.seeding import generator_for

    grads = {}
    for gc in (False, True):
        recipe = _run("cold_start", tiny_ckpt, tmp_path / f"gc{gc}", "--max_steps", 1,
                      *(["--gradient_checkpointing"] if gc else []))
        assert recipe.model.encoder.qwen.is_gradient_checkpointing == gc
        item = recipe.items[0]
        image = item.open()
        for p in recipe.trainable:
            p.grad = None
        recipe.loss(image, item.caption, generator_for(0, 5), recipe.clip.encode_images(to_uint8([image]))).backward()
        grads[gc] = torch.cat([p.grad.flatten() for p in recipe.trainable])
    assert torch.allclose(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_u4g_embeds_each_caption_once_then_frees_the_encoder(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "run"
    recipe = _run("u4g", tiny_ckpt, out, "--cache_dir", tmp_path / "cache")
    assert recipe.model.encoder is None
    files = list((tmp_path / "cache").glob("prompts-*/*.safetensors"))
    assert len(files) == len(set(recipe.captions)) == 6
    # A second run over the same captions reads them back (the captions too): no encoder call.
    from uae.models.encoder import UAEEncoder

    monkeypatch.setattr(UAEEncoder, "embed_pair", lambda *a: pytest.fail("encoder called"))
    monkeypatch.setattr(UAEEncoder, "caption", lambda *a, **k: pytest.fail("encoder called"))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    _run("u4g", tiny_ckpt, out, "--cache_dir", tmp_path / "cache", "--max_steps", 2, "--resume_from_checkpoint", "latest")


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_ema_on_the_cpu_gives_the_same_weights(tiny_ckpt, tmp_path):
    finals = {}
    for where in ("same", "cpu"):
        _run("u4g", tiny_ckpt, tmp_path / where, "--max_steps", 2, "--use_ema", "--ema_every", 1,
             "--ema_device", where, "--link_unchanged", "false")
        from safetensors.torch import load_file

        finals[where] = load_file(str(tmp_path / where / "final" / "dit_lora" / "adapter_model.safetensors"))
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert finals["same"].keys() == finals["cpu"].keys()
    assert all(torch.equal(finals["same"][k], finals["cpu"][k]) for k in finals["same"])


def test_offload_needs_a_gpu(tiny_ckpt, capsys):
    code = demo.main(["--checkpoint", str(tiny_ckpt), "--input_text", "x", "--offload", "--device", "cpu"])
    assert code == 2 and "--offload" in capsys.readouterr().err
