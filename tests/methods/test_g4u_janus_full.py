"""Stage 2 with --captioner_finetune full: every weight of the captioner's language model trains (fp32
master weights), the rest of the model is frozen bit for bit, the KL reference is a frozen copy of the
language model, a resumed run is bit-identical, and final/captioner is a plain model folder that the
runner, uae-gen-bench and uae-export load as a checkpoint."""

import json

import numpy as np
import pytest
import torch

import train_grpo
from conftest import train_g4u

JANUS = ["--model", "janus", "--checkpoint", "tiny", "--captioner_finetune", "full"]
SMALL = ["--prompts_per_iteration", 1, "--group_size", 3, "--max_new_tokens", 4]
# Janus's parts other than the language model, which a full fine-tune leaves as they were.
FROZEN = ("model.vision_model.", "model.aligner.", "model.vqmodel.", "model.generation_embeddings.",
          "model.generation_aligner.", "model.generation_head.", "lm_head.")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    pass


def brightness(images, *rest):
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]


def _g4u(out, *extra, reward=brightness):
    return train_g4u(out, *JANUS, *extra, reward=reward)


def _one_iteration(recipe, adv):
    from uae.rl.iteration import iteration_share

    share = iteration_share(recipe.cfg, 0, len(recipe.refs), 1, 0)
    roll = recipe.rollout(0, share)
    recipe.score_rollout(0, share, roll)
    return recipe.update(roll, torch.tensor(adv))


def test_full_fine_tuning_trains_the_language_model_and_nothing_else(grpo_recipe):
    recipe = grpo_recipe("g4u", "unused", *JANUS, *SMALL, "--beta", 0.1, "--inner_epochs", 2, reward=brightness)
    hf = recipe.hf
    assert recipe.policy is hf and not hasattr(hf, "peft_config")
    names = {id(p): n for n, p in hf.named_parameters()}
    trained = {names[id(p)] for p in recipe.trainable}
    assert trained == {n for n, _ in hf.named_parameters() if n.startswith("model.language_model.")}
    assert all(p.dtype == torch.float32 for p in recipe.trainable)
    assert hf.lm_head.weight is not hf.model.language_model.embed_tokens.weight  # untied, as Janus-Pro's
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    stats = _one_iteration(recipe, [1.0, -1.0, 0.5])
    # The reference is the starting weights: no KL before the first optimizer step, some after it.
    assert abs(stats["first_kl"]) < 1e-7 < stats["kl"]
    after = dict(hf.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in trained)
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(FROZEN))
    assert all(n.startswith(FROZEN) for n in before if n not in trained)
    # The reference stays the starting weights, and without_lora has nothing to switch off.
    copy = recipe.reference.copy
    assert all(torch.equal(before[f"model.language_model.{n}"], p) for n, p in copy.named_parameters())
    from uae.errors import UAEError
    with pytest.raises(UAEError, match="no LoRA to switch off"):
        recipe.captioner.without_lora()


def test_a_resumed_full_fine_tune_is_bit_identical(interrupt_and_resume):
    common = ["--max_iterations", 4, "--checkpointing_steps", 2, *SMALL, "--learning_rate", 0.01, "--inner_epochs", 2,
              "--beta", 0.1]
    a, _ = interrupt_and_resume(lambda out, *more: _g4u(out, *common, *more), crash_at=2,
                                compare=["captioner/model.safetensors"])
    manifest = json.loads((a / "final" / "uae_checkpoint.json").read_text())
    assert manifest["captioner_finetune"] == "full" and manifest["captioner"] == "captioner"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert _g4u(out, "--max_iterations", 1, *SMALL, "--learning_rate", 0.05) == 0
    return out / "final"


def test_final_captioner_is_a_plain_janus_folder_for_the_runner_and_export(full_run, tmp_path, capsys):
    from transformers import JanusForConditionalGeneration

    from uae.apps import export
    from uae.errors import UAEError
    from uae.random_weights.unified import resolve
    from uae.unified.janus import JanusAdapter
    from uae.unified.loading import apply_captioner_lora, load_model
    from uae.unified.protocol import RunSettings

    manifest = json.loads((full_run / "uae_checkpoint.json").read_text())
    assert manifest["captioner_lora"] is None and manifest["trained_sides"] == ["caption", "image"]
    assert not (full_run / "captioner_lora").exists()
    folder = full_run / "captioner"
    model = load_model("janus", RunSettings(), checkpoint=str(folder))  # the runner's --checkpoint
    assert len(model.caption([__import__("PIL.Image").Image.new("RGB", (32, 32))], [0])) == 1
    assert len(model.generate(["a cat"], [0])) == 1
    trained = JanusForConditionalGeneration.from_pretrained(folder).state_dict()
    source = JanusForConditionalGeneration.from_pretrained(resolve("tiny", "janus")).state_dict()
    assert trained.keys() == source.keys()
    changed = {k for k in source if not torch.equal(trained[k], source[k])}
    assert changed and all(k.startswith("model.language_model.") for k in changed)
    # --captioner_lora <a full run> says what to give instead.
    for given in (full_run, folder):
        with pytest.raises(UAEError, match=f"give it as --checkpoint {folder}$"):
            apply_captioner_lora(JanusAdapter(resolve("tiny", "janus"), RunSettings()), str(given))
    out = tmp_path / "exported"
    assert export.main(["--checkpoint", str(full_run), "--output_dir", str(out)]) == 0
    again = JanusForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    assert json.loads((out / "uae_export.json").read_text())["captioner_finetune"] == "full"


@pytest.mark.parametrize("flags, says", [
    (["--model", "uae", "--captioner_finetune", "full"], "full fine-tuning is for --model janus / pipeline"),
    (["--model", "janus", "--captioner_finetune", "full", "--frozen_generator", "true", "--train_tokens", "caption"],
     "use --captioner_finetune lora for the frozen-generator control"),
    (["--model", "janus", "--captioner_finetune", "merged"], "invalid choice"),
])
def test_bad_combinations_are_one_line_errors(flags, says, capsys):
    assert train_grpo.main(["--stage", "g4u", "--data", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
