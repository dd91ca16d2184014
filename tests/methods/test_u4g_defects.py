"""Stage 3's defects of issue 29 (item 3), each pinned: captions kept only for the settings they were
made with, optimizer-step shares even across processes, no two stages' models in memory at once,
TRL's bias-corrected KL as an option, the EMA cadence, and no LoRA dropout in RL."""

import gc
import json
import shutil
import weakref

import pytest
import torch

import train_grpo
from conftest import REFS
from conftest import read_metrics as _metrics


def _u4g(ckpt, out, *extra):
    argv = ["--config", "configs/grpo/tiny_u4g.yaml", "--checkpoint", ckpt, "--data", REFS, "--output_dir", out,
            "--scorer_weights", "tiny", "--max_iterations", 1, "--image_log_steps", 0, "--checkpointing_steps", 0,
            *extra]
    return train_grpo.main([str(a) for a in argv])


# ----------------------------------------------------------------------------- f. LoRA dropout
def test_lora_dropout_of_a_release_adapter_leaves_the_first_ratio_at_one(tiny_ckpt, tmp_path, capsys):
    """A dit_lora whose adapter_config.json says lora_dropout 0.1: in .train() mode the training
    forward would drop LoRA activations the rollout kept. Stage 3 sets the dropout to 0 (and says
    so): the first update's ratio is that of the rollout policy itself, exactly 1."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    config = ckpt / "dit_lora" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_dropout": 0.1}))
    assert _u4g(ckpt, tmp_path / "run", "--train_batch_size", 4) == 0
    (rec,) = _metrics(tmp_path / "run")
    assert rec["first_ratio_min"] == rec["first_ratio_max"] == 1.0 and rec["ratio_dev_first_update"] == 0.0
    assert "lora_dropout 0.1 is set to 0" in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "final" / "dit_lora" / "adapter_config.json").read_text())
    assert saved["lora_dropout"] == 0.0


# ----------------------------------------------------------------------------- c. one stage's model at a time
@pytest.mark.slow  # measured >8 s on 2 cores
def test_all_stages_free_the_previous_stage_model_before_the_next_loads(tiny_ckpt, tmp_path, monkeypatch):
    """--stage all: when a stage loads its model, no model of an earlier stage is alive (at full
    size, two UAEs are about 2 x 33 GB). The collector is off during the run, so only the release
    between stages can free what reference cycles hold."""
    import uae.train
    from uae.models.uae import UAE

    real_load, real_stage = UAE.from_pretrained.__func__, uae.train.run_stage
    loaded, current, stale = [], [None], []

    def load(cls, *a, **k):
        stale.extend((stage, current[0]) for stage, ref in loaded if stage != current[0] and ref() is not None)
        model = real_load(cls, *a, **k)
        loaded.append((current[0], weakref.ref(model)))
        return model

    def stage(cfg, *a, **k):
        current[0] = cfg.stage
        return real_stage(cfg, *a, **k)

    monkeypatch.setattr(UAE, "from_pretrained", classmethod(load))
    monkeypatch.setattr(uae.train, "run_stage", stage)
    argv = ["--config", "configs/grpo/tiny_all.yaml", "--checkpoint", tiny_ckpt, "--output_dir",
            tmp_path / "all", "--scorer_weights", "tiny", "--max_steps", 1, "--image_log_steps", 0,
            "--checkpointing_steps", 0]
    gc.disable()
    try:
        assert train_grpo.main([str(a) for a in argv]) == 0
    finally:
        gc.enable()
    assert {stage for stage, _ in loaded} == {"cold_start", "g4u", "u4g"}
    assert stale == []  # (earlier stage, loading stage) of every model still alive at a later stage's load


# ----------------------------------------------------------------------------- d. TRL's bias-corrected KL
def test_k3_kl_and_its_bias_correction_match_a_hand_computation():
    """TRL 1.16 (`use_bias_correction_kl=True`, its default): per_token_kl = (exp(ref - lp) - (ref -
    lp) - 1) * exp(lp - old), the ratio not detached. Same value on-policy; the gradient becomes
    lp - ref instead of 1 - exp(ref - lp)."""
    import math

    from uae.rl.kl import k3_kl

    lp_, ref_, old_ = [-1.2, -0.3, -2.5], [-1.0, -0.9, -2.5], [-1.1, -0.3, -2.0]
    lp, ref, old = (torch.tensor(v, dtype=torch.float64) for v in (lp_, ref_, old_))
    k3 = [math.exp(r - l) - (r - l) - 1 for l, r in zip(lp_, ref_)]
    assert torch.allclose(k3_kl(lp, ref), torch.tensor(k3, dtype=torch.float64), rtol=1e-12, atol=0)
    corrected = [k * math.exp(l - o) for k, l, o in zip(k3, lp_, old_)]
    assert torch.allclose(k3_kl(lp, ref, old), torch.tensor(corrected, dtype=torch.float64), rtol=1e-12, atol=0)
    # On-policy (old = lp, detached): the same value, another gradient.
    for correct, expected in ((False, [1 - math.exp(r - l) for l, r in zip(lp_, ref_)]),
                              (True, [l - r for l, r in zip(lp_, ref_)])):
        x = lp.clone().requires_grad_(True)
        kl = k3_kl(x, ref, x.detach() if correct else None)
        assert torch.allclose(kl.detach(), torch.tensor(k3, dtype=torch.float64), rtol=1e-12, atol=0)
        kl.sum().backward()
        assert torch.allclose(x.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15), correct


def test_u4g_refuses_the_bias_correction_of_a_closed_form_kl():
    from uae.errors import UAEError
    from uae.train import parse

    assert parse(["--config", "configs/grpo/tiny_u4g.yaml"])[0].use_bias_correction_kl is False  # Flow-GRPO's
    with pytest.raises(UAEError, match="closed form") as e:
        parse(["--config", "configs/grpo/tiny_u4g.yaml", "--use_bias_correction_kl"])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- e. the EMA cadence
def test_u4g_ema_is_one_update_after_every_eighth_optimizer_step():
    """Stage 3's EMA (configs/grpo/u4g.yaml): one update after optimizer steps 8, 16, ... with
    decay min((1 + s) / (10 + s), 0.9), s = steps - 1, whatever the GPU count. (Flow-GRPO steps its
    EMA after every training batch while (step + 1) % 8 == 0: k updates in a row, k the batches per
    optimizer step per GPU: docs/unified-grpo.md.) The weight is set to the step number before each
    hook call, so the average is computed by hand."""
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    from uae.train import parse
    from uae.training.run import Run

    cfg = parse(["--config", "configs/grpo/u4g.yaml", "--data", "x"])[0]
    assert (cfg.use_ema, cfg.ema_every, cfg.ema_decay) == (True, 8, 0.9)
    weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    run = SimpleNamespace(cfg=cfg, steps=SimpleNamespace(count=0), trainable=[weight],
                          ema=EMAModel([weight], decay=cfg.ema_decay))
    run._ema_view = lambda: Run._ema_view(run)
    expected = 0.0
    for step in range(1, 25):
        with torch.no_grad():
            weight.fill_(step)
        Run.optimizer_stepped(run)
        if step % 8 == 0:
            d = min(step / (9 + step), 0.9)
            expected = d * expected + (1 - d) * step
        assert run.ema.shadow_params[0].item() == pytest.approx(expected, rel=1e-12), step
    assert run.ema.optimization_step == 24 and expected > 0


# ----------------------------------------------------------------------------- a. stale captions
def _captions(out):
    return [json.loads(line)["caption"] for line in (out / "captions.jsonl").read_text().splitlines()]


def _poison(out):
    """Every caption of out/captions.jsonl replaced (its settings record left as it is)."""
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    (out / "captions.jsonl").write_text("".join(json.dumps({**r, "caption": "STALE"}) + "\n" for r in lines))


@pytest.mark.slow  # measured >8 s on 2 cores
def test_a_fresh_run_captions_again_when_the_captions_were_made_with_other_settings(tiny_ckpt, tmp_path, capsys):
    first, second, third = (tmp_path / n for n in ("first", "second", "third"))
    assert _u4g(tiny_ckpt, first, "--seed", 0) == 0
    record = json.loads((first / "captions.settings.json").read_text())
    assert record["seed"] == 0 and record["temperature"] == 0.7 and record["use_data_captions"] is False
    # A fresh folder holding seed 0's file (overwritten with other captions), for a run with seed 1.
    second.mkdir()
    for name in ("captions.jsonl", "captions.settings.json"):
        shutil.copy(first / name, second / name)
    _poison(second)
    assert _u4g(tiny_ckpt, second, "--seed", 1) == 0
    assert "STALE" not in _captions(second)
    assert "seed 0 then, 1 now" in capsys.readouterr().err
    assert json.loads((second / "captions.settings.json").read_text())["seed"] == 1
    # The same settings: the file is used as it is (no captioning).
    third.mkdir()
    for name in ("captions.jsonl", "captions.settings.json"):
        shutil.copy(second / name, third / name)
    _poison(third)
    assert _u4g(tiny_ckpt, third, "--seed", 1) == 0
    assert set(_captions(third)) == {"STALE"} and "captioning the references again" not in capsys.readouterr().err


@pytest.mark.slow  # measured >8 s on 2 cores
def test_a_resumed_run_is_refused_when_its_encoder_changed(tiny_ckpt, tmp_path, capsys):
    """A resumed run trained on its captions.jsonl: captioning again would change its prompts
    mid-run, so a changed encoder is a one-line error."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "run"
    shutil.copytree(tiny_ckpt, ckpt)
    assert _u4g(ckpt, out, "--checkpointing_steps", 1) == 0
    lora = next((ckpt / "llm_lora").glob("*.safetensors"))
    lora.write_bytes(lora.read_bytes())  # the encoder's files rewritten (as a stage 2 that trained further)
    assert _u4g(ckpt, out, "--max_iterations", 2, "--resume_from_checkpoint", "latest") == 2
    err = capsys.readouterr().err
    assert "holds the prompts this run trained on, made with other settings (encoder" in err
    assert (out / "checkpoint-1").exists() and not (out / "checkpoint-2").exists()


