"""uae-caption-data: shards that the webdataset library reads back with the input's bytes, the
manifest that refuses a rerun with other settings, every input kind, the filters, 2 processes =
1 process, resume after SIGKILL, and each bad input (a corrupt image, a tar sample without an
image, an empty caption from a server, a server that goes down, a wrong model name, an
unwritable output folder) as one line and exit code 2. Most tests use FakeCaptioner below
(`--captioner path/to/this/file.py:FakeCaptioner`), whose caption depends on the pixels and the
seed only; one runs the tiny transformers captioner."""

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from uae.apps.caption_data import main
from uae.caption_data import Caption
from uae.remote import free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE = f"{Path(__file__).resolve()}:FakeCaptioner"
RED = (255, 0, 0)  # an image with a red top-left pixel gets an empty caption (FakeCaptioner, the fake server)


def fake_words(image, seed: int | None) -> list[str]:
    h = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
    n = 3 + int(h[:2], 16) % 10
    return [f"w{h[i:i + 2]}" for i in range(0, 2 * n, 2)] + ([f"s{seed}"] if seed is not None else [])


class FakeCaptioner:
    """Deterministic: words from the pixels' hash, then the seed; at most max_new_tokens words (one
    token each), flagged truncated when it reaches the limit. FAKE_CAPTION_SLEEP: seconds per image."""

    name = "fake"

    def __init__(self, max_new_tokens: int, instruction: str):
        self.max_new_tokens, self.instruction = max_new_tokens, instruction

    def caption(self, images, seeds):
        time.sleep(float(os.environ.get("FAKE_CAPTION_SLEEP", "0")) * len(images))
        out = []
        for im, seed in zip(images, seeds):
            words = [] if im.getpixel((0, 0)) == RED else fake_words(im, seed)[:self.max_new_tokens]
            out.append(Caption(" ".join(words), len(words), len(words) >= self.max_new_tokens))
        return out

    def settings(self):
        return {"kind": "fake"}


