"""`uae-report judge` (Unified-Bench Protocol 2): a deterministic judge's exact counts on captions
written by hand, the mirror of swapped runs, the verdict cache, the ranking, the length-controlled
win rate, two processes against one, the client against a local HTTP server and a real
`transformers serve`, and every bad input as one line."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cpu_server

from uae.apps import unibench
from uae.apps.compare import load_run
from uae.apps.judge import length_controlled, parse_verdict
from uae.apps.report import main as report_main
from uae.remote import free_port

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Unified-Bench" / "UniBench" / "sample"
NAMES = ("astronaut.jpg", "camera.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg")

# Words per caption: A longer on astronaut and coffee, B longer on camera, the same length on chelsea
# (the judge below then says "A": a position bias), the same text on rocket (the judge: tie).
CAPTIONS = {
    "A": {"astronaut": "an astronaut in a white suit", "camera": "a man with", "chelsea": "a small tabby cat",
          "coffee": "a cup", "rocket": "a rocket on its pad"},
    "B": {"astronaut": "a person", "camera": "a man with a camera on grass", "chelsea": "a cat on wood",
          "coffee": "cup", "rocket": "a rocket on its pad"},
    "C": {k: "a long and careful description of the whole picture, every part of it" for k in
          ("astronaut", "camera", "chelsea", "coffee", "rocket")},
}

JUDGE_SOURCE = '''
import json


class LongerCaption:
    """Prefers the caption with more words; the same text: tie; the same length: "A" (a position
    bias). A caption holding '???' gets no verdict, ever; one holding '!!' gets one only when asked
    again. Each call appends its number of questions to `log`."""

    sees_images = True

    def __init__(self, log=None, sees_images=True):
        self.log, self.sees_images = log, sees_images

    def judge(self, items):
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps([it.reference for it in items]) + "\\n")
        out = []
        for it in items:
            if self.sees_images:
                assert it.image is not None and it.image.size[0] > 0
            else:  # text mode: no image; the reference caption, where given, in the item and the prompt
                assert it.image is None
                if it.reference_caption:
                    assert it.reference_caption in it.prompt
                    with open(self.log + ".refs", "a") as f:
                        f.write(it.reference_caption + "\\n")
            retried = "previous answer had no verdict" in it.prompt
            a, b = len(it.first.split()), len(it.second.split())
            if "???" in it.first + it.second or ("!!" in it.first + it.second and not retried):
                out.append("Hmm, both have merits.")
            elif it.first == it.second:
                out.append("Reason: the same caption.\\nVerdict: tie")
            elif a >= b:
                out.append(f"Reason: A has {a} words, B {b}.\\nVerdict: A")
            else:
                out.append(f"Reason: B has {b} words, A {a}.\\nVerdict: B")
        return out

    def settings(self):
        return {"rule": "more words"}
'''


def write_captions(run: Path, captions: dict[str, str]) -> None:
    """A run's captions rewritten where the runner's results.json keeps them."""
    res = json.loads((run / "results.json").read_text())
    res["captions"] = {f"{k}.jpg": v for k, v in captions.items()}
    (run / "results.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three run folders written by the real runner (five sample photos) from captions written by
    hand (CAPTIONS): another system's outputs (--captions_from, --recon_from), scored by the tiny
    scorer, so no model runs."""
    tmp = tmp_path_factory.mktemp("judge")
    refs, recon = tmp / "refs", tmp / "recon"
    refs.mkdir()
    recon.mkdir()
    for n in NAMES:
        shutil.copy(SAMPLE / n, refs / n)
        shutil.copy(SAMPLE / n, recon / f"recon_{n}")
    out = {}
    for label in ("A", "B", "C"):
        caps = tmp / f"{label}.jsonl"
        caps.write_text("".join(json.dumps({"image": f"{k}.jpg", "caption": v}) + "\n"
                                for k, v in CAPTIONS[label].items()))
        run = tmp / label
        assert unibench.main(["--recon_from", str(recon), "--captions_from", str(caps), "--ref_path", str(refs),
                              "--checkpoint", "external", "--output_dir", str(run), "--scorer_weights", "tiny",
                              "--models", "clip", "--num_workers", "0"]) == 0
        assert load_run(run).result["captions"]["camera.jpg"] == CAPTIONS[label]["camera"]  # the reader's view
        out[label] = run
    judge_file = tmp / "judge_longer.py"
    judge_file.write_text(JUDGE_SOURCE)
    out["judge"] = f"{judge_file}:LongerCaption"
    return out


