"""The benchmark suite runs end to end on tiny models (bench/gpu_check.sh --small = bench/run_all.py
--profile small) and reports what it measured: one table, JSON and markdown, every benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    # One table, printed and written: a row per measurement.
    table = (out / "results.md").read_text()
    assert table in proc.stdout
    for row in ("cold vs per-pair loop", "ours vs bare diffusers", "GRPO cold_start step", "GRPO g4u step",
                "GRPO u4g step", "SFT step"):
        assert row in table, row


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--small" in proc.stderr


def test_cold_start_bench_compares_gradients_and_measures_memory(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
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
