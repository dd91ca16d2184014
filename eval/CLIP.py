"""Score reconstructions against references with the clip scorer only (see Score_i2i.py for flags).

    python eval/CLIP.py --image_path recon/ --ref_path references/ --output_file clip.json
"""

from uae.apps.score_i2i import scorer_main

main = scorer_main("clip")

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
