"""UAE demo: text -> image, image -> caption, and image -> caption -> image.

    python demo.py --input_text "a red cube on a table" --output_path out/cube.png
    python demo.py --input_img photo.jpg --prompt_only              # prints the caption
    python demo.py --input_img photo.jpg --output_path out/recon.png  # caption + reconstruction
    python demo.py --prompt_file prompts.txt --output_dir out/batch  # one image per line
    python demo.py --input_img photos/ --output_dir out/recon        # a folder of images

Without --checkpoint the embedded tiny checkpoint is used (random weights: noise images); pass
--checkpoint zhiyuanyan1/UAE or a local folder in the official layout for the real model.
"""

from uae.apps.demo import DemoConfig, main  # noqa: F401  (DemoConfig: the flags, for the docs' table)

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