def write_image(path: Path, color, fmt=None, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    im.putpixel((size[0] - 1, size[1] - 1), (color[2], color[0], color[1]))  # not a flat image
    im.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    """7 distinct images (jpg, png, webp, nested), a copy of one (a duplicate), a corrupt .jpg."""
    d = tmp_path / "images"
    exts = [".jpg", ".png", ".webp"]
    for i in range(7):
        write_image(d / ("sub" if i % 2 else "") / f"im{i}{exts[i % 3]}", (30 * i, 200 - 20 * i, 7 * i))
    (d / "sub" / "copy.png").write_bytes((d / "im0.jpg").read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d


def run(argv, capsys=None):
    rc = main([str(a) for a in argv] + ["--progress", "false"])
    err = capsys.readouterr().err if capsys else ""
    return rc, err


def read_shards(out: Path) -> dict[str, dict]:
    """Every sample of out/*.tar through the webdataset library, by key."""
    import webdataset as wds

    tars = sorted(str(p) for p in out.glob("*.tar"))
    samples = {}
    for s in wds.WebDataset(tars, shardshuffle=False):
        assert s["__key__"] not in samples, f"duplicate key {s['__key__']}"
        samples[s["__key__"]] = s
    return samples


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(lines) == 1, err
    return lines[0]


def test_shards_read_back_with_the_input_bytes(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(["--input", folder, "--output_dir", out, "--captioner", FAKE, "--shard_size", 3,
                   "--max_new_tokens", 10, "--max_bad_fraction", 0.5], capsys)
    assert rc == 0, err
    # sorted relative paths: broken.jpg, im0, im2, im4, im6, sub/copy.png (a duplicate of im0), sub/im1, im3, im5
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    samples = read_shards(out)
    assert sorted(samples) == [f"{i:09d}" for i in range(1, 8)]  # index 0 is broken.jpg: skipped
    sources = set()
    for key, s in samples.items():
        meta = json.loads(s["json"])
        src = folder / meta["source"]
        ext = src.suffix.lstrip(".")
        assert s[ext] == src.read_bytes(), key  # the original bytes under the original extension
        sources.add(meta["source"])
        caption = s["txt"].decode()
        assert caption == " ".join(fake_words(Image.open(src), meta["index"])[:10])
        assert meta["seed"] == meta["index"] == int(key) and meta["key"] == key
        assert meta["words"] == len(caption.split()) == meta["tokens"]
        assert meta["truncated"] == (meta["tokens"] >= 10)
        assert meta["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert meta["captioner"] == "fake" and meta["settings"]["max_new_tokens"] == 10
    assert "sub/copy.png" not in sources and "im0.jpg" in sources
    stats = [json.loads(p.read_text())["counts"] for p in sorted((out / "stats").glob("*.json"))]
    assert [s["samples"] for s in stats] == [2, 3, 2] and sum(s["corrupt"] for s in stats) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["kind"] == "folder" and manifest["inputs"]["files"] == 9
    assert manifest["shard_size"] == 3 and "250 words" in manifest["instruction"]
    assert manifest["captioner"] == {"captioner": FAKE, "constructed_with": {"max_new_tokens": 10,
                                     "instruction": manifest["instruction"]}, "kind": "fake"}
    assert "1 duplicate(s)" in err and "not decodable 1" in err and not (out / "partial").exists()


def test_rerun_skips_complete_shards_and_refuses_other_settings(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", folder, "--output_dir", out, "--captioner", FAKE, "--shard_size", 4, "--max_bad_fraction", 0.5]
    assert run(args, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    rc, err = run(args, capsys)
    assert rc == 0 and "wrote 0 and found 2 complete" in err
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    rc, err = run(args + ["--seed", 5], capsys)
    assert rc == 2 and "seed 0 then, 5 now" in error_line(err)
    rc, err = run(args[:-4] + ["--instruction", "release", "--max_bad_fraction", 0.5], capsys)
    assert rc == 2 and "instruction" in error_line(err)


def test_two_ranks_write_the_shards_of_one_process(folder, tmp_path, monkeypatch):
    args = ["--input", folder, "--captioner", FAKE, "--shard_size", 2, "--max_bad_fraction", 0.5]
    assert run(args + ["--output_dir", tmp_path / "one"])[0] == 0
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert run(args + ["--output_dir", tmp_path / "two"])[0] == 0
        mine = sorted(int(p.stem) for p in (tmp_path / "two").glob("*.tar"))
        assert all(k % 2 == 1 for k in mine) or rank == 0  # rank 1 ran first: only the odd shards
    one, two = ({p.name: p.read_bytes() for p in (tmp_path / d).glob("*.tar")} for d in ("one", "two"))
    assert len(one) == 4 and one == two  # byte for byte


def make_tars(tmp_path: Path, folder: Path) -> list[Path]:
    """Two webdataset shards of the folder's first images; the second holds a sample without an image."""
    import webdataset as wds

    files = sorted(p for p in folder.rglob("im*"))
    tars = []
    for t, chunk in enumerate((files[:3], files[3:5])):
        path = tmp_path / "in" / f"part-{t:06d}.tar"
        path.parent.mkdir(exist_ok=True)
        with wds.TarWriter(str(path), encoder=False) as w:
            for i, f in enumerate(chunk):
                w.write({"__key__": f"s{t}{i}", f.suffix.lstrip("."): f.read_bytes(), "txt": b"an old caption"})
            if t == 1:
                w.write({"__key__": "notes", "txt": b"not an image", "json": b"{}"})
        tars.append(path)
    return tars


@pytest.mark.parametrize("pattern", ["part-{000000..000001}.tar", "part-*.tar"])
def test_webdataset_input_brace_and_glob(folder, tmp_path, capsys, pattern):
    tars = make_tars(tmp_path, folder)
    out = tmp_path / "out"
    rc, err = run(["--input", str(tmp_path / "in" / pattern), "--output_dir", out, "--captioner", FAKE], capsys)
    assert rc == 0, err
    samples = read_shards(out)
    expected = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            expected += [tf.extractfile(m).read() for m in tf if not m.name.endswith((".txt", ".json"))]
    got = [next(v for k, v in s.items() if k in ("jpg", "png", "webp")) for _, s in sorted(samples.items())]
    assert got == expected
    assert json.loads(samples["000000000"]["json"])["source"] == "part-000000.tar:s00"
    assert "skipped part-000001.tar:notes: no image in this sample" in err and "1 without an image" in err


def test_dataset_input_saved_to_disk_and_parquet(folder, tmp_path, capsys):
    import datasets

    files = sorted(folder.glob("im*"))
    ds = datasets.Dataset.from_dict({"picture": [str(f) for f in files], "n": list(range(len(files)))})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "ds.parquet"))
    for source in (tmp_path / "ds", tmp_path / "ds.parquet"):
        out = tmp_path / f"out-{source.name}"
        rc, err = run(["--input", source, "--output_dir", out, "--captioner", FAKE, "--image_column", "picture"],
                      capsys)
        assert rc == 0, err
        samples = read_shards(out)
        assert [s[files[i].suffix.lstrip(".")] for i, (_, s) in enumerate(sorted(samples.items()))] == \
            [f.read_bytes() for f in files]
    rc, err = run(["--input", tmp_path / "ds", "--output_dir", tmp_path / "x", "--captioner", FAKE], capsys)
    assert rc == 2 and "--image_column image: --input" in error_line(err) and "picture" in error_line(err)


def test_filters_min_words_and_truncated(folder, tmp_path, capsys):
    base = ["--input", folder, "--captioner", FAKE, "--max_bad_fraction", 0.5]
    rc, err = run(base + ["--output_dir", tmp_path / "a", "--min_words", 9], capsys)
    kept = read_shards(tmp_path / "a")
    assert rc == 0 and kept and all(len(s["txt"].split()) >= 9 for s in kept.values())
    assert f"under --min_words {7 - len(kept)}" in err and len(kept) < 7
    rc, err = run(base + ["--output_dir", tmp_path / "b", "--max_new_tokens", 7, "--drop_truncated"], capsys)
    kept = read_shards(tmp_path / "b")
    assert rc == 0 and all(not json.loads(s["json"])["truncated"] for s in kept.values())
    assert f"truncated {7 - len(kept)} (dropped {7 - len(kept)})" in err and len(kept) < 7


def test_corrupt_images_above_the_threshold_stop_the_run(folder, tmp_path, capsys):
    rc, err = run(["--input", folder, "--output_dir", tmp_path / "out", "--captioner", FAKE,
                   "--max_bad_fraction", 0.1], capsys)
    assert rc == 2
    assert "1 of 8 image(s) were bad (1 not decodable, 0 empty caption(s)), above --max_bad_fraction 0.1" \
        in error_line(err)
    assert not list((tmp_path / "out").glob("*.tar"))  # the shard that crossed it was not written


def test_wrong_model_and_unwritable_output(folder, tmp_path, capsys):
    rc, err = run(["--input", folder, "--output_dir", tmp_path / "o", "--captioner", tmp_path / "no-such-model"], capsys)
    assert rc == 2 and "--captioner" in error_line(err) and "no-such-model" in error_line(err)
    rc, err = run(["--input", folder, "--output_dir", tmp_path / "o", "--captioner", "tests/nope.py:Nope"], capsys)
    assert rc == 2 and "no such file tests/nope.py" in error_line(err)
    (tmp_path / "file").write_text("x")
    rc, err = run(["--input", folder, "--output_dir", tmp_path / "file" / "out", "--captioner", FAKE], capsys)
    assert rc == 2 and "--output_dir" in error_line(err) and "is a file, not a folder" in error_line(err)


# ----------------------------------------------------------------------------- an OpenAI-compatible server
class FakeServer:
    """Chat completions of one model ("fake-vlm"): the caption of the image in the request
    (fake_words with the request's seed, at most max_tokens words of one token each), its
    finish_reason ("length" when it reached max_tokens) and usage; with `bare`, the text alone (a
    server that says neither). "" for an image with a red corner; HTTP 503 once `fail_after`
    requests were answered; 404 for another model name."""

    def __init__(self, fail_after: int | None = None, bare: bool = False):
        self.fail_after, self.answered, self.bare = fail_after, 0, bare
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(200, {"data": [{"id": "fake-vlm"}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if req["model"] != "fake-vlm":
                    return self.reply(404, {"error": f"model {req['model']} does not exist"})
                with server.lock:
                    if server.fail_after is not None and server.answered >= server.fail_after:
                        return self.reply(503, {"error": "overloaded"})
                    server.answered += 1
                url = next(p for p in req["messages"][0]["content"] if p["type"] == "image_url")["image_url"]["url"]
                im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                words = [] if im.convert("RGB").getpixel((0, 0)) == RED else fake_words(im, req.get("seed"))
                words = words[:req["max_tokens"]]
                choice = {"message": {"role": "assistant", "content": " ".join(words)}}
                if server.bare:
                    return self.reply(200, {"choices": [choice]})
                choice["finish_reason"] = "length" if len(words) >= req["max_tokens"] else "stop"
                self.reply(200, {"choices": [choice], "usage": {"completion_tokens": len(words)}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def remote_args(folder, out, url, *extra):
    return ["--input", folder, "--output_dir", out, "--captioner", f"openai:{url}", "--remote_retries", 1,
            "--remote_backoff_s", 0.01, "--remote_timeout_s", 10, "--remote_concurrency", 2, "--shard_size", 3, *extra]


def test_server_captioner(folder, tmp_path, capsys, server):
    """The request's seed, the server's token count and finish_reason reach each sample's JSON."""
    rc, err = run(remote_args(folder, tmp_path / "out", server.url, "--max_bad_fraction", 0.5,
                              "--max_new_tokens", 8), capsys)
    assert rc == 0, err
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 7 and server.answered == 7
    cut = []
    for s in samples.values():
        meta = json.loads(s["json"])
        words = fake_words(Image.open(folder / meta["source"]), meta["seed"])
        assert s["txt"].decode() == " ".join(words[:8]) and meta["seed"] == meta["index"]
        assert meta["captioner"] == "openai:fake-vlm" and meta["tokens"] == min(len(words), 8)
        assert meta["truncated"] == (len(words) >= 8)
        cut.append(meta["truncated"])
    assert True in cut and False in cut  # both kinds were seen
    assert "truncated %d" % cut.count(True) in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["captioner"]["model"] == "fake-vlm"  # the server's only model, asked for (GET /models)


def test_server_that_says_neither_token_count_nor_finish_reason(folder, tmp_path, capsys):
    bare = FakeServer(bare=True)
    try:
        rc, err = run(remote_args(folder, tmp_path / "out", bare.url, "--max_bad_fraction", 0.5), capsys)
    finally:
        bare.close()
    assert rc == 0, err
    metas = [json.loads(s["json"]) for s in read_shards(tmp_path / "out").values()]
    assert len(metas) == 7 and all(m["tokens"] is None and m["truncated"] is None for m in metas)


def test_client_returns_finish_reason_usage_and_the_seed(server):
    from uae.remote import ChatClient, RemoteError, image_part

    client = ChatClient(server.url, sampling={"max_tokens": 4}, concurrency=2, retries=0)
    ims = [Image.new("RGB", (8, 8), (i, 40, 90)) for i in range(3)]
    convs = [[{"role": "user", "content": [image_part(im)]}] for im in ims]
    got = client.chat_many(convs, seeds=[5, 6, 7])
    assert [c.seed for c in got] == [5, 6, 7]
    assert [c.text for c in got] == [" ".join(fake_words(im, seed)[:4]) for im, seed in zip(ims, (5, 6, 7))]
    assert client.complete_many(convs) == [" ".join(fake_words(im, None)[:4]) for im in ims]  # no seed sent
    assert all(c.finish_reason == "length" and c.truncated and c.tokens == 4 for c in got)
    server.fail_after = server.answered + 1  # one more answer, then 503s
    with pytest.raises(RemoteError) as e:
        ChatClient(server.url, "fake-vlm", sampling={"max_tokens": 4}, concurrency=1, retries=0).complete_many(convs)
    assert e.value.done == {0: " ".join(fake_words(ims[0], None)[:4])}  # complete_many's done: texts


def test_empty_caption_from_the_server(folder, tmp_path, capsys, server):
    write_image(folder / "zz-red.png", RED)
    rc, err = run(remote_args(folder, tmp_path / "a", server.url, "--max_bad_fraction", 0.5), capsys)
    assert rc == 0 and "skipped zz-red.png: the captioner returned an empty caption" in err
    assert len(read_shards(tmp_path / "a")) == 7 and "empty captions 1" in err
    (folder / "broken.jpg").unlink()
    rc, err = run(remote_args(folder, tmp_path / "b", server.url, "--max_bad_fraction", 0), capsys)
    assert rc == 2 and "1 empty caption(s)), above --max_bad_fraction 0.0" in error_line(err)


def test_server_down_keeps_what_was_done_and_a_rerun_finishes(folder, tmp_path, capsys):
    (folder / "broken.jpg").unlink()
    out = tmp_path / "out"
    down = FakeServer(fail_after=5)  # shard 0 (3 images) is done, then 2 of shard 1, then 503s
    try:
        rc, err = run(remote_args(folder, out, down.url, "--remote_model", "fake-vlm", "--remote_concurrency", 1), capsys)
    finally:
        down.close()
    line = error_line(err)
    assert rc == 2 and "HTTP 503" in line and "after 2 attempt(s)" in line
    assert "5 image(s) captioned by this process in this run and kept (2 of shard 000001" in line
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar"]
    assert len((out / "partial" / "000001.jsonl").read_text().splitlines()) == 2
    up = FakeServer()
    try:
        rc, err = run(remote_args(folder, out, up.url, "--remote_model", "fake-vlm"), capsys)
    finally:
        up.close()
    assert rc == 0, err
    assert up.answered == 2  # only what was missing: 2 of shard 1 were kept
    assert sorted(read_shards(out)) == [f"{i:09d}" for i in range(7)]


def test_server_wrong_model_and_server_unreachable(folder, tmp_path, capsys, server):
    rc, err = run(remote_args(folder, tmp_path / "a", server.url, "--remote_model", "gpt-nope"), capsys)
    assert rc == 2 and "refused the request: HTTP 404" in error_line(err) and "gpt-nope" in error_line(err)
    closed = FakeServer()
    closed.close()
    rc, err = run(remote_args(folder, tmp_path / "b", closed.url, "--remote_model", "fake-vlm"), capsys)
    line = error_line(err)
    assert rc == 2 and "cannot connect" in line and "0 image(s) captioned" in line


# ----------------------------------------------------------------------------- real models, processes, kills
def test_tiny_transformers_captioner(folder, tmp_path, capsys):
    (folder / "broken.jpg").unlink()
    files = sorted(folder.glob("im*"))[:3]
    args = ["--captioner", "tiny", "--max_new_tokens", 6, "--temperature", 1.0]
    for d in ("a", "b"):  # the same images in another order of shards: the same caption per seed
        (tmp_path / d).mkdir()
    for f in files:
        (tmp_path / "a" / f.name).write_bytes(f.read_bytes())
    rc, err = run(["--input", tmp_path / "a", "--output_dir", tmp_path / "oa", "--shard_size", 2, *args], capsys)
    assert rc == 0, err
    rc, err = run(["--input", tmp_path / "a", "--output_dir", tmp_path / "ob", "--shard_size", 1, *args], capsys)
    assert rc == 0, err
    a, b = read_shards(tmp_path / "oa"), read_shards(tmp_path / "ob")
    assert len(a) == 3 and {k: s["txt"] for k, s in a.items()} == {k: s["txt"] for k, s in b.items()}
    for s in a.values():
        meta = json.loads(s["json"])
        assert 1 <= meta["tokens"] <= 6 and meta["truncated"] == (meta["tokens"] == 6)
        assert meta["settings"]["captioner_spec"] == "tiny"
    manifest = json.loads((tmp_path / "oa" / "manifest.json").read_text())
    assert manifest["captioner"]["class"] == "Qwen2_5_VLForConditionalGeneration"
    assert manifest["captioner"]["sampling"]["temperature"] == 1.0


@pytest.mark.slow  # measured ~15 s on 2 cores: starts `transformers serve`, three runs through it
def test_a_real_transformers_serve_server_captions_photos(tmp_path, capsys):
    """Acceptance: the tiny Qwen2.5-VL behind a real `transformers serve` captions photographs sent
    as data: URLs; the shards read back with the webdataset library. Each request's seed reaches
    the server's generator (the same captions from another shard layout, others from another
    --seed), and the server's usage and finish_reason fill the JSON's tokens and truncated."""
    from conftest import cpu_server  # here: subprocesses load this file by path (FAKE), without tests/ on sys.path
    from skimage import data

    from uae.random_weights.unified import embedded

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.{'png' if name == 'rocket' else 'jpg'}")
    model = embedded("captioner")
    flags = ["--remote_model", model, "--max_new_tokens", 6, "--temperature", 1.0, "--remote_concurrency", 1]
    with cpu_server(model, tmp_path) as url:
        for out, extra in (("a", ["--shard_size", 2]), ("b", ["--shard_size", 3]), ("c", ["--seed", 100])):
            rc, err = run(["--input", photos, "--output_dir", tmp_path / out, "--captioner", f"openai:{url}",
                           *flags, *extra], capsys)
            assert rc == 0, err
    a, b, c = (read_shards(tmp_path / d) for d in "abc")
    assert sorted(a) == [f"{i:09d}" for i in range(4)] and len(list((tmp_path / "a").glob("*.tar"))) == 2
    for key, s in a.items():
        meta = json.loads(s["json"])
        src = photos / meta["source"]
        assert s[src.suffix.lstrip(".")] == src.read_bytes()
        assert meta["captioner"] == f"openai:{model}" and meta["seed"] == meta["index"] == int(key)
        assert 1 <= meta["tokens"] <= 6 and meta["truncated"] == (meta["tokens"] == 6)  # random weights: 6 mostly
        assert s["txt"].decode().strip() and meta["words"] == len(s["txt"].decode().split())
    assert {k: s["txt"] for k, s in a.items()} == {k: s["txt"] for k, s in b.items()}
    assert {k: s["txt"] for k, s in a.items()} != {k: s["txt"] for k, s in c.items()}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["captioner"]["model"] == str(model) and manifest["captioner"]["sampling"]["max_tokens"] == 6


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow  # measured >8 s on 2 cores: two and one process started with torchrun
def test_torchrun_two_processes_give_the_samples_of_one(folder, tmp_path):
    args = ["--input", folder, "--captioner", FAKE, "--shard_size", 2, "--max_bad_fraction", 0.5,
            "--progress", "false"]
    for n, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
                               "uae.caption_data", *map(str, args), "--output_dir", str(out)],
                              capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ({p.name: p.read_bytes() for p in (tmp_path / d).glob("*.tar")} for d in ("one", "two"))
    assert len(one) == 4 and one == two


@pytest.mark.slow  # measured >8 s on 2 cores: a run killed and a rerun, in subprocesses
def test_sigkill_and_rerun_no_duplicate_nothing_missing(folder, tmp_path):
    args = [sys.executable, "-m", "uae.caption_data", "--input", str(folder), "--captioner", FAKE, "--shard_size", "2",
            "--max_bad_fraction", "0.5", "--progress", "false"]
    out = tmp_path / "out"
    proc = subprocess.Popen(args + ["--output_dir", str(out)], env=_env(FAKE_CAPTION_SLEEP="0.5"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "000000.tar").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (out / "000000.tar").exists() and proc.poll() is None
        time.sleep(0.6)  # into the next shard
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.glob("*.tar")) in (["000000.tar"], ["000000.tar", "000001.tar"])
    done = subprocess.run(args + ["--output_dir", str(out)], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = subprocess.run(args + ["--output_dir", str(tmp_path / "fresh")], env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    resumed, clean = read_shards(out), read_shards(tmp_path / "fresh")
    assert sorted(resumed) == [f"{i:09d}" for i in range(1, 8)]  # read_shards fails on a duplicate key
    assert {k: (s["txt"], s["json"]) for k, s in resumed.items()} == {k: (s["txt"], s["json"]) for k, s in clean.items()}
    assert not list(out.glob(".*.partial"))


def test_shipped_config_and_named_instructions():
    import yaml

    from uae.apps.caption_data import CaptionDataConfig, instruction_text
    from uae.config import parse_config
    from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION

    path = ROOT / "configs" / "data" / "longcap.yaml"
    cfg = parse_config(CaptionDataConfig, ["--config", str(path), "--input", "x", "--output_dir", "y",
                                           "--captioner", "tiny"])
    shipped = yaml.safe_load(path.read_text())["instruction"]
    assert cfg.instruction == shipped == instruction_text("longcap") and "250 words" in shipped
    assert instruction_text("release") == RELEASE_CAPTION_INSTRUCTION and instruction_text("say hi") == "say hi"


def test_uae_encoder_captioner(folder, tmp_path, capsys):
    """uae:tiny: UAE's encoder (its LoRA, the release's prompt layout) with this run's instruction."""
    for f in sorted(folder.glob("im*"))[:2]:
        (tmp_path / "two").mkdir(exist_ok=True)
        (tmp_path / "two" / f.name).write_bytes(f.read_bytes())
    rc, err = run(["--input", tmp_path / "two", "--output_dir", tmp_path / "out", "--captioner", "uae:tiny",
                   "--max_new_tokens", 4, "--instruction", "release"], capsys)
    assert rc == 0, err
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 2
    for s in samples.values():
        meta = json.loads(s["json"])
        assert meta["captioner"] == "uae:tiny" and 1 <= meta["tokens"] <= 4
        assert meta["truncated"] == (meta["tokens"] == 4)
    from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["captioner"]["instruction"] == RELEASE_CAPTION_INSTRUCTION
    assert manifest["captioner"]["sampling"]["max_new_tokens"] == 4
