"""Score reconstructions against references with several scorers (Unified-Bench metric).

    python eval/Score_i2i.py --image_path recon/ --ref_path Unified-Bench/UniBench/Image \\
        --output_file results.json --models clip dinov2 dinov3 longclip

Writes the release's JSON layout to --output_file, exactly {scorer: {image: score, ..., "average",
"min", "max"}}, so scripts that read the official files keep working; the overall mean of the
scorer averages, the summary, failures with their reasons and unmatched files go to the sidecar
<output>.details.json and the log. Exit code 0 when every pair was scored, 1 when some failed
(0 with --allow_failures), 2 on a bad setting or folder.
"""

from uae.apps.score_i2i import ScoreConfig, main  # noqa: F401  (ScoreConfig: the flags, for the docs' table)

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
