"""Held-out Unified-Bench during training (uae/training/evaluation.py): every trainer evaluates at
the start, every --eval_steps and at the end; the numbers are the Unified-Bench runner's on the same
model and references (an independent path: files written, decoded and scored by the benchmark's
own code); the EMA weights are the ones evaluated; a frozen encoder's captions are made once;
resume does not repeat an evaluation; two processes give the numbers of one."""

import json

import pytest
import torch

import train_grpo
import train_sft
from conftest import read_metrics

EVAL = ["--eval_resolution", 32, "--eval_inference_steps", 2, "--eval_max_new_tokens", 6, "--eval_scorers", "clip",
        "dinov2", "--scorer_weights", "tiny", "--report_to", "none", "--checkpointing_steps", 0]


def _train(stage, ckpt, out, held_out, *extra):
    common = ["--checkpoint", ckpt, "--output_dir", out, "--eval_data", held_out, *EVAL, *extra]
    if stage == "sft":
        argv = ["--config", "tiny", *common, "--validation_steps", 0]
        return train_sft.main([str(a) for a in argv])
    argv = ["--config", f"tiny_{stage}", "--stage", stage, *common, "--image_log_steps", 0]
    return train_grpo.main([str(a) for a in argv])


@pytest.mark.parametrize("stage", ["sft", "cold_start", "g4u", "u4g"])
def test_every_trainer_evaluates_at_start_every_n_steps_and_end(stage, tiny_ckpt, held_out, tmp_path):
    out = tmp_path / stage
    assert _train(stage, tiny_ckpt, out, held_out, "--max_steps", 3, "--eval_steps", 2) == 0
    evals = [r for r in read_metrics(out) if "eval/overall" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in evals:
        assert set(r) >= {"eval/clip", "eval/dinov2", "eval/overall", "eval/caption_words", "eval/caption_tokens",
                          "time_eval"}
        assert abs(r["eval/overall"] - (r["eval/clip"] + r["eval/dinov2"]) / 2) < 1e-9
        assert -1 <= r["eval/clip"] <= 1 and r["eval/caption_tokens"] > 0
    assert (out / "eval.png").stat().st_size > 0 and (out / "eval" / "step_000000.png").exists()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples if "eval_captions" in s] == [0, 2, 3]
    assert sorted(samples[0]["eval_captions"]) == ["camera.jpg", "coffee.jpg"]


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
@pytest.mark.parametrize("stage", ["g4u", "u4g"])
def test_step_zero_equals_the_unified_bench_runner(stage, tiny_ckpt, held_out, tmp_path):
    """Before any update the model is the checkpoint's: the evaluation at step 0 must give the
    runner's scores on the same references, seeds and settings (the runner writes PNGs, reads them
    back and scores files; PNG is lossless, so the pixels are the same)."""
    from uae.apps import unibench

    out = tmp_path / "train"
    assert _train(stage, tiny_ckpt, out, held_out, "--max_steps", 1, "--eval_steps", 1) == 0
    step0 = read_metrics(out)[0]
    assert step0["step"] == 0
    bench = tmp_path / "bench"
    assert unibench.main(["--checkpoint", str(tiny_ckpt), "--ref_path", str(held_out), "--output_dir", str(bench),
                          "--height", "32", "--width", "32", "--steps", "2", "--max_new_tokens", "6", "--models",
                          "clip", "dinov2", "--scorer_weights", "tiny", "--num_workers", "0", "--no_cache"]) == 0
    res = json.loads((bench / "results.json").read_text())
    for name in ("clip", "dinov2"):
        assert abs(step0[f"eval/{name}"] - res[name]["average"]) < 1e-5, (name, step0, res[name])
    words = [len(c.split()) for c in res["captions"].values()]
    assert step0["eval/caption_words"] == sum(words) / len(words)


def test_the_ema_weights_are_evaluated_and_put_back(tiny_ckpt, held_out, tmp_path, monkeypatch):
    from uae.training.evaluation import HeldOut
    from uae.training.run import Run

    seen = []
    real_call, real_init = HeldOut.__call__, Run.__init__

    def spy(self, step):
        run = runs[0]
        if run.ema is not None:  # the evaluated weights are the EMA's
            seen.append(all(torch.equal(p.detach().cpu(), s.cpu()) for p, s in zip(run.trainable, run.ema.shadow_params)))
        return real_call(self, step)

    runs = []
    monkeypatch.setattr(Run, "__init__", lambda self, *a, **k: (runs.append(self), real_init(self, *a, **k))[1])
    monkeypatch.setattr(HeldOut, "__call__", spy)
    assert _train("u4g", tiny_ckpt, tmp_path / "run", held_out, "--max_steps", 2, "--eval_steps", 1, "--use_ema",
                  "--ema_every", 1, "--ema_decay", 0.5) == 0
    run = runs[0]
    assert seen == [True, True, True]
    # Put back: after the run the live LoRA weights are the trained ones, not the average.
    assert not all(torch.equal(p.detach().cpu(), s.cpu()) for p, s in zip(run.trainable, run.ema.shadow_params))


@pytest.mark.parametrize("stage, captioned", [("sft", 2), ("u4g", 2), ("g4u", 6)])
def test_a_frozen_encoder_captions_the_held_out_references_once(stage, captioned, tiny_ckpt, held_out, tmp_path,
                                                                monkeypatch):
    """SFT and stage 3 do not train the LLM: 2 references captioned once for 3 evaluations; stage 2
    trains it: captioned anew at each."""
    from uae.models.uae import UAE

    calls = []
    real = UAE.caption
    monkeypatch.setattr(UAE, "caption", lambda self, images, **k: calls.extend(images) or real(self, images, **k))
    assert _train(stage, tiny_ckpt, tmp_path / "run", held_out, "--max_steps", 2, "--eval_steps", 1) == 0
    assert len(calls) == captioned  # (the trainers caption their own references through the encoder directly)


def test_resume_does_not_repeat_an_evaluation(tiny_ckpt, held_out, interrupt_and_resume):
    """Evaluations at 0, 2 and 4 with a checkpoint at 2: interrupted after it and resumed, the run
    logs each evaluation once, with the uninterrupted run's values."""
    a, b = interrupt_and_resume(
        lambda out, *more: _train("u4g", tiny_ckpt, out, held_out, "--max_steps", 4, "--eval_steps", 2,
                                  "--checkpointing_steps", 2, "--link_unchanged", "false", *more),
        crash_at=2, compare=["dit_lora/adapter_model.safetensors"])
    assert [r["step"] for r in read_metrics(b) if "eval/overall" in r] == [0, 2, 4]


def test_eval_steps_without_eval_data_is_a_clear_error(capsys):
    assert train_grpo.main(["--data", "x", "--eval_steps", "5"]) == 2
    assert "--eval_steps 5 needs --eval_data" in capsys.readouterr().err
    assert train_sft.main(["--data", "x", "--eval_steps", "5", "--eval_data", "x", "--eval_scorers", "nope"]) == 2
    assert "--eval_scorers nope" in capsys.readouterr().err