def judge(runs, out, *labels, log=None, extra=()):
    args = json.dumps({"log": str(log)}) if log else "{}"
    return report_main(["judge", *(str(runs[k]) for k in labels), "--judge", runs["judge"], "--judge_args", args,
                        "--output_dir", str(out), "--bootstrap", "200", *extra])


def asked(log: Path) -> int:
    return sum(len(json.loads(line)) for line in log.read_text().splitlines()) if log.exists() else 0


def test_a_length_judge_gives_the_expected_counts(runs, tmp_path):
    out = tmp_path / "ab"
    assert judge(runs, out, "A", "B") == 0
    res = json.loads((out / "judge.json").read_text())
    (p,) = res["pairs"]
    # astronaut, coffee: A twice; camera: B twice; chelsea: each order's first (A once, B once); rocket: tie twice
    assert (p["a"], p["b"], p["wins"], p["ties"], p["losses"], p["unparsable"]) == ("A", "B", 5, 2, 3, 0)
    assert p["win_rate"] == pytest.approx(0.6) and p["position_consistency"] == pytest.approx(0.8)
    assert p["words_a"] == pytest.approx(20 / 5) and p["words_b"] == pytest.approx(19 / 5)
    lo, hi = p["win_rate_ci"]
    assert 0 <= lo < 0.6 < hi <= 1
    assert len(res["verdicts"]) == 10 and {v["first"] for v in res["verdicts"]} == {"A", "B"}
    v = next(v for v in res["verdicts"] if v["reference"] == "camera.jpg" and v["first"] == "A")
    assert (v["verdict"], v["winner"], v["reason"]) == ("B", "B", "B has 7 words, A 3.")
    assert res["judge"]["settings"] == {"rule": "more words"} and res["judge"]["sampling"]["do_sample"] is False
    assert res["prompt"]["sha256"] and "Verdict" in res["prompt"]["text"] and res["seed"] == 0
    md = (out / "judge.md").read_text()
    assert "| A | B | 5 / 2 / 3 | 0 | 60.0 (" in md
    page = (out / "judge.html").read_text()
    assert page.count('<tr class="image">') == 5 and page.count('<img src="data:image/jpeg;base64,') == 5


def test_swapping_the_runs_mirrors_the_table(runs, tmp_path):
    assert judge(runs, tmp_path / "ab", "A", "B") == 0
    assert judge(runs, tmp_path / "ba", "B", "A") == 0
    (ab,) = json.loads((tmp_path / "ab" / "judge.json").read_text())["pairs"]
    (ba,) = json.loads((tmp_path / "ba" / "judge.json").read_text())["pairs"]
    assert (ba["a"], ba["b"], ba["wins"], ba["ties"], ba["losses"]) == ("B", "A", ab["losses"], ab["ties"], ab["wins"])
    assert ba["win_rate"] == pytest.approx(1 - ab["win_rate"])
    assert ba["length_controlled_win_rate"] == pytest.approx(1 - ab["length_controlled_win_rate"], abs=1e-6)
    assert ba["position_consistency"] == ab["position_consistency"]
    assert ba["win_rate_ci"] == pytest.approx([1 - ab["win_rate_ci"][1], 1 - ab["win_rate_ci"][0]], abs=0.051)


