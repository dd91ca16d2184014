"""The random-weight artefacts the command lines use by name: the checkpoint `tiny` (every
script's default) and the scorer weights `tiny`, each built on first use into the cache folder
(uae.paths.cache_dir), keyed by the content of its preset or specs, under a file lock so that
concurrent processes build it once. The entry layer (the command lines, `Run`) resolves the names
here; the model and scorer loaders only ever see folders and hub ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import uae
from uae.errors import UAEError
from uae.files import build_once
from uae.hashing import content_key
from uae.models.layout import MANIFEST
from uae.paths import CONFIG_DIR, cache_dir
from uae.random_weights.checkpoint import build_checkpoint, preset_key
from uae.random_weights.scorers import build_scorer_checkpoints
from uae.scoring.scorers import WEIGHTS, load_specs

logger = logging.getLogger(__name__)

TINY = "tiny"


def _embedded_path() -> Path:
    return cache_dir() / f"tiny-v{uae.__version__}-{preset_key(TINY)}"


def from_tiny(checkpoint: str, depth: int = 8) -> bool:
    """Whether `checkpoint` is the embedded tiny checkpoint (by name or folder) or a run's final/
    trained from it, followed through the manifests' recorded source checkpoints: its scorer
    weights `auto` are then the tiny ones too (a model trained from random weights is no real one)."""
    if checkpoint == TINY or (Path(checkpoint).is_dir() and Path(checkpoint).resolve() == _embedded_path().resolve()):
        return True
    manifest = Path(checkpoint) / MANIFEST
    if depth == 0 or not manifest.is_file():
        return False
    try:
        source = json.loads(manifest.read_text()).get("config", {}).get("checkpoint")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(source, str) and from_tiny(source, depth - 1)


def embedded_checkpoint() -> Path:
    """The embedded default: a tiny random UAE checkpoint in the official layout."""
    path = _embedded_path()
    if not path.exists():
        logger.info("building the embedded tiny checkpoint in %s (seconds, offline)", path)
    return build_once(path, lambda p: build_checkpoint(p, TINY, seed=0))


def resolve_checkpoint(checkpoint: str) -> str:
    """`tiny`: the embedded random checkpoint's folder (with a warning: its output is noise);
    anything else (a folder, a hub id) unchanged."""
    if checkpoint != TINY:
        return checkpoint
    path = str(embedded_checkpoint())
    logger.warning("using the embedded tiny checkpoint %s: its weights are RANDOM, captions are gibberish and "
                   "images are noise. Pass --checkpoint with the real weights (see README) for meaningful output.",
                   path)
    return path


def tiny_scorer_dir() -> Path:
    """Random scorer checkpoints (configs/scorers.yaml's `tiny` sizes), rebuilt when the specs change."""
    key = content_key((CONFIG_DIR / "scorers.yaml").read_bytes())[:10]
    path = cache_dir() / f"scorers-tiny-v{uae.__version__}-{key}"
    if not path.exists():
        logger.info("building tiny random scorer checkpoints in %s", path)
    return build_once(path, lambda p: build_scorer_checkpoints(p, TINY))


def scorer_checkpoint(name: str, weights: str, specs: dict | None = None) -> str:
    """Where scorer `name`'s weights are: configs/scorers.yaml's checkpoint (hub id or folder) for
    `official`, the random ones for `tiny`."""
    if weights not in WEIGHTS:
        raise UAEError(f"scorer weights {weights!r}: choose from {', '.join(WEIGHTS)}")
    specs = specs or load_specs()
    if name not in specs:
        raise UAEError(f"unknown scorer {name!r}: choose from {list(specs)}")
    return str(tiny_scorer_dir() / name) if weights == TINY else specs[name]["checkpoint"]
