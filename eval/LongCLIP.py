"""Score reconstructions against references with the longclip scorer only (see Score_i2i.py for flags).

    python eval/LongCLIP.py --image_path recon/ --ref_path references/ --output_file longclip.json
"""

from uae.apps.score_i2i import scorer_main

main = scorer_main("longclip")

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
