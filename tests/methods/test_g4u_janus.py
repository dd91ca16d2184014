"""Stage 2 on Janus end to end (the paper's UMM-2, x -> caption -> image with one model): the policy
generates the reward's images from its own captions with its own sampling loop, the loss covers the
caption and image tokens of each sample, and the trained LoRA serves both sides in the runner,
uae-gen-bench and uae-export; `--frozen_generator true --train_tokens caption` is the control."""

import json

import numpy as np
import pytest
import torch

import train_grpo
from conftest import read_metrics, train_g4u

JANUS = ["--model", "janus", "--checkpoint", "tiny"]


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    pass


def zero(images, *rest):
    return [0.0] * len(images)


def brightness(images, *rest):
    """A toy reward that only the image tokens can move: the reconstruction's mean grey level."""
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]


def _g4u(out, *extra, reward=None):
    return train_g4u(out, *JANUS, *extra, reward=reward)


def test_the_policy_generates_the_reward_images_and_the_loss_covers_both_sides(grpo_recipe):
    from uae.rl.iteration import iteration_share

    recipe = grpo_recipe("g4u", "unused", *JANUS, "--prompts_per_iteration", 1, "--group_size", 3,
                         "--max_new_tokens", 4, reward=zero)
    cfg = recipe.cfg
    assert (cfg.train_tokens, cfg.frozen_generator, cfg.image_logprob) == ("both", False, "guided")
    assert recipe.model.image_lora  # the held-out evaluation's images by the policy too
    share = iteration_share(cfg, 0, len(recipe.refs), 1, 0)
    roll = recipe.rollout(0, share)
    recipe.score_rollout(0, share, roll)
    n = recipe.model.image_tokens
    assert roll.image.tokens.shape == (3, n) and len(roll.images) == 3
    # One seed per group: the three images of the group come from generators of the same seed, but
    # their captions differ, so their prompts (and mostly their tokens) do too.
    assert roll.image.input_ids.shape[0] == 3
    # The recorded log-probs are the policy's, recomputed teacher-forced (fp32).
    with torch.no_grad():
        again = recipe.image_logprobs(recipe.policy, roll.image, slice(0, 3))
    assert torch.allclose(again, roll.image.sampled_log_probs, atol=1e-5)
    # The loss's sequence: caption tokens, then every image token.
    mask = recipe.loss_mask(roll)
    assert mask.shape == (3, roll.completion.shape[1] + n) and mask[:, -n:].all()
    with torch.no_grad():
        lp = recipe.log_probs(recipe.policy, roll, slice(0, 3))
    assert lp.shape == mask.shape
    # The first update's ratio is exactly 1, and it moves the LoRA.
    before = [p.detach().clone() for p in recipe.trainable]
    stats = recipe.update(roll, torch.tensor([1.0, -1.0, 0.5]))
    assert stats["first_ratio_mean"] == 1.0 and stats["first_ratio_min"] == 1.0
    assert any(not torch.equal(a, p) for a, p in zip(before, recipe.trainable))


@pytest.mark.parametrize("tokens, lens", [("caption", "caption"), ("image", "image")])
def test_train_tokens_choose_the_sequence_of_the_loss(grpo_recipe, tokens, lens):
    from uae.rl.iteration import iteration_share

    recipe = grpo_recipe("g4u", "unused", *JANUS, "--prompts_per_iteration", 1, "--group_size", 2,
                         "--max_new_tokens", 4, "--train_tokens", tokens, reward=zero)
    share = iteration_share(recipe.cfg, 0, len(recipe.refs), 1, 0)
    roll = recipe.rollout(0, share)
    recipe.score_rollout(0, share, roll)
    width = recipe.loss_mask(roll).shape[1]
    assert width == (roll.completion.shape[1] if lens == "caption" else recipe.model.image_tokens)


def test_the_control_generates_with_the_lora_off(grpo_recipe):
    from uae.rl.iteration import iteration_share

    recipe = grpo_recipe("g4u", "unused", *JANUS, "--frozen_generator", "true", "--train_tokens", "caption",
                         "--prompts_per_iteration", 1, "--group_size", 2, "--max_new_tokens", 4, reward=zero)
    assert not recipe.model.image_lora
    share = iteration_share(recipe.cfg, 0, len(recipe.refs), 1, 0)
    roll = recipe.rollout(0, share)
    recipe.score_rollout(0, share, roll)
    assert roll.image is None and len(roll.images) == 2


def test_a_reward_on_the_image_tokens_rises(tmp_path, monkeypatch):
    """A toy reward only the image tokens can move (the share of each image's tokens in the lower half
    of the codebook; the tiny random VQ decoder's pixels hardly vary), read from the tokens the
    trainer sampled, through the whole command line, with the default LoRA (the language model only)."""
    from uae.methods.g4u import G4URecipe

    real = G4URecipe.generate_images

    def generate_images(self, texts, seeds):
        images, image = real(self, texts, seeds)
        for im, row in zip(images, image.tokens):
            im.info["tokens"] = row.tolist()
        return images, image

    monkeypatch.setattr(G4URecipe, "generate_images", generate_images)
    half = None

    def low_tokens(images, *rest):
        nonlocal half
        if half is None:
            from transformers import AutoConfig

            from uae.random_weights.unified import resolve
            half = AutoConfig.from_pretrained(resolve("tiny", "janus")).vq_config.num_embeddings // 2
        return [float(np.mean([t < half for t in im.info["tokens"]])) for im in images]

    out = tmp_path / "run"
    assert _g4u(out, "--train_tokens", "image", "--max_iterations", 12, "--prompts_per_iteration", 1,
                "--group_size", 8, "--learning_rate", 0.05, "--max_new_tokens", 4, reward=low_tokens) == 0
    rec = [r for r in read_metrics(out) if "reward_mean" in r]
    first, last = np.mean([r["reward_mean"] for r in rec[:3]]), np.mean([r["reward_mean"] for r in rec[-3:]])
    spread = np.mean([r["reward_std"] for r in rec[:3]])
    assert last - first > 2 * spread and last > 0.8, (first, last, spread)


