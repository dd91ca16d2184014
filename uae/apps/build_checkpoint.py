"""uae-build-checkpoint (python -m uae.random_weights): a random-weight UAE checkpoint in the
official layout, offline.

    python -m uae.random_weights --out /tmp/uae-tiny [--preset tiny|mid|full|PATH] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging

from uae.cli import setup_logging
from uae.config import HelpFormatter
from uae.random_weights.checkpoint import build_checkpoint

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--preset", default="tiny", help="tiny, mid, full, or a path to a preset YAML")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dtype", default=None, help="create the weights in this dtype (bfloat16 for full size)")
    parser.add_argument("--device", default=None, help="create and initialise the weights here (cuda for full size)")
    args = parser.parse_args(argv)
    setup_logging()
    path = build_checkpoint(args.out, args.preset, args.seed, overwrite=args.overwrite, dtype=args.dtype,
                            device=args.device)
    logger.info("wrote %s", path)
    return 0