@pytest.mark.slow  # measured >8 s on 2 cores
def test_stage_all_into_the_same_folder_captions_again_after_stage_2_changed_the_encoder(tiny_ckpt, tmp_path, capsys):
    """`--stage all` again into the same folder with more steps, where stage 3 had stopped before its
    first checkpoint (it starts again): stages 1 and 2 train further, and stage 3 must not train on
    the captions of the previous encoder."""
    out = tmp_path / "all"
    argv = ["--config", "configs/grpo/tiny_all.yaml", "--checkpoint", tiny_ckpt, "--output_dir", out,
            "--scorer_weights", "tiny", "--image_log_steps", 0, "--checkpointing_steps", 0]
    assert train_grpo.main([str(a) for a in argv + ["--max_steps", 1]]) == 0
    before = json.loads((out / "u4g" / "captions.settings.json").read_text())
    for p in [*(out / "u4g").glob("checkpoint-*"), out / "u4g" / "final"]:
        shutil.rmtree(p)
    (out / "u4g" / "metrics.jsonl").unlink()
    _poison(out / "u4g")
    capsys.readouterr()
    assert train_grpo.main([str(a) for a in argv + ["--max_steps", 2, "--resume_from_checkpoint", "latest"]]) == 0
    assert "STALE" not in _captions(out / "u4g")
    assert "encoder" in capsys.readouterr().err
    assert json.loads((out / "u4g" / "captions.settings.json").read_text())["encoder"] != before["encoder"]
