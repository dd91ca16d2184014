"""bench/caption_throughput.py end to end on the tiny Qwen2.5-VL: the local captioner one image per
generate() call and batched, and the client against a real `transformers serve` at two
concurrencies, timed in one run; the table printed and the JSON written."""

import json

import pytest


@pytest.mark.slow  # measured ~24 s on 2 cores: builds the tiny captioner and starts `transformers serve`
def test_caption_throughput_bench_measures_every_side_and_prints_its_table(tmp_path, capsys):
    import caption_throughput

    res = caption_throughput.main(["--sizes", "tiny", "--images", "3", "--batch", "2", "--server_images", "3",
                                   "--concurrency", "1", "2", "--max_new_tokens", "4",
                                   "--json", str(tmp_path / "r.json")])
    [run] = res["runs"]
    loc, srv = run["local"], run["server"]
    assert loc["images_per_s"]["single"] > 0 and loc["images_per_s"]["batched"] > 0
    assert loc["ratio_batched_over_single"] == loc["images_per_s"]["batched"] / loc["images_per_s"]["single"]
    assert 0 <= loc["same_captions"] <= 3
    assert set(srv["by_concurrency"]) == {"1", "2"} and srv["ratio_over_first"]["1"] == 1.0
    for r in srv["by_concurrency"].values():  # the server's usage: at most 4 tokens for each of 3 images
        assert r["images_per_s"] > 0 and 3 <= r["tokens"] <= 12
    out = capsys.readouterr().out
    assert res["table"] in out and res["machine"] in out
    assert "| tiny | 0.24 M |" in out and "2 per generate() (sorted)" in out and "ratio 2/1" in out
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["server"] == json.loads(json.dumps(srv))
