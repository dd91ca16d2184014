"""Benchmark scripts run (tiny sizes) and report what they measured."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_score_i2i_benchmark_runs_and_matches_the_loop(tmp_path, capsys):
    import bench_score_i2i

    res = bench_score_i2i.main(["--size", "tiny", "--pairs", "4", "--image_size", "128", "--workers", "0",
                                "--floor_batch_sizes", "4", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "pairs/s" in out and "cold / floor time" in out
    assert set(res["pairs_per_s"]) == {"loop", "cold", "warm", "floor"} and all(v > 0 for v in res["pairs_per_s"].values())
    assert res["max_abs_score_diff_vs_loop"]["cold"] < 1e-5
    assert (tmp_path / "r.json").exists()


def test_grpo_benchmark_splits_an_iteration(tmp_path, capsys):
    import bench_grpo

    res = bench_grpo.main(["--preset", "tiny", "--iterations", "1", "--resolution", "32", "--num_steps", "3",
                           "--group_size", "2", "--prompts", "1", "--json", str(tmp_path / "g.json")])
    assert set(res["phase_seconds"]) == {"sampling", "reward", "train", "other"}
    assert abs(sum(res["phase_share"].values()) - 1.0) < 1e-9 and res["phase_seconds"]["train"] > 0
    assert "sampling" in capsys.readouterr().out
