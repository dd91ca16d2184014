"""Precomputed frozen-model outputs on disk (VAE latent posteriors, LLM hidden states), one
safetensors file per item, keyed by content and stored under a namespace that fingerprints the
model and the settings, so a changed model or resolution never reads stale entries."""

from __future__ import annotations

from pathlib import Path

import torch

from uae.files import atomic_write_bytes


class DiskCache:
    def __init__(self, folder: Path, namespace: str):
        self.dir = Path(folder) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(key)))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        # Each entry its own copy: safetensors refuses entries that share memory (a conditioning whose
        # two branches hold one pooled vector).
        atomic_write_bytes(self.path(key), save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}))