def test_a_rerun_asks_nothing_and_an_added_run_only_its_pairs(runs, tmp_path):
    out, log = tmp_path / "j", tmp_path / "calls.log"
    assert judge(runs, out, "A", "B", log=log) == 0
    assert asked(log) == 9                # 5 references x 2 orders; rocket's same two captions once
    first = json.loads((out / "judge.json").read_text())
    assert judge(runs, out, "A", "B", log=log) == 0
    assert asked(log) == 9                                        # nothing new
    assert json.loads((out / "judge.json").read_text())["pairs"] == first["pairs"]
    assert judge(runs, out, "A", "B", "C", log=log) == 0
    assert asked(log) == 9 + 18           # A-C and B-C, both orders; on rocket A's caption is B's: asked once
    res = json.loads((out / "judge.json").read_text())
    assert [r["run"] for r in res["ranking"]] == ["C", "A", "B"]   # C's captions are the longest
    assert all(lo <= r["strength"] <= hi for r in res["ranking"] for lo, hi in [r["strength_ci"]])
    assert pair(res, "A", "C")["win_rate"] == 0.0 and pair(res, "B", "C")["losses"] == 10
    # a changed prompt is another question: asked again
    prompt = tmp_path / "prompt.yaml"
    prompt.write_text((ROOT / "configs" / "judge" / "default.yaml").read_text().replace("carefully", "closely", 1)
                      + "\n# changed\n")
    assert judge(runs, out, "A", "B", log=log, extra=["--prompt", str(prompt)]) == 0
    assert asked(log) == 27 + 9


def pair(res, a, b):
    return next(p for p in res["pairs"] if (p["a"], p["b"]) == (a, b))


def test_unparsable_answers_are_asked_once_more_then_counted(runs, tmp_path):
    caps = dict(CAPTIONS["B"], camera="what ??? is this", coffee="cup !!")
    b2 = tmp_path / "B2"
    shutil.copytree(runs["B"], b2)
    write_captions(b2, caps)
    log = tmp_path / "calls.log"
    assert judge({**runs, "B2": b2}, tmp_path / "o", "A", "B2", log=log) == 0
    assert asked(log) == 9 + 2 + 2                                # camera and coffee, both orders, asked again
    res = json.loads((tmp_path / "o" / "judge.json").read_text())
    (p,) = res["pairs"]
    assert p["unparsable"] == 2 and p["wins"] + p["ties"] + p["losses"] == 8
    v = [v for v in res["verdicts"] if v["reference"] == "camera.jpg"]
    assert all(x["verdict"] is None and x["winner"] is None and len(x["answers"]) == 2 for x in v)
    w = [v for v in res["verdicts"] if v["reference"] == "coffee.jpg"]
    assert all(x["verdict"] == "A" and len(x["answers"]) == 2 for x in w)  # "cup !!" and "a cup": 2 words each
    assert (p["wins"], p["ties"], p["losses"]) == (4, 2, 2)
    assert p["position_consistency"] == pytest.approx(2 / 4)  # camera never parsed; chelsea, coffee: the first wins


def test_length_controlled_win_rate():
    # test_a_length_judge_gives_the_expected_counts's verdicts: the longer caption wins, so the win rate
    # (0.6) says more about length than the length-controlled one (at zero difference: the two
    # same-length references split evenly)
    scores = [1, 1, 0, 0, 1, 0, 1, 1, 0.5, 0.5]
    diffs = [0.8, 0.8, -0.8, -0.8, 0, 0, 0.8, 0.8, 0, 0]
    assert sum(scores) / len(scores) == pytest.approx(0.6)
    lc = length_controlled(scores, diffs)
    assert 0.5 < lc < 0.55
    # a judge that prefers x whatever the length: still above one half at zero difference
    assert length_controlled([1, 1, 1, 0], [0.5, -0.5, 0, 0]) == pytest.approx(0.75, abs=0.01)
    assert length_controlled([1, 1, 1], [0.5, 0.1, 0.3]) == 1.0 and length_controlled([], []) is None


@pytest.mark.parametrize("answer, verdict", [
    ("Reason: more detail.\nVerdict: A", "A"), ("verdict: **B**", "B"), ("Verdict - Tie", "tie"), ("B", "B"),
    ("Caption A.", "A"), ("I think Caption B is better because it names the dog.", "B"),
    ("A or B, hard to say", None), ("Caption A is better. No, Caption B is better.", None), ("", None),
    ("Verdict: A\nOn second thought... Verdict: B", "B"), ("Verdict: a tie", "tie"), ("verdict: a close call", None),
    ("Verdict: Caption B", "B"),
])
def test_verdict_parsing(answer, verdict):
    assert parse_verdict(answer)[0] == verdict


