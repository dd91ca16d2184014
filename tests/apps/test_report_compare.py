"""uae-report compare: Unified-Bench runs side by side (the paper's Tab. 2 shape), the paper's
published rows marked as such, and pages (compare.html, the runner's report.html) that show the
same after their folder is copied anywhere."""

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from uae.apps import unibench
from uae.apps.report import main as report_main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Unified-Bench" / "UniBench" / "sample"
FAST = ["--steps", "2", "--height", "32", "--width", "32", "--max_new_tokens", "8", "--scorer_weights", "tiny",
        "--num_workers", "0", "--no_cache"]
SCORERS = (("clip", "CLIP"), ("longclip", "LongCLIP"), ("dinov2", "DINO-v2"), ("dinov3", "DINO-v3"))
PAPER_ROWS = ["GPT-4o-Image", "BAGEL", "BLIP-3o", "Janus-Pro", "OmniGen2", "Show-o", "UniWorld-V1", "UAE",
              "Qwen-2.5-VL-3B", "Qwen-2.5-VL-7B"]
THEIR_CAPTIONS = {"astronaut": "a person in a suit", "camera": "a man holds a camera on a tripod",
                  "chelsea": "a cat"}  # 5, 8 and 2 words


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    """Two runner folders on three sample photos: ours, and another system's reconstructions (ours
    mirrored, named recon_<stem>) with its own captions, scored with --recon_from / --captions_from."""
    tmp = tmp_path_factory.mktemp("compare")
    refs = tmp / "refs"
    refs.mkdir()
    for name in ("astronaut.jpg", "camera.jpg", "chelsea.jpg"):
        shutil.copy(SAMPLE / name, refs / name)
    ours = tmp / "ours"
    assert unibench.main(["--checkpoint", str(tiny_ckpt), "--ref_path", str(refs), "--output_dir", str(ours), *FAST]) == 0
    theirs_recon = tmp / "their_recon"
    theirs_recon.mkdir()
    for p in (ours / "recon").iterdir():
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(theirs_recon / f"recon_{p.name}")
    captions = tmp / "their_captions.jsonl"
    captions.write_text("".join(json.dumps({"image": f"{k}.jpg", "caption": v}) + "\n" for k, v in THEIR_CAPTIONS.items()))
    theirs = tmp / "theirs"
    assert unibench.main(["--recon_from", str(theirs_recon), "--captions_from", str(captions), "--ref_path", str(refs),
                          "--checkpoint", "external", "--output_dir", str(theirs), *FAST]) == 0
    return ours, theirs


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "with_paper"
    assert report_main(["compare", *map(str, runs), "--output_dir", str(out), "--paper"]) == 0
    return out


