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