def test_compare_shows_a_judge_section(runs, tmp_path):
    assert judge(runs, tmp_path / "j", "A", "B") == 0
    out = tmp_path / "cmp"
    assert report_main(["compare", str(runs["A"]), str(runs["B"]), "--output_dir", str(out),
                        "--judge", str(tmp_path / "j" / "judge.json")]) == 0
    md = (out / "compare.md").read_text()
    assert "## Caption win rate (Protocol 2)" in md and "| A | B | 5 / 2 / 3 | 0 | 60.0 (" in md
    assert "Caption win rate" in (out / "compare.html").read_text()


# ---------------------------------------------------------------------------- bad input: one line, exit code 2

class _Fake(BaseHTTPRequestHandler):
    """An OpenAI-compatible server's chat endpoint: `Verdict: A` to the first `budget` requests, then
    503 (a server going down)."""

    budget = 10**9
    served = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with _Fake.lock:
            ok = _Fake.served < _Fake.budget
            _Fake.served += ok
        body = json.dumps({"choices": [{"message": {"content": "Reason: fine.\nVerdict: A"}}]}).encode() if ok else b"down"
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    _Fake.budget, _Fake.served = 10**9, 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"openai:http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def remote(runs, out, url, *labels):
    return report_main(["judge", *(str(runs[k]) for k in labels), "--judge", url, "--remote_model", "m",
                        "--output_dir", str(out), "--retries", "1", "--backoff_s", "0", "--concurrency", "2",
                        "--timeout_s", "5", "--bootstrap", "50"])


def test_a_server_down_mid_run_loses_nothing(runs, tmp_path, fake_server, capsys):
    _Fake.budget = 4
    assert remote(runs, tmp_path / "o", fake_server, "A", "B") == 2
    err = capsys.readouterr().err.strip()
    assert "HTTP 503" in err.splitlines()[-1] and "4 of 9 question(s) answered and cached" in err.splitlines()[-1]
    assert err.count("ERROR") == 1 and "Traceback" not in err
    _Fake.budget, _Fake.served = 10**9, 0
    with ThreadingHTTPServer(("127.0.0.1", 0), _Fake) as restarted:  # the same model, on another port
        threading.Thread(target=restarted.serve_forever, daemon=True).start()
        assert remote(runs, tmp_path / "o", f"openai:http://127.0.0.1:{restarted.server_address[1]}/v1", "A", "B") == 0
        restarted.shutdown()
    assert _Fake.served == 5                                      # only the rest was asked
    (p,) = json.loads((tmp_path / "o" / "judge.json").read_text())["pairs"]
    assert (p["wins"], p["losses"], p["position_consistency"]) == (5, 5, 0.0)  # always "A": position bias only


class _Modes(BaseHTTPRequestHandler):
    """A chat endpoint that answers after `delay` seconds with `status`, counting requests in flight."""

    delay, status, seen, now, most = 0.0, 200, 0, 0, 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with _Modes.lock:
            _Modes.seen += 1
            _Modes.now += 1
            _Modes.most = max(_Modes.most, _Modes.now)
        time.sleep(_Modes.delay)
        with _Modes.lock:
            _Modes.now -= 1
        body = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode() if _Modes.status == 200 else b"bad"
        try:
            self.send_response(_Modes.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (its timeout)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("delay, status, timeout, needle, requests_seen", [
    (0.3, 200, 5.0, None, 12),                                        # 4 in flight, never more
    (1.0, 200, 0.2, "no answer within 0.2 s after 2 attempt(s)", 2),  # a timeout is retried
    (0.0, 400, 5.0, "refused the request: HTTP 400: bad", 1),         # the request's fault: not retried
])
def test_the_client_keeps_n_in_flight_retries_and_times_out(delay, status, timeout, needle, requests_seen):
    from uae.remote import ChatClient, RemoteError

    _Modes.delay, _Modes.status, _Modes.seen, _Modes.now, _Modes.most = delay, status, 0, 0, 0
    with ThreadingHTTPServer(("127.0.0.1", 0), _Modes) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", concurrency=4, timeout_s=timeout,
                            retries=1, backoff_s=0)
        convs = [[{"role": "user", "content": f"q{i}"}] for i in range(12 if needle is None else 1)]
        if needle is None:
            assert client.complete_many(convs) == ["ok"] * 12 and _Modes.most == 4
        else:
            with pytest.raises(RemoteError, match=re.escape(needle)) as e:
                client.complete_many(convs)
            assert "0 of 1 request(s) done" in str(e.value) and "\n" not in str(e.value)
        server.shutdown()
    assert _Modes.seen == requests_seen


