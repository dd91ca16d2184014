"""Score_i2i and folder scoring: matching, cache, JSON layout, every bad input of issue 7."""

import io
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from uae.images import load_image
from uae.apps import score_i2i as Score_i2i

ROOT = Path(__file__).resolve().parents[2]


def _save(arr, path, **kw):
    Image.fromarray(arr).save(path, **kw)


@pytest.fixture()
def folders(tmp_path):
    ref, rec = tmp_path / "ref", tmp_path / "rec"
    ref.mkdir(), rec.mkdir()
    photos = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}
    for name, arr in photos.items():
        _save(arr, ref / f"{name}.jpg", quality=90)
    _save(data.astronaut(), rec / "astronaut.jpg", quality=90)              # same name (identical file)
    _save(np.ascontiguousarray(data.chelsea()[:, ::-1]), rec / "chelsea.png")  # same stem
    _save(data.coffee()[50:, 30:], rec / "recon_coffee.png")                # recon_<stem>
    return rec, ref


def score(rec, ref, tmp_path, *extra, capsys=None):
    out = tmp_path / "res.json"
    code = Score_i2i.main(["--image_path", str(rec), "--ref_path", str(ref), "--output_file", str(out),
                           "--weights", "tiny", "--num_workers", "0", "--cache_dir", str(tmp_path / "cache"),
                           *map(str, extra)])
    if not out.exists():
        return code, None
    official = json.loads(out.read_text())
    # The output file holds exactly the release's layout; everything else is in the sidecar.
    for name, per in official.items():
        assert isinstance(per, dict) and {"average", "min", "max"} <= set(per), name
    details = json.loads((tmp_path / "res.details.json").read_text())
    assert set(details) == {"overall", "summary", "errors", "unmatched"} and not set(details) & set(official)
    return code, {**official, **details}


def test_json_layout_matching_and_identical_pair(folders, tmp_path):
    rec, ref = folders
    code, res = score(rec, ref, tmp_path)
    assert code == 0
    for m in ("clip", "dinov2", "dinov3", "longclip"):
        per = {k: v for k, v in res[m].items() if k not in ("average", "min", "max")}
        assert set(per) == {"astronaut.jpg", "chelsea.jpg", "coffee.jpg"}
        assert abs(per["astronaut.jpg"] - 1.0) < 1e-5                     # identical files
        assert res[m]["min"] <= res[m]["average"] <= res[m]["max"]
        assert abs(res[m]["average"] - sum(per.values()) / 3) < 1e-9
    assert abs(res["overall"] - sum(res[m]["average"] for m in ("clip", "dinov2", "dinov3", "longclip")) / 4) < 1e-9
    assert res["summary"] == {"pairs": 3, "valid": 3, "failed": 0, "scorers": ["clip", "dinov2", "dinov3", "longclip"]}


def test_official_flag_names_and_single_scorer_scripts(folders, tmp_path, monkeypatch):
    rec, ref = folders
    out = tmp_path / "clip.json"
    monkeypatch.setattr(sys, "argv", ["eval/CLIP.py", "--image_path", str(rec), "--ref_image_path", str(ref), "--output",
                                      str(out), "--weights", "tiny", "--num_workers", "0", "--no_cache"])
    with pytest.raises(SystemExit) as exit_:  # the script itself, as a user runs it
        runpy.run_path(str(ROOT / "eval" / "CLIP.py"), run_name="__main__")
    assert exit_.value.code == 0
    assert set(json.loads(out.read_text())) == {"clip"}
    assert set(json.loads((tmp_path / "clip.details.json").read_text())) == {"overall", "summary", "errors", "unmatched"}


def test_cache_is_used_and_invalidated_when_content_changes(folders, tmp_path, capsys):
    rec, ref = folders
    _, first = score(rec, ref, tmp_path)
    capsys.readouterr()
    _, second = score(rec, ref, tmp_path)
    assert "encoding 3 file(s), 3 reference(s) from the feature cache" in capsys.readouterr().err
    # Same features up to batch-composition float noise (batches differ when references come from cache).
    assert all(abs(second["clip"][k] - v) < 1e-6 for k, v in first["clip"].items())
    _save(data.rocket(), ref / "coffee.jpg")                                # same name, new content
    _, third = score(rec, ref, tmp_path)
    assert "encoding 4 file(s), 2 reference(s) from the feature cache" in capsys.readouterr().err
    assert third["clip"]["coffee.jpg"] != first["clip"]["coffee.jpg"]
    assert abs(third["clip"]["chelsea.jpg"] - first["clip"]["chelsea.jpg"]) < 1e-6


