"""train_grpo.py --stage u4g in-process on the tiny checkpoint: smoke, ratio/KL at the first inner
step, a learning test on a toy reward, exact resume, bad settings."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import demo
import train_grpo
from uae.rl.rewards import TargetImageReward
from uae.training.common import Checkpoints

ROOT = Path(__file__).resolve().parent.parent
REFS = ROOT / "Unified-Bench" / "UniBench" / "sample"


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def grpo(tiny_ckpt, out, *extra, reward=None):
    return train_grpo.main(["--config", "configs/grpo/tiny.yaml", "--checkpoint", str(tiny_ckpt), "--data", str(REFS),
                            "--output_dir", str(out), "--scorer_weights", "tiny", *map(str, extra)], reward=reward)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_smoke_with_the_reconstruction_reward(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert grpo(tiny_ckpt, out, "--max_iterations", 3, "--image_log_steps", 3, "--reward_weights", "clip=1.0",
                "dinov2=0.5", "--text_reward_weight", 0.1) == 0
    rec = _metrics(out)
    assert [r["step"] for r in rec] == [1, 2, 3]
    for key in ("reward_mean", "reward_std", "reward_clip", "reward_dinov2", "reward_longclip_text", "kl", "clip_frac",
                "approx_kl", "ratio_mean", "skipped_groups", "time_sampling", "time_reward", "time_train", "time_other"):
        assert key in rec[0], key
    # First inner step of every iteration: the policy is the rollout policy, so the ratio is exactly 1;
    # in the first iteration the fresh LoRA (B = 0) equals the reference, so the KL is exactly 0.
    assert all(r["first_ratio_min"] == 1.0 == r["first_ratio_max"] for r in rec)
    assert rec[0]["first_kl"] == 0.0
    assert Image.open(out / "grids" / "iter_000003.png").format == "PNG"
    assert Image.open(out / "curves.png").format == "PNG"
    captions = [json.loads(l) for l in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == len(list(REFS.iterdir()))
    img = tmp_path / "after.png"
    assert demo.main(["--checkpoint", str(out / "final"), "--input_text", "x", "--output_path", str(img),
                      "--steps", "2", "--height", "32", "--width", "32"]) == 0, capsys.readouterr().err
    before = load_file(str(tiny_ckpt / "dit_lora" / "adapter_model.safetensors"))
    after = load_file(str(out / "final" / "dit_lora" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)


def test_reward_rises_on_a_toy_task(tiny_ckpt, tmp_path):
    """Reward = similarity to one fixed target image (a white one): a seeded run raises it."""
    out = tmp_path / "learn"
    white = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    assert grpo(tiny_ckpt, out, "--max_iterations", 40, "--learning_rate", 0.01, "--group_size", 8,
                "--sample_batch_size", 8, "--noise_level", 1.0, "--beta", 0, "--checkpointing_steps", 0,
                "--image_log_steps", 0, reward=TargetImageReward(white)) == 0
    rec = _metrics(out)
    first = np.mean([r["reward_mean"] for r in rec[:5]])
    last = np.mean([r["reward_mean"] for r in rec[-5:]])
    noise = np.mean([r["reward_std"] for r in rec[:5]])
    assert last - first > 3 * noise, (first, last, noise)


def test_interrupted_and_resumed_run_is_bit_identical(tiny_ckpt, tmp_path, monkeypatch):
    common = ["--max_iterations", 4, "--checkpointing_steps", 2, "--image_log_steps", 0, "--use_ema", "--ema_every", 1,
              "--link_unchanged", "false"]
    assert grpo(tiny_ckpt, tmp_path / "a", *common) == 0
    real_save = Checkpoints.save

    def crash_after_2(self, acc, step, config):
        path = real_save(self, acc, step, config)
        if step == 2:
            raise KeyboardInterrupt("simulated interruption")
        return path

    monkeypatch.setattr(Checkpoints, "save", crash_after_2)
    with pytest.raises(KeyboardInterrupt):
        grpo(tiny_ckpt, tmp_path / "b", *common)
    monkeypatch.setattr(Checkpoints, "save", real_save)
    assert grpo(tiny_ckpt, tmp_path / "b", *common, "--resume_from_checkpoint", "latest") == 0
    a = load_file(str(tmp_path / "a" / "final" / "dit_lora" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "dit_lora" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rec: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rec]  # noqa: E731
    assert strip(_metrics(tmp_path / "a")) == strip(_metrics(tmp_path / "b"))


def test_bad_settings(capsys):
    assert train_grpo.main(["--data", "x", "--stage", "g4u"]) == 2
    assert train_grpo.main(["--data", "x", "--group_size", "1"]) == 2
    assert train_grpo.main(["--data", "x", "--sde_window", "3", "20"]) == 2
    assert train_grpo.main(["--data", "x", "--reward_weights", "clip:1"]) == 2
    err = capsys.readouterr().err
    assert "available stages are u4g" in err and "--group_size" in err and "--sde_window" in err and "scorer=weight" in err
