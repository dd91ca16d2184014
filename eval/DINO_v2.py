"""Score reconstructions against references with the dinov2 scorer only (see Score_i2i.py for flags).

    python eval/DINO_v2.py --image_path recon/ --ref_path references/ --output_file dinov2.json
"""

from uae.apps.score_i2i import scorer_main

main = scorer_main("dinov2")

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
