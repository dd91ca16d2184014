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
