"""The benchmark suite runs end to end on tiny models (bench/gpu_check.sh --small = bench/run_all.py
--profile small) and reports what it measured: one table, JSON and markdown, every benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_gpu_check_small_runs_every_benchmark_on_cpu(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--small", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["profile"] == "small" and not res["failed"]
    r = res["results"]
    # Score_i2i: the four ways were timed, and ours scores what the per-pair loop scores.
    s = r["score_i2i"]
    assert {"loop", "cold", "warm", "floor"} <= set(s["pairs_per_s"]) and all(v > 0 for v in s["pairs_per_s"].values())
    assert s["max_abs_score_diff_vs_loop"]["cold"] < 1e-5 and s["max_abs_score_diff_vs_loop"]["warm"] < 1e-5
    # demo: our decoding produced the bare pipeline's image exactly; both timed.
    d = r["demo"]
    assert d["max_abs_pixel_diff"] == 0.0 and d["seconds"]["ours_decode"] > 0 and d["seconds"]["bare_pipeline"] > 0
    assert d["caption_tokens_per_second"] > 0
    # GRPO: each stage's step split into four phases that add up to the step.
    assert set(r["grpo"]["stages"]) == {"cold_start", "g4u", "u4g"}
    for stage, g in r["grpo"]["stages"].items():
        assert set(g["phase_seconds"]) == {"sampling", "reward", "train", "other"}, stage
        assert abs(sum(g["phase_share"].values()) - 1.0) < 1e-9 and g["phase_seconds"]["train"] > 0, stage
        assert g["peak_rss_mb"] > 0
    assert r["sft"]["seconds_per_step"] > 0
    m = r["memory_plan"]["measured"]  # the stage-3 step run for real, beside its plan
    assert m["measured_peak_gib"] > 0 and m["planned_without_activations_gib"] > 0
    # One table, printed and written: a row per measurement.
    table = (out / "results.md").read_text()
    assert table in proc.stdout
    for row in ("cold vs per-pair loop", "ours vs bare diffusers", "GRPO cold_start step", "GRPO g4u step",
                "GRPO u4g step", "SFT step", "stage-3 step"):
        assert row in table, row


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--small" in proc.stderr


def test_cold_start_bench_compares_gradients_and_measures_memory(tmp_path):
    import bench_cold_start

    res = bench_cold_start.main(["--preset", "tiny", "--resolution", "32", "--steps", "3", "--memory_steps", "2",
                                 "--json", str(tmp_path / "r.json")])
    rows = {r["gradient"]: r for r in res["gradients"]}
    assert set(rows) == {"truncated-1", "truncated-2", "truncated-3", "x0"}
    # Truncated to every step is the exact gradient; to the last step it is not.
    assert abs(rows["truncated-3"]["norm_ratio"] - 1) < 1e-5 and rows["truncated-3"]["cosine"] > 1 - 1e-5
    assert rows["truncated-1"]["norm_ratio"] < 0.9
    assert {(m["steps"], m["checkpointing"]) for m in res["memory"]} == {(2, True), (2, False)}
    assert all(m["peak_mb"] >= 0 and m["seconds"] > 0 for m in res["memory"])
    assert json.loads((tmp_path / "r.json").read_text())["steps"] == 3


def test_memory_plan_counts_what_each_trainer_trains_at_full_size():
    """The plan's trained parameters, counted independently from the architectures: the u4g
    LoRA (r 32 on the attention projections of 38 joint blocks, but the last block's context query,
    whose output that block drops) and SFT's whole DiT (but that query and its norm) + projector."""
    import memory_plan
    from diffusers import SD3Transformer2DModel

    from uae.random_weights import load_preset

    cfg = load_preset("full")
    with torch.device("meta"):
        dit = SD3Transformer2DModel(**cfg["dit"])
    targets = set(cfg["dit_lora"]["target_modules"])
    last = f"transformer_blocks.{cfg['dit']['num_layers'] - 1}.attn."
    dropped = (last + "add_q_proj", last + "norm_added_q")  # they never receive a gradient
    lora = sum(32 * (m.in_features + m.out_features) for n, m in dit.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets) and n not in dropped)
    u4g = memory_plan.plan("u4g")
    assert u4g["trained_parameters"] == lora
    t = u4g["parallel"]["1 GPU"]
    assert abs(t["optimizer"] - 8 * lora) < 1 and abs(t["gradients"] - 4 * lora) < 1  # fp32 AdamW, fp32 grads
    assert u4g["freed"] == ["llm", "projector"]  # stage 3 frees the encoder
    sft = memory_plan.plan("SFT full")
    dit_params = sum(p.numel() for n, p in dit.named_parameters() if not n.startswith(dropped))
    projector = 2048 * 8192 + 8192 + 8192 * 4096 + 4096
    assert sft["trained_parameters"] == dit_params + projector
    # FSDP shards what accelerate wraps (projector and DiT) over 8 GPUs: trained weights / 8.
    assert abs(sft["parallel"]["8 GPUs FSDP"]["trained_weights"] * 8 - sft["parallel"]["1 GPU"]["trained_weights"]) < 8


@pytest.mark.slow  # measured >8 s on 2 cores: builds two full-size trainers on the meta device
def test_memory_plan_counts_stage_3_rollouts_and_a_flux_transformers_lora():
    """Stage 3's rollouts held on a GPU (fp32 latents before and after each trained step, and each
    decoded image), and the FLUX.1-dev row's LoRA, counted independently from the configs."""
    import memory_plan
    from diffusers import FluxTransformer2DModel

    from uae.config import read_yaml
    from uae.paths import MODEL_PRESETS
    from uae.rl.flow_backends import FLUX_LORA_TARGETS

    u4g = read_yaml(str(memory_plan.ROOT / "configs" / "grpo" / "u4g.yaml"))
    per_gpu = u4g["prompts_per_iteration"] * u4g["group_size"] // 8          # 144
    side = u4g["resolution"] // 8                                           # the VAE's 8x
    steps = u4g["num_steps"] - 1                                            # every step but the last trains
    expected = per_gpu * (steps * (2 * 16 * side * side * 4 + 4) + 3 * u4g["resolution"] ** 2 * 4)
    sizes = read_yaml(str(MODEL_PRESETS / "pipelines" / "flux1_dev.yaml"))
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**sizes["transformer"])
    r = u4g["lora_rank"]
    lora = sum(r * (m.in_features + m.out_features) for n, m in flux.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in FLUX_LORA_TARGETS))
    for name in ("u4g", "u4g FLUX.1-dev LoRA"):
        row = memory_plan.plan(name)
        assert row["parallel"]["8 GPUs DDP"]["rollouts"] == expected, name
        assert row["parallel"]["1 GPU"]["rollouts"] == expected * 8, name
    assert row["trained_parameters"] == lora
    assert row["modules_gib"]["dit"] > 22  # a 12B transformer in bf16
