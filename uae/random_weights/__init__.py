"""Random-weight builders, a product feature: the default checkpoint `tiny` and the scorer
weights `tiny` (offline runs and tests), `uae-build-checkpoint` (any preset, every plausible
release layout), full-size models on the meta device for the memory plan, and random scorers of
any size. This package depends on uae.models and uae.scoring, never the reverse.

    checkpoint.py   UAE checkpoints in the official layout, and UAE models from a preset
    scorers.py      scorer checkpoints in the official formats
    unified.py      Unified-Bench's other models: Janus, a VLM captioner, an SD3 pipeline (`tiny` of
                    the runner's --checkpoint / --captioner / --generator)
    embedded.py     the cached `tiny` artefacts the command lines resolve by name
    cli.py          uae-build-checkpoint
"""

from uae.random_weights.checkpoint import (ReleaseLayout, build_checkpoint, build_processor, build_uae,  # noqa: F401
                                           llm_config, load_preset, preset_key)
from uae.random_weights.embedded import (TINY, embedded_checkpoint, from_tiny, resolve_checkpoint,  # noqa: F401
                                         scorer_checkpoint, tiny_scorer_dir)
from uae.random_weights.scorers import build_scorer_checkpoints, build_scorer_model  # noqa: F401