@pytest.mark.parametrize("case, needle", [
    ("different_references", "the runs captioned different references: B lacks coffee.jpg"),
    ("no_captions", "holds no captions"),
    ("blind_judge", "cannot see images (its sees_images is not True): use --mode text"),
    ("text_model", "holds a 'qwen2' model, which cannot see images: use --mode text"),
    ("server_down", "cannot connect (ConnectionError) after 2 attempt(s); 0 of 9 request(s) done; 0 of 9 question(s) answered"),
    ("one_run", "give two or more run folders to judge (got 1)"),
    ("not_a_run", "not a Unified-Bench run folder (no results.json)"),
    ("no_such_class", "has no 'Nope'"),
    ("prompt", "--prompt nope: no such file, and not a shipped judge prompt (default)"),
])
def test_bad_inputs_are_one_line_errors(case, needle, runs, tmp_path, capsys):
    b = tmp_path / "B"
    shutil.copytree(runs["B"], b)
    labels = [str(runs["A"]), str(b)]
    extra = ["--judge", runs["judge"]]
    if case == "different_references":
        write_captions(b, {k: v for k, v in CAPTIONS["B"].items() if k != "coffee"})
    elif case == "no_captions":
        res = json.loads((b / "results.json").read_text())
        res["captions"] = {k: None for k in res["captions"]}
        (b / "results.json").write_text(json.dumps(res))
    elif case == "blind_judge":
        extra += ["--judge_args", '{"sees_images": false}']
    elif case == "text_model":  # a text-only language model's config (the check comes before any weight loads)
        from transformers import Qwen2Config

        Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=32, vocab_size=64).save_pretrained(tmp_path / "lm")
        extra = ["--judge", str(tmp_path / "lm")]
    elif case == "server_down":
        extra = ["--judge", f"openai:http://127.0.0.1:{free_port()}/v1", "--remote_model", "m", "--retries", "1",
                 "--backoff_s", "0"]
    elif case == "one_run":
        labels = labels[:1]
    elif case == "not_a_run":
        labels = [str(runs["A"]), str(tmp_path)]
    elif case == "no_such_class":
        extra = ["--judge", runs["judge"].replace("LongerCaption", "Nope")]
    elif case == "prompt":
        extra += ["--prompt", "nope"]
    capsys.readouterr()
    assert report_main(["judge", *labels, *extra, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err.splitlines()[-1] and "Traceback" not in err, err
    assert err.count("ERROR") == 1 and (case == "server_down" or len(err.splitlines()) == 1), err
    assert not (tmp_path / "out" / "judge.json").exists()


def test_compare_refuses_a_judge_file_that_is_not_one(runs, tmp_path, capsys):
    bad = tmp_path / "judge.json"
    bad.write_text(json.dumps({"hello": 1}))
    capsys.readouterr()
    assert report_main(["compare", str(runs["A"]), str(runs["B"]), "--output_dir", str(tmp_path / "c"),
                        "--judge", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a judge.json of uae-report judge (no pairs)" in err and len(err.splitlines()) == 1


def test_a_text_mode_judge_reads_the_reference_captions(runs, tmp_path):
    """Text mode: no image (the judge above asserts one, so a text-mode class of its own), the
    reference caption in the prompt."""
    src = tmp_path / "t.py"
    src.write_text("class T:\n    def judge(self, items):\n"
                   "        return ['Verdict: A' if it.image is None and it.reference_caption and "
                   "it.reference_caption in it.prompt else 'no' for it in items]\n")
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"image": n, "caption": f"reference of {n}"}) + "\n" for n in NAMES))
    out = tmp_path / "o"
    assert report_main(["judge", str(runs["A"]), str(runs["B"]), "--judge", f"{src}:T", "--mode", "text",
                        "--reference_captions", str(refs), "--output_dir", str(out), "--bootstrap", "10"]) == 0
    (p,) = json.loads((out / "judge.json").read_text())["pairs"]
    assert (p["wins"], p["losses"], p["unparsable"]) == (5, 5, 0)


# ---------------------------------------------------------------------------- processes and a real server

