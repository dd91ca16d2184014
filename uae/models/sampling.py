"""Checks of the caption sampling settings a script's config may carry (top_k, top_p,
repetition_penalty; None means "as llm/generation_config.json says")."""

from __future__ import annotations

from uae.errors import UAEError


def check_caption_sampling(cfg) -> None:
    if cfg.top_k is not None and cfg.top_k < 0:
        raise UAEError(f"--top_k must be >= 0 (0 switches it off; got {cfg.top_k})")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise UAEError(f"--top_p must be in (0, 1] (got {cfg.top_p})")
    if cfg.repetition_penalty is not None and cfg.repetition_penalty <= 0:
        raise UAEError(f"--repetition_penalty must be > 0 (got {cfg.repetition_penalty})")
