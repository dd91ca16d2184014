"""bench/janus_batching.py end to end on the tiny Janus: both sides timed in one run, their ratio
printed, the images made both ways identical, the JSON written."""

import json


def test_janus_batching_bench_times_both_sides_and_finds_the_same_images(tmp_path, capsys):
    import janus_batching

    res = janus_batching.main(["--sizes", "tiny", "--images", "4", "--images_per_call", "4", "--single_images", "2",
                               "--json", str(tmp_path / "r.json")])
    [run] = res["runs"]
    assert run["size"] == "tiny" and run["image_tokens"] == 16
    assert run["images_per_s"]["batched"] > 0 and run["images_per_s"]["single"] > 0
    assert run["ratio_batched_over_single"] == run["images_per_s"]["batched"] / run["images_per_s"]["single"]
    assert run["identical_images"] is True
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["images_per_call"] == 4
    assert "4 images per call vs 1" in capsys.readouterr().out