@pytest.mark.slow  # measured >8 s on 2 cores: two torchrun processes load the tiny judge
def test_two_processes_give_the_verdicts_of_one(runs, tmp_path):
    flags = ["--judge", "tiny", "--max_new_tokens", "4", "--bootstrap", "50"]
    assert report_main(["judge", str(runs["A"]), str(runs["B"]), *flags, "--output_dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "uae.apps.report", "judge",
                           str(runs["A"]), str(runs["B"]), *flags, "--output_dir", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted((tmp_path / "two" / "cache").glob("verdicts-*.jsonl")) == [
        tmp_path / "two" / "cache" / "verdicts-0.jsonl", tmp_path / "two" / "cache" / "verdicts-1.jsonl"]
    one, two = (json.loads((tmp_path / d / "judge.json").read_text()) for d in ("one", "two"))
    assert one["verdicts"] == two["verdicts"] and one["pairs"] == two["pairs"]
    assert all(isinstance(v["answers"][0], str) for v in one["verdicts"])


@pytest.mark.slow  # measured >8 s on 2 cores: starts `transformers serve`
def test_a_real_transformers_serve_server(runs, tmp_path):
    """The tiny random captioner behind `transformers serve`, its generation_config biased to answer
    "A" and stop (random weights answer gibberish): a judge with a pure position bias, through the
    real server's chat endpoint, images included."""
    from transformers import AutoTokenizer

    from uae.random_weights.unified import resolve

    model = tmp_path / "always-a"
    shutil.copytree(resolve("tiny", "captioner"), model)
    tok = AutoTokenizer.from_pretrained(model)
    (a,) = tok("A")["input_ids"]
    gen = json.loads((model / "generation_config.json").read_text())
    gen["sequence_bias"] = [[[a], 100.0], [[a, tok.eos_token_id], 200.0]]  # "A", then the end
    (model / "generation_config.json").write_text(json.dumps(gen))
    with cpu_server(model, tmp_path) as url:
        out = tmp_path / "o"
        assert report_main(["judge", str(runs["A"]), str(runs["B"]), "--judge", f"openai:{url}",
                            "--max_new_tokens", "6", "--concurrency", "2", "--output_dir", str(out),
                            "--bootstrap", "50"]) == 0
    res = json.loads((out / "judge.json").read_text())
    assert res["judge"]["settings"]["model"] == str(model)         # the server's one model, asked by GET /models
    assert res["judge"]["judge"] == f"openai:{model}" and url in res["judge_given"]
    assert res["judge"]["settings"]["sampling"]["temperature"] == 0.0  # greedy
    assert len(res["verdicts"]) == 10 and all(v["answers"] == ["A"] for v in res["verdicts"])
    (p,) = res["pairs"]
    assert (p["wins"], p["ties"], p["losses"], p["unparsable"], p["position_consistency"]) == (5, 0, 5, 0, 0.0)
    assert p["win_rate"] == 0.5


def test_a_text_only_judge_reads_the_captions_and_the_reference_captions(runs, tmp_path):
    """--mode text: the judge sees no image, each question carries the reference caption given with
    --reference_captions, and the verdicts (which depend on the captions alone here) are image mode's."""
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"image": n, "caption": f"reference of {n}"}) + "\n" for n in NAMES))
    log = tmp_path / "calls.log"
    args = json.dumps({"log": str(log), "sees_images": False})
    assert report_main(["judge", str(runs["A"]), str(runs["B"]), "--judge", runs["judge"], "--judge_args", args,
                        "--output_dir", str(tmp_path / "text"), "--bootstrap", "200", "--mode", "text",
                        "--reference_captions", str(refs)]) == 0
    seen = set(Path(str(log) + ".refs").read_text().splitlines())
    assert seen == {f"reference of {n}" for n in NAMES}
    text = json.loads((tmp_path / "text" / "judge.json").read_text())
    assert judge(runs, tmp_path / "image", "A", "B") == 0
    image = json.loads((tmp_path / "image" / "judge.json").read_text())
    (t,), (i,) = text["pairs"], image["pairs"]
    assert (t["wins"], t["ties"], t["losses"], t["unparsable"]) == (i["wins"], i["ties"], i["losses"], 0) == (5, 2, 3, 0)
