"""The Unified-Bench runner's memory does not grow with the number of references: folder scoring
keeps a pair's features only until the pair is scored, and caption faithfulness encodes captions a
batch at a time (both held everything at once before: 2,000 captions through LongCLIP's text
tower in one batch is gigabytes of activations)."""

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uae.scoring import folder as folder_mod

SCORERS = ("clip", "dinov2")


@pytest.fixture(scope="module")
def scorers():
    from uae.random_weights import scorer_checkpoint
    from uae.scoring.scorers import load_scorer

    return {m: load_scorer(m, scorer_checkpoint(m, "tiny"), device=torch.device("cpu")) for m in SCORERS}


def _folders(tmp: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rec, ref = tmp / "rec", tmp / "ref"
    rec.mkdir(), ref.mkdir()
    for i in range(n):
        a = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(a).save(ref / f"{i:03d}.jpg")
        Image.fromarray(np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)).save(
            rec / f"{i:03d}.png")
    return rec, ref


def _tracked(monkeypatch):
    """Wrap iter_features: count the feature tensors still alive after each batch is consumed."""
    live, peaks = weakref.WeakSet(), []
    real = folder_mod.iter_features

    def wrapper(*args, **kwargs):
        for batch, errors in real(*args, **kwargs):
            for per in batch.values():
                live.update(per.values())
            yield batch, errors
            peaks.append(len(live))
            del batch

    monkeypatch.setattr(folder_mod, "iter_features", wrapper)
    return live, peaks


def test_score_folders_keeps_features_only_until_their_pair_is_scored(scorers, tmp_path, monkeypatch):
    n, bs = 20, 4
    rec, ref = _folders(tmp_path, n)
    # What the scores must be: every feature in memory at once, as before.
    feats, errors = folder_mod.encode_files(sorted([*rec.iterdir(), *ref.iterdir()]), scorers, batch_size=bs,
                                            num_workers=0, progress=False)
    assert not errors
    live, peaks = _tracked(monkeypatch)
    res = folder_mod.score_folders(rec, ref, scorers, batch_size=bs, progress=False)
    for name in SCORERS:
        for i in range(n):
            key = f"{i:03d}.jpg"
            expected = float((feats[name][ref / key] * feats[name][rec / f"{i:03d}.png"]).sum())
            assert abs(res[name][key] - expected) < 1e-6
    assert res["summary"] == {"pairs": n, "valid": n, "failed": 0, "scorers": list(SCORERS)}
    # Alive after each batch: the batch just encoded and a pair split across two batches, never more:
    # all 2n files' features were alive at the end before.
    assert len(peaks) == 2 * n // bs and max(peaks) <= (bs + 1) * len(SCORERS), peaks
    assert len(live) == 0


def test_asked_for_reference_features_and_cache_give_the_same_scores(scorers, tmp_path, monkeypatch):
    n = 12
    rec, ref = _folders(tmp_path, n)
    (rec / "005.png").write_bytes(b"broken")                       # a failed pair among them
    first = {"clip": {}}
    a = folder_mod.score_folders(rec, ref, scorers, batch_size=3, progress=False, cache_dir=tmp_path / "cache",
                                 reference_features=first)
    assert sorted(first) == ["clip"] and len(first["clip"]) == n   # every reference, only the scorer asked for
    assert "005.jpg" in a["errors"] and a["summary"]["failed"] == 1
    live, peaks = _tracked(monkeypatch)
    again = {"clip": {}}
    b = folder_mod.score_folders(rec, ref, scorers, batch_size=3, progress=False, cache_dir=tmp_path / "cache",
                                 reference_features=again)                 # references from the cache
    for name in SCORERS:
        assert all(abs(a[name][k] - b[name][k]) < 1e-6 for k in a[name] if a[name][k] is not None)
    assert all(torch.equal(first["clip"][k], again["clip"][k]) for k in first["clip"])
    assert max(peaks) <= (3 + 1) * len(SCORERS)                     # reconstructions only, dropped once scored


def test_caption_faithfulness_encodes_a_batch_at_a_time(scorers):
    from uae.apps import unibench

    clip = scorers["clip"]
    seen = []
    real = clip.encode_text

    class Spy:
        has_text = True

        def encode_text(self, texts):
            seen.append(len(texts))
            return real(texts)

    refs = [Path(f"{i:03d}.jpg") for i in range(75)]
    captions = {r.stem: f"caption number {i} " + "word " * (i % 7) for i, r in enumerate(refs)}
    img = torch.nn.functional.normalize(torch.randn(len(refs), real(["x"]).shape[-1]), dim=-1)
    feats = {"clip": {r.name: img[i] for i, r in enumerate(refs)}}
    out = unibench.caption_faithfulness({"clip": Spy(), "dinov2": scorers["dinov2"]}, captions, feats, refs)
    assert seen == [32, 32, 11] and set(out) == {"clip"}
    for i, r in enumerate(refs[:5]):                                # what one caption at a time gives
        assert abs(out["clip"][r.name] - float((real([captions[r.stem]])[0] * img[i]).sum())) < 1e-5
