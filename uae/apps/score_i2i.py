"""uae-score, eval/Score_i2i.py (and the one-scorer scripts beside it): score a folder of
reconstructions against a folder of references with the Unified-Bench scorers; docs/unified-bench.md,
"Scoring folders"."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from uae.cli import script_main, setup_logging
from uae.config import field, parse_config
from uae.errors import UAEError
from uae.files import atomic_write_json, writable_file
from uae.paths import cache_dir
from uae.random_weights import scorer_checkpoint
from uae.runtime import resolve_device, resolve_dtype
from uae.scoring.folder import details_path, match_folders, score_folders, split_official
from uae.scoring.scorers import SCORERS, WEIGHTS, load_scorer

logger = logging.getLogger("uae.score")


@dataclass
class ScoreConfig:
    """Unified-Bench scoring of a reconstruction folder against a reference folder."""

    image_path: str = field(None, help="folder of reconstructions (generated images)")
    ref_path: str = field(None, aliases=["--ref_image_path"], help="folder of reference images")
    output_file: str = field("results.json", aliases=["--output"], help="JSON file to write (atomically), the release's "
                                                                       "layout; details beside it in <stem>.details.json")
    models: list[str] = field(["clip", "dinov2", "dinov3", "longclip"], help="scorers to use")
    weights: str = field("official", help="official (checkpoints of configs/scorers.yaml, from the hub or "
                                          "the overrides below) or tiny (offline random weights, for tests)")
    clip_checkpoint: str | None = field(None, help="override the clip checkpoint (hub id or folder)")
    dinov2_checkpoint: str | None = field(None, help="override the dinov2 checkpoint (hub id or folder)")
    dinov3_checkpoint: str | None = field(None, help="override the dinov3 checkpoint (hub id or folder)")
    longclip_checkpoint: str | None = field(None, help="override the LongCLIP checkpoint (longclip-L.pt, its folder, or hub id)")
    batch_size: int = field(16, help="images encoded together")
    num_workers: int = field(2, help="DataLoader workers decoding images")
    device: str = field("auto", help="auto, cpu, cuda, cuda:N")
    dtype: str = field("float32", help="float32 (default: scores comparable across machines), bfloat16, float16")
    cache_dir: str | None = field(None, help="reference-feature cache folder (default: <UAE cache>/features)")
    no_cache: bool = field(False, help="do not read or write the reference-feature cache")
    allow_failures: bool = field(False, help="exit 0 even when some pairs could not be scored")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING")

    def __post_init__(self):
        if not self.image_path or not self.ref_path:
            raise UAEError("--image_path (reconstructions) and --ref_path (references) are both required")
        bad = [m for m in self.models if m not in SCORERS]
        if bad or not self.models:
            raise UAEError(f"--models {' '.join(self.models)}: choose from {' '.join(SCORERS)}")
        if self.weights not in WEIGHTS:
            raise UAEError(f"--weights {self.weights}: choose from {' '.join(WEIGHTS)}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise UAEError("--batch_size must be >= 1 and --num_workers >= 0")


def run(cfg: ScoreConfig) -> int:
    # Before any scorer loads: where the results go, and that there is something to score.
    writable_file(cfg.output_file, "--output_file")
    check_some_match(match_folders(cfg.image_path, cfg.ref_path), cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.weights == "tiny":
        logger.warning("tiny scorer weights are RANDOM: scores test the pipeline, not image similarity")
    scorers = {m: load_scorer(m, getattr(cfg, f"{m}_checkpoint") or scorer_checkpoint(m, cfg.weights), device=device,
                              dtype=dtype) for m in dict.fromkeys(cfg.models)}
    feature_cache = None if cfg.no_cache else Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "features"
    result = score_folders(cfg.image_path, cfg.ref_path, scorers, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, cache_dir=feature_cache)
    official, details = split_official(result, list(scorers))
    out = Path(cfg.output_file)
    atomic_write_json(out, official)
    atomic_write_json(details_path(out), details)
    s = result["summary"]
    for m in scorers:
        avg = result[m]["average"]
        logger.info("%-9s average %s", m, "n/a" if avg is None else f"{avg:.4f}")
    logger.info("overall %s over %d valid pair(s); %d failed; wrote %s (details: %s)",
                "n/a" if result["overall"] is None else f"{result['overall']:.4f}", s["valid"], s["failed"],
                cfg.output_file, details_path(out))
    for name, why in result["errors"].items():
        logger.warning("failed %s: %s", name, why)
    for side, names in result["unmatched"].items():
        if names:
            logger.warning("unmatched %s: %s", side, ", ".join(names))
    return 1 if s["failed"] and not cfg.allow_failures else 0


def check_some_match(matching, cfg: ScoreConfig, listed: int = 5) -> None:
    """No pair at all is a mistake of the command (two unrelated folders, a wrong --image_path), not
    a score: a one-line error naming what did not match, exit code 2."""
    if matching.pairs or matching.errors:
        return

    def some(names: list[str]) -> str:
        return ", ".join(names[:listed]) + (f" and {len(names) - listed} more" if len(names) > listed else "")

    raise UAEError(f"no reconstruction in --image_path {cfg.image_path} matches a reference in --ref_path "
                   f"{cfg.ref_path} (same file name, same stem, or recon_<stem>): references "
                   f"{some(matching.unmatched_references)}; reconstructions {some(matching.unmatched_reconstructions)}")


def main_with(argv=None, models: list[str] | None = None, description: str | None = None) -> int:
    cfg = parse_config(ScoreConfig, argv, description=description or __doc__)
    if models is not None:
        cfg.models = models
    setup_logging(cfg.log_level)
    return run(cfg)


@script_main
def main(argv=None, description: str | None = None) -> int:
    return main_with(argv, description=description)


def scorer_main(name: str):
    """The main of a one-scorer script (eval/CLIP.py, DINO_v2.py, ...): Score_i2i's flags, one scorer."""
    @script_main
    def main(argv=None, description: str | None = None) -> int:
        return main_with(argv, models=[name], description=description)
    return main