def _prompts(tmp_path):
    path = tmp_path / "geneval.jsonl"
    path.write_text("".join(json.dumps({"tag": "single_object", "include": [{"class": c, "count": 1}],
                                        "prompt": f"a photo of a {c}"}) + "\n" for c in ("cat", "bench")))
    return path


def _gen_bench(tmp_path, name, *extra):
    from uae.apps import gen_bench

    out = tmp_path / name
    assert gen_bench.main([str(a) for a in ["--benchmark", "geneval", "--prompts", _prompts(tmp_path), "--output_dir",
                                             out, "--images_per_prompt", 2, "--model", "janus", "--checkpoint", "tiny",
                                             "--device", "cpu", *extra]]) == 0
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two short runs: end to end (the default) and the control (frozen generator, caption tokens)."""
    root = tmp_path_factory.mktemp("janus-runs")
    for name, flags in (("end_to_end", []), ("control", ["--frozen_generator", "true", "--train_tokens", "caption"])):
        assert _g4u(root / name, "--max_iterations", 2, "--prompts_per_iteration", 1, "--group_size", 4,
                    "--learning_rate", 0.05, "--max_new_tokens", 4, *flags,
                    reward=brightness) == 0
    return root


def test_the_trained_lora_serves_both_sides_in_the_runner_and_gen_bench(trained, tmp_path):
    from uae.unified.janus import JanusAdapter
    from uae.unified.loading import apply_captioner_lora
    from uae.unified.protocol import RunSettings
    from uae.random_weights.unified import resolve

    e2e, control = trained / "end_to_end" / "final", trained / "control" / "final"
    manifest = json.loads((e2e / "uae_checkpoint.json").read_text())
    assert manifest["lora_sides"] == ["caption", "image"] and manifest["train_tokens"] == "both"
    assert json.loads((control / "uae_checkpoint.json").read_text())["lora_sides"] == ["caption"]
    for final, image_side in ((e2e, True), (control, False)):
        adapter = JanusAdapter(resolve("tiny", "janus"), RunSettings())
        apply_captioner_lora(adapter, str(final / "captioner_lora"))
        assert adapter.image_lora is image_side
    base = _gen_bench(tmp_path, "base")
    assert len(base) == 4
    assert _gen_bench(tmp_path, "control", "--lora", control / "captioner_lora") == base   # byte-identical
    changed = _gen_bench(tmp_path, "e2e", "--lora", e2e / "captioner_lora")
    assert changed.keys() == base.keys() and changed != base


def test_export_merges_the_lora_into_a_plain_janus_folder(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, JanusForConditionalGeneration

    from uae.apps import export

    final = trained / "end_to_end" / "final"
    out = tmp_path / "exported"
    assert export.main(["--checkpoint", str(final), "--output_dir", str(out)]) == 0
    merged = JanusForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    source = json.loads((final / "uae_checkpoint.json").read_text())["source"]
    reference = PeftModel.from_pretrained(JanusForConditionalGeneration.from_pretrained(source),
                                          str(final / "captioner_lora")).merge_and_unload()
    ours, ref = merged.state_dict(), reference.state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    plain = JanusForConditionalGeneration.from_pretrained(source).state_dict()
    assert any(not torch.equal(ours[k], plain[k]) for k in plain)   # the LoRA is in it
    assert json.loads((out / "uae_export.json").read_text())["lora_sides"] == ["caption", "image"]


@pytest.mark.parametrize("flags, says", [
    (["--model", "uae", "--train_tokens", "image"], "only --model janus generates"),
    (["--model", "janus", "--frozen_generator", "true", "--train_tokens", "both"], "--frozen_generator false"),
    (["--model", "pipeline", "--captioner", "tiny", "--generator", "tiny", "--frozen_generator", "false"],
     "frozen in stage 2"),
    (["--model", "janus", "--image_logprob", "sampled"], "invalid choice"),
])
def test_bad_settings_are_one_line_errors(flags, says, capsys):
    assert train_grpo.main(["--stage", "g4u", "--data", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_a_gen_bench_lora_needs_janus(tmp_path, capsys):
    from uae.apps import gen_bench

    assert gen_bench.main(["--benchmark", "geneval", "--prompts", str(_prompts(tmp_path)), "--output_dir",
                           str(tmp_path / "o"), "--lora", str(tmp_path)]) == 2
    assert "a LoRA for --model janus" in capsys.readouterr().err


def test_interrupted_and_resumed_end_to_end_run_is_bit_identical(interrupt_and_resume):
    common = ["--max_iterations", 4, "--checkpointing_steps", 2, "--prompts_per_iteration", 1, "--group_size", 4,
              "--max_new_tokens", 4, "--learning_rate", 0.05, "--inner_epochs", 2]
    a, _ = interrupt_and_resume(lambda out, *more: _g4u(out, *common, *more, reward=brightness), crash_at=2,
                                compare=["captioner_lora/adapter_model.safetensors"])
    assert json.loads((a / "final" / "uae_checkpoint.json").read_text())["lora_sides"] == ["caption", "image"]
