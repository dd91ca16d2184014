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

from uae.unibench import UniBenchConfig, main  # noqa: F401  (UniBenchConfig: the flags, for the README's table)

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
