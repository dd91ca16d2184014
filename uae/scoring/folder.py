"""Score a folder of reconstructions against a folder of references with several scorers.

Fast by design: each file is decoded once per run and shared by all scorers (DataLoader workers
decode), images are encoded in batches, and reference features are cached on disk keyed by
scorer (weights + preprocessing) and file content, so a new model's images are the only ones
encoded against the same references. Only features are kept in memory, never images, and only
until their pair is scored: memory does not grow with the number of pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from uae.errors import UAEError
from uae.files import atomic_write_bytes
from uae.hashing import content_key
from uae.images import list_images, load_image
from uae.runtime import release_freed_memory

logger = logging.getLogger(__name__)


@dataclass
class Matching:
    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (key, reconstruction, reference)
    errors: dict[str, str] = field(default_factory=dict)                # reference name -> why unmatched
    unmatched_references: list[str] = field(default_factory=list)
    unmatched_reconstructions: list[str] = field(default_factory=list)


def match_folders(image_dir: str | Path, ref_dir: str | Path) -> Matching:
    """Pair each reference with its reconstruction: same file name, else same stem, else
    `recon_<stem>`. Ambiguous and missing matches are reported, never dropped silently."""
    recons = list_images(image_dir, "reconstruction (--image_path)")
    refs = list_images(ref_dir, "reference (--ref_path)")
    by_name = {p.name: p for p in recons}
    by_stem: dict[str, list[Path]] = {}
    for p in recons:
        by_stem.setdefault(p.stem, []).append(p)
    m, used = Matching(), set()
    for ref in refs:
        hit = by_name.get(ref.name)
        if hit is None:
            for stem in (ref.stem, f"recon_{ref.stem}"):
                cands = by_stem.get(stem, [])
                if len(cands) > 1:
                    m.errors[ref.name] = f"ambiguous: several reconstructions match ({', '.join(c.name for c in cands)})"
                    used.update(cands)
                    break
                if cands:
                    hit = cands[0]
                    break
        if hit is not None:
            m.pairs.append((ref.name, hit, ref))
            used.add(hit)
        elif ref.name not in m.errors:
            m.unmatched_references.append(ref.name)
    m.unmatched_reconstructions = [p.name for p in recons if p not in used]
    return m


def file_digest(path: Path) -> str:
    return content_key(path.read_bytes())


class _Decode(torch.utils.data.Dataset):
    """Decodes each image once and resizes/crops it for every scorer, in the DataLoader's
    workers (so decoding and resizing overlap the forward passes; normalising is done on the
    batch). Returns (index, {scorer: pixel tensor}, None) or (index, None, reason the image
    cannot be read)."""

    def __init__(self, paths: Sequence[Path], preprocess: dict):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torchvision.transforms.v2.functional as TF

        try:
            pil = load_image(self.paths[i])
        except UAEError as e:
            return i, None, str(e)
        image = None
        out = {}
        for name, pre in self.preprocess.items():
            if pre.backend == "pil":  # PIL-resizing scorers take the decoded image as it is
                out[name] = pre.geometry(pil)
            else:
                image = TF.pil_to_tensor(pil) if image is None else image
                out[name] = pre.geometry(image)
        return i, out, None


class FeatureCache:
    """Reference features on disk, one safetensors file per scorer fingerprint, keyed by content."""

    def __init__(self, folder: Path | None, fingerprint: str):
        self.path = None if folder is None else Path(folder) / f"{fingerprint}.safetensors"
        self.data: dict[str, torch.Tensor] = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            from safetensors.torch import load_file

            try:
                self.data = load_file(str(self.path))
            except Exception as e:  # a damaged cache is rebuilt, not trusted
                logger.warning("ignoring unreadable feature cache %s (%s)", self.path, e)

    def get(self, key: str) -> torch.Tensor | None:
        return self.data.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.data[key] = value.detach().float().cpu().contiguous()
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        from safetensors.torch import save

        atomic_write_bytes(self.path, save(self.data))


@torch.no_grad()
def iter_features(paths: Sequence[Path], scorers: dict, *, batch_size: int, num_workers: int, progress: bool = True):
    """Features of the files for every scorer, a batch at a time, decoding each file once. Yields
    ({path: {scorer: feature}}, {path: error}) per batch, in the order of `paths`."""
    from tqdm.auto import tqdm

    if not paths:
        return
    loader = torch.utils.data.DataLoader(_Decode(paths, {n: s.preprocess for n, s in scorers.items()}),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=list,
                                         shuffle=False)
    for batch in tqdm(loader, desc="encoding", total=len(loader), disable=not progress, leave=False):
        ok = [(i, pix) for i, pix, err in batch if err is None]
        errors = {paths[i]: err for i, _, err in batch if err is not None}
        feats: dict[Path, dict[str, torch.Tensor]] = {paths[i]: {} for i, _ in ok}
        for name, scorer in scorers.items():
            if not ok:
                break
            pixels = scorer.preprocess.normalize(torch.stack([pix[name] for _, pix in ok]))
            out = scorer(pixels.to(scorer.device, scorer.dtype)).cpu()
            for (i, _), f in zip(ok, out):
                feats[paths[i]][name] = f.clone()  # its own storage: dropping it frees it
        del batch, ok
        yield feats, errors
        release_freed_memory()  # keeps resident memory flat over any number of batches


def encode_files(paths: Sequence[Path], scorers: dict, *, batch_size: int, num_workers: int,
                 progress: bool = True) -> tuple[dict[str, dict[Path, torch.Tensor]], dict[Path, str]]:
    """Features of every file for every scorer, decoding each file once. Returns
    ({scorer: {path: feature}}, {path: error}): all of them in memory (`score_folders` streams)."""
    feats: dict[str, dict[Path, torch.Tensor]] = {name: {} for name in scorers}
    errors: dict[Path, str] = {}
    for batch, errs in iter_features(paths, scorers, batch_size=batch_size, num_workers=num_workers, progress=progress):
        errors.update(errs)
        for path, per in batch.items():
            for name, f in per.items():
                feats[name][path] = f
    return feats, errors


def score_folders(image_dir: str | Path, ref_dir: str | Path, scorers: dict, *, batch_size: int = 16,
                  num_workers: int = 0, cache_dir: Path | None = None, progress: bool = True,
                  reference_features: dict | None = None) -> dict:
    """The Unified-Bench JSON: per scorer, per-image cosine similarity and average/min/max over the
    valid pairs; `overall` = mean of the scorer averages; failures and unmatched files listed.
    `reference_features`, when given, is filled with {scorer: {reference name: feature}} for the
    scorers it names as keys (every scorer when it is empty).

    Memory does not grow with the number of pairs: files are encoded in pair order (each
    reconstruction beside its reference), a pair is scored as soon as both features exist, and
    then its features are dropped; only the scores, the features asked for in
    `reference_features` and the feature cache (when used) are kept."""
    m = match_folders(image_dir, ref_dir)
    caches = {name: FeatureCache(cache_dir, s.fingerprint) for name, s in scorers.items()}
    ref_keys = {ref: file_digest(ref) for _, _, ref in m.pairs}
    cached = {ref for ref, key in ref_keys.items() if all(c.get(key) is not None for c in caches.values())}
    todo = list(dict.fromkeys(p for _, rec, ref in m.pairs for p in (rec, ref) if p is rec or p not in cached))
    logger.info("%d pairs; encoding %d file(s), %d reference(s) from the feature cache",
                len(m.pairs), len(todo), len(cached))
    keep = None
    if reference_features is not None:
        keep = list(reference_features) or list(scorers)
        for name in keep:
            reference_features[name] = {}
    pairs_of: dict[Path, list[tuple[str, Path, Path]]] = {}  # file -> its pairs
    for pair in m.pairs:
        for p in dict.fromkeys(pair[1:]):
            pairs_of.setdefault(p, []).append(pair)
    unscored = {p: len(v) for p, v in pairs_of.items()}  # file -> its pairs not scored yet
    feats: dict[Path, dict[str, torch.Tensor]] = {}       # features of files with a pair still to score
    errors: dict[Path, str] = {}
    scores: dict[str, dict[str, float]] = {}               # pair key -> {scorer: cosine}
    done: set[str] = set()                                 # pairs scored or failed

    def ready(p: Path) -> bool:
        return p in feats or p in errors or p in cached

    def arrived(path: Path) -> None:
        """`path` was encoded (or failed): score the pairs it completes, drop features no pair needs."""
        for key, rec, ref in pairs_of.get(path, ()):
            if key in done or not (ready(rec) and ready(ref)):
                continue
            done.add(key)
            if rec not in errors and ref not in errors:
                b = feats[ref] if ref in feats else {n: c.get(ref_keys[ref]) for n, c in caches.items()}
                scores[key] = {name: float((b[name] * feats[rec][name]).sum()) for name in scorers}
            for p in dict.fromkeys((rec, ref)):
                unscored[p] -= 1
                if unscored[p] == 0:
                    feats.pop(p, None)

    for batch, errs in iter_features(todo, scorers, batch_size=batch_size, num_workers=num_workers,
                                     progress=progress):
        errors.update(errs)
        for path, per in batch.items():
            if path in ref_keys:
                for name, cache in caches.items():
                    cache.put(ref_keys[path], per[name])
                if keep is not None:
                    for name in keep:
                        reference_features[name][path.name] = per[name]
            feats[path] = per
        for path in list(batch) + list(errs):
            arrived(path)
    for cache in caches.values():
        cache.save()
    if keep is not None:
        for ref in cached:
            for name in keep:
                reference_features[name][ref.name] = caches[name].get(ref_keys[ref])

    result: dict = {}
    failed = dict(m.errors)
    for key, rec, ref in m.pairs:
        why = [f"{p.name}: {errors[p]}" for p in (rec, ref) if p in errors]
        if why:
            failed[key] = "; ".join(why)
    for name in scorers:
        per = {key: scores[key][name] for key, rec, ref in m.pairs if key not in failed}
        vals = list(per.values())
        # No valid pair: null, not NaN (NaN is not JSON).
        result[name] = {**per, "average": sum(vals) / len(vals) if vals else None,
                        "min": min(vals) if vals else None, "max": max(vals) if vals else None}
    averages = [result[n]["average"] for n in scorers if result[n]["average"] is not None]
    result["overall"] = sum(averages) / len(averages) if averages else None
    result["summary"] = {"pairs": len(m.pairs) + len(m.errors), "valid": len(m.pairs) + len(m.errors) - len(failed),
                         "failed": len(failed), "scorers": list(scorers)}
    result["errors"] = failed
    result["unmatched"] = {"references": m.unmatched_references, "reconstructions": m.unmatched_reconstructions}
    return result


def split_official(result: dict, scorers: list[str]) -> tuple[dict, dict]:
    """(the release's JSON: {scorer: {image: score, ..., average, min, max}}, everything else:
    overall, summary, errors, unmatched)."""
    return {name: result[name] for name in scorers}, {k: v for k, v in result.items() if k not in scorers}


def details_path(output: Path) -> Path:
    """Where the details of `output` go: results.json -> results.details.json."""
    output = Path(output)
    return output.with_name(f"{output.stem}.details.json")
