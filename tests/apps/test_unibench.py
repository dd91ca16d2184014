"""The Unified-Bench runner end to end on the tiny model and the shipped sample references."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from uae.apps import unibench as run_unibench

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = ROOT / "Unified-Bench" / "UniBench" / "sample"
FAST = ["--steps", "2", "--height", "48", "--width", "64", "--max_new_tokens", "8", "--num_workers", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("ub") / "run"
    code = run_unibench.main(["--checkpoint", str(tiny_ckpt), "--output_dir", str(out), "--scorer_weights", "tiny", *FAST])
    assert code == 0
    return out


def test_outputs_of_a_run(run_dir):
    refs = sorted(p.name for p in SAMPLE.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    for m in ("clip", "dinov2", "dinov3", "longclip"):
        assert sorted(k for k in res[m] if k not in ("average", "min", "max")) == refs
    assert set(res["caption_faithfulness"]) == {"clip", "longclip"}
    assert all(-1 <= v <= 1 for k, v in res["caption_faithfulness"]["longclip"].items())
    assert sorted(res["captions"]) == refs and all(res["captions"].values())
    assert res["summary"]["failed"] == 0 and res["unmatched"] == {"references": [], "reconstructions": []}
    for p in (run_dir / "recon").iterdir():
        assert Image.open(p).size == (64, 48)
    assert len(list((run_dir / "captions").glob("*.txt"))) == len(refs)
    md = (run_dir / "results.md").read_text()
    assert "| clip |" in md and "overall" in md
    assert Image.open(run_dir / "scores.png").format == "PNG"
    page = (run_dir / "report.html").read_text()
    assert page.count('<tr class="image">') == len(refs)
    assert "<pre>" not in page and "<td>clip</td>" in page                # the summary as real tables
    srcs = __import__("re").findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 2 * len(refs) + 1                                 # reference, reconstruction; the plot
    assert all(s.startswith("data:image/") for s in srcs)                 # embedded: the page travels alone


def test_rerun_resumes_without_loading_the_model(run_dir, tiny_ckpt, capsys, monkeypatch):
    import uae.models.uae as facade

    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "recon").iterdir()}
    monkeypatch.setattr(facade.UAE, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    code = run_unibench.main(["--checkpoint", str(tiny_ckpt), "--output_dir", str(run_dir), "--scorer_weights", "tiny", *FAST])
    assert code == 0
    assert "0 to caption" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in (run_dir / "recon").iterdir()}


def test_a_greedy_rerun_into_a_sampled_run_is_refused(run_dir, tiny_ckpt, capsys, monkeypatch):
    """Greedy and sampled captions would be mixed in one folder: do_sample is a resume setting."""
    import uae.models.uae as facade

    monkeypatch.setattr(facade.UAE, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    code = run_unibench.main(["--checkpoint", str(tiny_ckpt), "--output_dir", str(run_dir), "--scorer_weights", "tiny",
                              *FAST, "--do_sample", "false"])
    assert code == 2
    assert "do_sample True then, False now" in capsys.readouterr().err


def test_scores_another_systems_outputs(run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir / "recon", other / "recon")
    for p in (other / "recon").iterdir():                                 # their naming: recon_<stem>
        p.rename(p.with_name(f"recon_{p.name}"))
    shutil.copytree(run_dir / "captions", other / "captions")
    out = tmp_path / "scored"
    code = run_unibench.main(["--recon_from", str(other / "recon"), "--captions_from", str(other / "captions"),
                              "--output_dir", str(out), "--scorer_weights", "tiny", "--checkpoint", "external",
                              "--num_workers", "0"])
    assert code == 0
    mine = json.loads((run_dir / "results.json").read_text())
    theirs = json.loads((out / "results.json").read_text())
    assert abs(mine["clip"]["average"] - theirs["clip"]["average"]) < 1e-6
    assert theirs["captions"] == mine["captions"]


def test_unreadable_reference_is_a_failure_with_its_reason(tiny_ckpt, tmp_path):
    refs = tmp_path / "refs"
    shutil.copytree(SAMPLE, refs)
    (refs / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    code = run_unibench.main(["--checkpoint", str(tiny_ckpt), "--ref_path", str(refs), "--output_dir", str(out),
                              "--scorer_weights", "tiny", *FAST])
    res = json.loads((out / "results.json").read_text())
    assert code == 1
    assert "not an image" in res["errors"]["broken.jpg"]
    assert res["summary"]["failed"] == 1 and res["summary"]["valid"] == 6
    assert res["unmatched"]["references"] == []


def test_bad_settings(capsys, tmp_path):
    assert run_unibench.main(["--models", "clip", "bleu"]) == 2
    assert run_unibench.main(["--recon_from", str(tmp_path / "nope")]) == 2
    assert run_unibench.main(["--ref_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "choose from" in err and "no such folder" in err and "does not exist" in err
