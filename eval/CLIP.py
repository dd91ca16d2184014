"""Score reconstructions against references with the clip scorer only (see Score_i2i.py for flags).

    python eval/CLIP.py --image_path recon/ --ref_path references/ --output_file clip.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from Score_i2i import main_with  # noqa: E402

from uae.cli import script_main  # noqa: E402


@script_main
def main(argv=None) -> int:
    return main_with(argv, models=["clip"])


if __name__ == "__main__":
    raise SystemExit(main())
