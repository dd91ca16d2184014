"""uae-build-checkpoint (python -m uae.random_weights): a random-weight UAE checkpoint in the
official layout, offline.

    python -m uae.random_weights --out /tmp/uae-tiny [--preset tiny|mid|full|PATH] [--seed 0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from uae.cli import script_main
from uae.config import check_fields, field, parse_config
from uae.errors import UAEError
from uae.random_weights.checkpoint import build_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class BuildCheckpointConfig:
    """A random-weight UAE checkpoint in the official layout."""

    out: str = field(help="folder to create")
    preset: str = field("tiny", help="tiny, mid, full, or a path to a preset YAML")
    seed: int = field(0, help="seed of the random weights")
    overwrite: bool = field(False, help="replace --out if it exists")
    dtype: str | None = field(None, choices=["float32", "bfloat16", "float16"],
                              help="create the weights in this dtype (bfloat16 for full size)")
    device: str | None = field(None, help="create and initialise the weights here (cuda for full size)")

    def __post_init__(self):
        check_fields(self)


@script_main
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BuildCheckpointConfig, argv, description=__doc__)
    if Path(cfg.out).exists() and not cfg.overwrite:  # before torch and the models load
        raise UAEError(f"--out {cfg.out} exists: pass --overwrite to replace it, or choose another folder")
    path = build_checkpoint(cfg.out, cfg.preset, cfg.seed, overwrite=cfg.overwrite, dtype=cfg.dtype,
                            device=cfg.device)
    logger.info("wrote %s", path)
    return 0
