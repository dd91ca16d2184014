"""bench/bench_unibench_scale.py end to end at tiny sizes: the runner in a fresh process per size
with its peak RSS measured, and a run killed with SIGKILL resumed without redoing finished work."""

import json

import pytest


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_scale_bench_measures_memory_and_resume(tmp_path, capsys):
    import bench_unibench_scale

    res = bench_unibench_scale.main(["--sizes", "6", "12", "--batch_size", "2", "--kill_after", "2",
                                     "--keep", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")])
    assert [r["references"] for r in res["runs"]] == [6, 12]
    for r in res["runs"]:
        assert r["exit_code"] == 0 and r["valid"] == r["references"] and r["failed"] == 0
        assert r["peak_rss_mb"] > 100 and abs(r["peak_rss_mb_polled"] - r["peak_rss_mb"]) < 0.5 * r["peak_rss_mb"]
    assert res["peak_rss_ratio"] == res["runs"][1]["peak_rss_mb"] / res["runs"][0]["peak_rss_mb"]
    rs = res["resume"]
    assert rs["killed_run"]["killed"] and rs["killed_run"]["exit_code"] == -9 and not rs["killed_run"]["results_json_written"]
    done = rs["at_kill"]["reconstructions"]
    assert 2 <= done < 6
    # The rerun found the finished references, redid none of them, and finished the rest.
    assert rs["rerun"]["log_already_done"] == done and rs["rerun"]["log_to_do"] == 6 - done
    assert rs["redone_reconstructions"] == 0 and rs["rewritten_captions"] == 0
    assert rs["new_reconstructions"] == 6 - done
    assert rs["final"] == {"pairs": 6, "valid": 6, "failed": 0, "captions": 6}
    # Same seeds per reference: the resumed run's results are the uninterrupted run's.
    assert rs["max_abs_score_diff_vs_uninterrupted"] < 1e-6 and rs["captions_equal_uninterrupted"]
    assert json.loads((tmp_path / "r.json").read_text())["resume"]["references"] == 6
    assert "peak RSS 12 / 6 references" in capsys.readouterr().out
