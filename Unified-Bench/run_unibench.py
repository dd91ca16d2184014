"""Unified-Bench end to end: caption each reference, regenerate it from the caption, score.

    python Unified-Bench/run_unibench.py                                   # tiny model, sample references
    python Unified-Bench/run_unibench.py --checkpoint zhiyuanyan1/UAE \
        --ref_path Unified-Bench/UniBench/Image --output_dir Unified-Bench/results/uae
    python Unified-Bench/run_unibench.py --recon_from other/recon --captions_from other/captions \
        --ref_path Unified-Bench/UniBench/Image --output_dir Unified-Bench/results/other

Writes results.json, results.md, scores.png and report.html into --output_dir; a rerun resumes.
On N GPUs: `accelerate launch --num_processes N Unified-Bench/run_unibench.py ...` splits captioning
and generation over the processes (same images as one process); the main process scores.
Exit code 0 when every pair was scored, 1 when some failed (0 with --allow_failures), 2 on bad settings.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from uae.cli import script_main, setup_logging  # noqa: E402
from uae.config import field, parse_config, save_config  # noqa: E402
from uae.errors import UAEError  # noqa: E402
from uae.models.sampling import check_caption_sampling  # noqa: E402

logger = logging.getLogger("uae.unibench")


@dataclass
class UniBenchConfig:
    """Unified-Bench: image -> caption -> image reconstruction similarity of a UAE model."""

    checkpoint: str = field("tiny", help="model under test: folder in the official layout, hub id, or 'tiny'")
    ref_path: str = field(str(HERE / "UniBench" / "sample"), help="reference images (the real benchmark: UniBench/Image, 100 images)")
    output_dir: str = field(str(HERE / "results" / "run"), help="run folder (captions/, recon/, results.*, report.html)")
    models: list[str] = field(["clip", "dinov2", "dinov3", "longclip"], help="scorers")
    scorer_weights: str = field("auto", help="auto (tiny for the tiny model, else official), official, tiny")
    captions_from: str | None = field(None, help="use another system's captions: folder of <stem>.txt or .jsonl")
    recon_from: str | None = field(None, help="score another system's reconstructions (skips the model)")
    steps: int = field(40, help="denoising steps")
    guidance_scale: float = field(5.0, help="classifier-free guidance")
    height: int = field(1024, help="reconstruction height")
    width: int = field(1024, help="reconstruction width")
    max_new_tokens: int = field(512, help="caption length limit")
    temperature: float = field(0.7, help="caption sampling temperature")
    top_k: int | None = field(None, help="caption sampling top-k (default: llm/generation_config.json's)")
    top_p: float | None = field(None, help="caption sampling top-p (default: llm/generation_config.json's)")
    repetition_penalty: float | None = field(None, help="caption repetition penalty (default: llm/generation_config.json's)")
    exif_transpose: bool = field(False, help="rotate references by their EXIF orientation before captioning (the "
                                             "release does not)")
    seed: int = field(42, help="seed of every caption and reconstruction (the release generates with 42)")
    increment_seed: bool = field(False, help="reference i (in sorted order) uses seed + i instead of seed")
    batch_size: int = field(4, help="references per batch (captioning, generation, scoring); results do not depend on it")
    dit_batching: bool = field(False, help="prompts of a batch whose conditioning has the same length share DiT calls: "
                                           "faster where lengths coincide, but images then match one-at-a-time "
                                           "generation only to about 1/255 on a few pixels (off: exact)")
    caption_batching: bool = field(False, help="caption a batch in one generate() call: faster on a GPU, but a sampled "
                                               "caption then depends on its batch-mates (off: each reference alone)")
    num_workers: int = field(2, help="DataLoader workers decoding images for scoring")
    device: str = field("auto", help="auto, cpu, cuda, cuda:N")
    dtype: str = field("auto", help="model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    scorer_dtype: str = field("float32", help="scorer dtype")
    no_cache: bool = field(False, help="do not use the reference-feature cache")
    allow_failures: bool = field(False, help="exit 0 even when some pairs failed")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING")

    def __post_init__(self):
        from uae.scoring.scorers import SCORERS

        bad = [m for m in self.models if m not in SCORERS]
        if bad or not self.models:
            raise UAEError(f"--models {' '.join(self.models)}: choose from {' '.join(SCORERS)}")
        if self.scorer_weights not in ("auto", "official", "tiny"):
            raise UAEError(f"--scorer_weights {self.scorer_weights}: choose from auto official tiny")
        if self.recon_from and not Path(self.recon_from).is_dir():
            raise UAEError(f"--recon_from {self.recon_from}: no such folder")
        for name in ("steps", "height", "width", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UAEError(f"--{name} must be at least 1")
        check_caption_sampling(self)


@script_main
def main(argv=None) -> int:
    cfg = parse_config(UniBenchConfig, argv, description=__doc__)
    setup_logging(cfg.log_level)
    from uae.unibench import run_unibench

    result = run_unibench(cfg)
    if result is None:  # a non-main process of a multi-process run: the main one reports
        return 0
    save_config(cfg, Path(cfg.output_dir) / "unibench_config.yaml")
    s = result["summary"]
    logger.info("overall %s over %d valid pair(s), %d failed: see %s/report.html",
                "n/a" if result["overall"] is None else f"{result['overall']:.4f}", s["valid"], s["failed"],
                cfg.output_dir)
    return 1 if s["failed"] and not cfg.allow_failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