def test_unmatched_and_ambiguous_are_reported(folders, tmp_path):
    rec, ref = folders
    _save(data.camera(), ref / "camera.png")                                 # no reconstruction
    _save(data.rocket(), rec / "extra.png")                                  # no reference
    _save(data.coffee(), rec / "coffee.webp")                                # coffee: same stem twice
    _save(data.coffee(), rec / "coffee.bmp")
    code, res = score(rec, ref, tmp_path)
    assert res["unmatched"] == {"references": ["camera.png"], "reconstructions": ["extra.png", "recon_coffee.png"]}
    assert "ambiguous" in res["errors"]["coffee.jpg"]
    assert code == 1 and res["summary"]["failed"] == 1


def _bad_files(rec, ref):
    """One reference + reconstruction per awkward case; name -> expected to fail?"""
    photo = data.astronaut()
    cases = {}

    def both(name, writer, fails):
        writer(ref / name)
        shutil.copy(ref / name, rec / name)
        cases[name] = fails

    both("zero.png", lambda p: p.write_bytes(b""), True)
    both("text.jpg", lambda p: p.write_text("not an image"), True)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    both("truncated.png", lambda p: p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2]), True)
    both("palette.png", lambda p: Image.fromarray(photo).convert("P").save(p), False)
    both("rgba.png", lambda p: Image.fromarray(photo).convert("RGBA").save(p), False)
    both("la.png", lambda p: Image.fromarray(photo).convert("LA").save(p), False)
    both("sixteen.png", lambda p: Image.fromarray((data.camera().astype(np.uint16) * 257)).save(p), False)
    both("cmyk.jpg", lambda p: Image.fromarray(photo).convert("CMYK").save(p), False)
    both("tiny1x1.png", lambda p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p), False)
    both("animated.gif", lambda p: Image.fromarray(photo).save(
        p, save_all=True, append_images=[Image.fromarray(data.chelsea())]), False)
    both("ünïcødé 名前.png", lambda p: Image.fromarray(photo).save(p), False)
    return cases


def test_bad_files_are_per_image_errors_and_the_rest_is_scored(tmp_path):
    rec, ref = tmp_path / "rec", tmp_path / "ref"
    rec.mkdir(), ref.mkdir()
    cases = _bad_files(rec, ref)
    code, res = score(rec, ref, tmp_path)
    assert code == 1
    assert set(res["errors"]) == {n for n, fails in cases.items() if fails}
    assert "zero-byte" in res["errors"]["zero.png"] and "not an image" in res["errors"]["text.jpg"]
    ok = {n for n, fails in cases.items() if not fails}
    assert set(k for k in res["clip"] if k not in ("average", "min", "max")) == ok
    assert all(abs(res["clip"][n] - 1.0) < 1e-5 for n in ok)                # identical pairs
    assert res["summary"]["valid"] == len(ok) and res["summary"]["failed"] == 3
    code, _ = score(rec, ref, tmp_path, "--allow_failures")
    assert code == 0


def test_documented_conversions(tmp_path):
    photo = data.astronaut()[:, :400]                                        # 512 x 400
    exif = Image.Exif()
    exif[0x0112] = 6                                                         # rotate 90 on display
    Image.fromarray(photo).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (512, 400)
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)   # on white
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert load_image(tmp_path / "white16.png").getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_is_a_per_image_error(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                     # every photo is now a "bomb"
    rec, ref = folders
    code, res = score(rec, ref, tmp_path, "--no_cache")
    assert code == 1 and "decompression-bomb" in res["errors"]["astronaut.jpg"]


@pytest.mark.parametrize("setup, needle", [
    (lambda rec, ref: shutil.rmtree(ref), "does not exist"),
    (lambda rec, ref: [p.unlink() for p in rec.iterdir()], "holds no images"),
])
def test_missing_or_empty_folders_exit_2(folders, tmp_path, capsys, setup, needle):
    rec, ref = folders
    setup(rec, ref)
    code, res = score(rec, ref, tmp_path)
    assert code == 2 and res is None
    assert needle in capsys.readouterr().err


def test_bad_settings_exit_2(folders, tmp_path, capsys):
    rec, ref = folders
    assert score(rec, ref, tmp_path, "--models", "clip", "nope")[0] == 2
    assert "choose from" in capsys.readouterr().err
    assert Score_i2i.main(["--image_path", str(rec)]) == 2
    assert "--ref_path" in capsys.readouterr().err


def test_each_file_is_decoded_once_lazily(folders, tmp_path, monkeypatch):
    """Only features survive a batch: the decode dataset is consumed lazily batch by batch."""
    from uae.scoring import folder

    seen = []
    real = folder._Decode.__getitem__
    monkeypatch.setattr(folder._Decode, "__getitem__", lambda self, i: seen.append(i) or real(self, i))
    rec, ref = folders
    score(rec, ref, tmp_path, "--batch_size", "2", "--no_cache")
    assert sorted(seen) == list(range(6))                                    # each file decoded once
