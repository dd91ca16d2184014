"""Unified-Bench for any unified model: a small protocol for a model under test (it captions
images with its understanding side and regenerates images from text with its generation side)
and adapters that implement it on the field's libraries. See `protocol.py`.

    protocol.py     UnifiedModel, RunSettings (what every model is built with), check_model
    uae_model.py    --model uae: the UAE facade (optionally with another captioner: Tab. 3)
    janus.py        --model janus: Janus / Janus-Pro through transformers
    captioner.py    any transformers image-text-to-text captioner
    pipeline.py     --model pipeline: a captioner + any diffusers text-to-image pipeline
    loading.py      --model / --model_args -> a model (module:Class for a user's own)
"""

from uae.unified.protocol import RunSettings, UnifiedModel, check_model  # noqa: F401
