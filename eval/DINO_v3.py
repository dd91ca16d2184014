"""Score reconstructions against references with the dinov3 scorer only (see Score_i2i.py for flags).

    python eval/DINO_v3.py --image_path recon/ --ref_path references/ --output_file dinov3.json
"""

from uae.apps.score_i2i import scorer_main

main = scorer_main("dinov3")

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