def _table_rows(md: str, first_cell: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of the markdown table rows starting with one of the names."""
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_cell:
            out[cells[0]] = cells[1:]
    return out


def test_numbers_are_100x_the_runs_results(runs, compared):
    md = (compared / "compare.md").read_text()
    assert "| run | CLIP | LongCLIP | DINO-v2 | DINO-v3 | Overall | caption words |" in md
    rows = _table_rows(md.split("## Published")[0], [r.name for r in runs])
    assert set(rows) == {"ours", "theirs"}
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        cells = rows[run.name]
        for i, (key, _) in enumerate(SCORERS):
            assert cells[i] == f"{100 * res[key]['average']:.2f}", (run.name, key)
        assert cells[4] == f"{100 * res['overall']:.2f}"          # Overall: the plain mean of the four
        mean4 = sum(res[k]["average"] for k, _ in SCORERS) / 4
        assert abs(100 * mean4 - float(cells[4])) <= 0.005 + 1e-9
        caps = [c for c in res["captions"].values() if c]
        assert cells[5] == f"{sum(len(c.split()) for c in caps) / len(caps):.1f}"
        assert cells[6] == f"{res['summary']['valid']} / {res['summary']['failed']}"
    assert rows["theirs"][5] == "5.0"                               # (5 + 8 + 2) / 3 words
    # The per-image table: each image's mean of the four scorers, per run.
    per = _table_rows(md.split("## Per image")[1], ["astronaut.jpg", "camera.jpg", "chelsea.jpg"])
    res = json.loads((runs[0] / "results.json").read_text())
    assert per["chelsea.jpg"][0] == f"{100 * sum(res[k]['chelsea.jpg'] for k, _ in SCORERS) / 4:.2f}"
    assert "tiny RANDOM scorer weights" in md                      # what the numbers are not


def test_paper_rows_appear_marked_published(compared, runs, tmp_path):
    md = (compared / "compare.md").read_text()
    measured, published = md.split("## Published, not measured")
    assert "not measured" not in measured
    assert "Unified Multimodal Models as Auto-Encoders (arXiv 2509.09666 v5, CVPR 2026), Tab. 2" in published
    rows = _table_rows(published, [f"{n} (published, not measured)" for n in PAPER_ROWS])
    assert len(rows) == len(PAPER_ROWS)
    assert rows["UAE (published, not measured)"] == ["90.50", "94.35", "81.98", "77.54", "86.09"]
    assert rows["GPT-4o-Image (published, not measured)"] == ["90.42", "94.37", "81.74", "77.27", "85.95"]
    # Copied as printed, with the rows whose Overall is not the mean of their columns flagged.
    assert rows["Qwen-2.5-VL-3B (published, not measured)"][4] == "80.85 *" and "(81.22)" in published
    page = (compared / "compare.html").read_text()
    assert page.count('<tr class="published">') == len(PAPER_ROWS)
    assert page.count("Published, not measured: Unified Multimodal Models as Auto-Encoders") == 2   # Tab. 2, Tab. 3
    assert all(f"{html_name} <small>(published, not measured)</small>" in page
               for html_name in ("GPT-4o-Image", "UniWorld-V1", "Qwen-2.5-VL-7B"))
    assert Image.open(compared / "compare.png").format == "PNG"
    # Without --paper, nothing published.
    out = tmp_path / "no_paper"
    assert report_main(["compare", *map(str, runs), "--output_dir", str(out)]) == 0
    assert "not measured" not in (out / "compare.md").read_text()
    assert "not measured" not in (out / "compare.html").read_text()
    assert 'class="published"' not in (out / "compare.html").read_text()


def test_both_pages_say_which_model_each_run_measured(runs, tmp_path):
    """A run of another model (its results.json meta as the runner writes it for --model janus) is
    described by its model in compare.md and in compare.html alike; a UAE run by its checkpoint."""
    janus = tmp_path / "janus"
    shutil.copytree(runs[0], janus)
    res = json.loads((janus / "results.json").read_text())
    res["meta"].update(model="janus", model_label="Janus tiny-janus", checkpoint="tiny")
    (janus / "results.json").write_text(json.dumps(res))
    out = tmp_path / "cmp"
    assert report_main(["compare", str(runs[0]), str(janus), "--output_dir", str(out)]) == 0
    ours = json.loads((runs[0] / "results.json").read_text())["meta"]["checkpoint"]
    for page in ("compare.md", "compare.html"):
        text = (out / page).read_text()
        assert "(model Janus tiny-janus, scorer weights tiny" in text and "checkpoint tiny," not in text, page
        assert f"(checkpoint {ours}, scorer weights tiny" in text, page


class _Refs(HTMLParser):
    """Every URL a page refers to (src, href, srcset, url(...) in style)."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "data", "poster") and v is not None:
                self.urls.append((tag, v))
            if k == "style" and v and "url(" in v:
                self.urls += [(tag, u) for u in re.findall(r"url\(['\"]?([^'\")]+)", v)]


def assert_self_contained(page: Path, runs_elsewhere: list[Path] = ()) -> list[Image.Image]:
    """Copy the page's folder elsewhere and check every reference resolves there: a data: URI or a
    relative path inside the copy. Returns the embedded images."""
    copy = page.parent.parent / f"{page.parent.name}-copied-elsewhere"
    shutil.copytree(page.parent, copy)
    parser = _Refs()
    text = (copy / page.name).read_text()
    parser.feed(text)
    assert "<pre>" not in text and "<table>" in text and "<td" in text   # real tables
    images = []
    for tag, url in parser.urls:
        if url.startswith("data:"):
            head, data = url.split(",", 1)
            assert head in ("data:image/jpeg;base64", "data:image/png;base64"), head
            images.append(Image.open(io.BytesIO(base64.b64decode(data))))
            images[-1].load()
        else:
            assert not re.match(r"^[a-z]+:|^/|^\\", url, re.I), url
            target = (copy / url).resolve()
            assert target.is_relative_to(copy.resolve()) and target.exists(), url
    assert images, "the page shows no image"
    for other in runs_elsewhere:                                        # no path to the inputs either
        assert str(other) not in "".join(u for _, u in parser.urls)
    shutil.rmtree(copy)
    return images


def test_compare_html_is_self_contained(compared, runs):
    page = (compared / "compare.html").read_text()
    assert page.count('<tr class="image">') == 3                       # one row per reference
    images = assert_self_contained(compared / "compare.html", list(runs))
    thumbs = [im for im in images if im.format == "JPEG"]
    assert len(thumbs) == 3 * (1 + len(runs))                         # reference + each run's reconstruction
    assert all(max(im.size) <= 160 for im in thumbs)                   # thumbnails, not the files
    assert [im.format for im in images].count("PNG") == 1              # compare.png, embedded
    assert "a man holds a camera on a tripod" in page          # their caption beside their image
    assert (compared / "compare.html").stat().st_size < 400_000


def test_runner_report_is_self_contained(runs):
    ours = runs[0]
    page = (ours / "report.html").read_text()
    assert page.count('<tr class="image">') == 3
    assert "<td>clip</td>" in page and "caption faithfulness" in page
    images = assert_self_contained(ours / "report.html")
    assert sum(im.format == "JPEG" for im in images) == 6 and sum(im.format == "PNG" for im in images) == 1
    assert all(max(im.size) <= 160 for im in images if im.format == "JPEG")


def test_labels_and_max_images(runs, tmp_path):
    out = tmp_path / "o"
    assert report_main(["compare", *map(str, runs), "--output_dir", str(out), "--labels", "UAE-tiny", "other",
                        "--max_images", "2"]) == 0
    md = (out / "compare.md").read_text()
    assert "| UAE-tiny |" in md and "| other |" in md and "the first 2 of 3 images" in md
    assert (out / "compare.html").read_text().count('<tr class="image">') == 2


@pytest.mark.parametrize("case, needle", [
    ("not_a_run", "not a Unified-Bench run folder (no results.json)"),
    ("missing", "does not exist"),
    ("bad_json", "is not valid JSON"),
    ("not_results", "is not a Unified-Bench results.json"),
    ("labels", "--labels: 1 label(s) for 2 run folder(s)"),
    ("no_output", "the following arguments are required: --output_dir"),
    ("unknown_flag", "unrecognized arguments: --paperz"),
])
def test_bad_inputs_are_one_line_errors(case, needle, runs, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    argv = {"not_a_run": [str(bad)], "missing": [str(tmp_path / "nope")],
            "bad_json": [str(bad)], "not_results": [str(bad)],
            "labels": [str(runs[0]), str(runs[1]), "--labels", "one"],
            "no_output": [str(runs[0])], "unknown_flag": [str(runs[0]), "--paperz"]}[case]
    if case == "bad_json":
        (bad / "results.json").write_text("{not json")
    if case == "not_results":
        (bad / "results.json").write_text(json.dumps({"hello": 1}))
    if case != "no_output":
        argv += ["--output_dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert report_main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_training_run_reports_still_work(tmp_path, capsys):
    """`uae-report RUN_DIR` (a training run) is unchanged beside the compare sub-command."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    assert report_main([str(run)]) == 0
    assert "loss: 4 points" in capsys.readouterr().out and (run / "index.html").exists()
