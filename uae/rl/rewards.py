"""Rewards are plain callables: (images, references, prompts) -> per-sample floats.

`ReconstructionReward` is the UAE reward: a weighted sum of Unified-Bench scorer similarities
between each generated image and its reference (the very scorer objects of the benchmark, loaded
once), optionally plus caption faithfulness (CLIP / LongCLIP text-image similarity)."""

from __future__ import annotations

from typing import Sequence

import torch


def to_uint8(images) -> list[torch.Tensor]:
    """PIL images or float (B, 3, H, W) in [0, 1] -> list of uint8 (3, H, W)."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        return list((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]


class ReconstructionReward:
    """total = sum_k w_k * cos(f_k(image), f_k(reference)) [+ w_text * cos(t(prompt), f(reference))].
    Reference features are computed once per reference key and reused across a group."""

    def __init__(self, scorers: dict, weights: dict[str, float], text_weight: float = 0.0, text_scorer: str | None = None):
        unknown = set(weights) - set(scorers)
        if unknown:
            raise ValueError(f"reward weights for scorers that are not loaded: {sorted(unknown)}")
        self.scorers, self.weights = scorers, weights
        self.text_weight, self.text_scorer = text_weight, text_scorer
        self._ref: dict[tuple[str, str], torch.Tensor] = {}
        self.last: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def reference_features(self, name: str, keys: Sequence[str], references: Sequence) -> torch.Tensor:
        # One reference at a time: a reference's feature must not depend on which others happened to
        # be encoded with it (batch composition changes float results; resumed runs must match).
        for k, r in dict(zip(keys, references)).items():
            if (name, k) not in self._ref:
                self._ref[(name, k)] = self.scorers[name].encode_images(to_uint8([r]))[0].cpu()
        return torch.stack([self._ref[(name, k)] for k in keys])

    @torch.no_grad()
    def score(self, images, keys: Sequence[str], references: Sequence, prompts: Sequence[str] | None = None) -> dict:
        """Per-scorer similarities and the weighted total, each a (B,) tensor."""
        imgs = to_uint8(images)
        out, total = {}, torch.zeros(len(imgs))
        for name, w in self.weights.items():
            ref = self.reference_features(name, keys, references)
            sim = (self.scorers[name].encode_images(imgs).cpu() * ref).sum(-1)
            out[name] = sim
            total += w * sim
        if self.text_weight and prompts is not None:
            name = self.text_scorer
            ref = self.reference_features(name, keys, references)
            sim = (self.scorers[name].encode_text(list(prompts)).cpu() * ref).sum(-1)
            out[f"{name}_text"] = sim
            total += self.text_weight * sim
        out["total"] = total
        self.last = out
        return out

    def __call__(self, images, keys, references, prompts=None) -> list[float]:
        return self.score(images, keys, references, prompts)["total"].tolist()


class TargetImageReward:
    """Toy reward for learning tests: 1 - mean |image - target| over pixels in [0, 1], the target
    resized to each image's size (a fixed target image, as in the RL issue's example)."""

    def __init__(self, target: torch.Tensor):
        self.target = target.float() / 255 if target.dtype == torch.uint8 else target.float()

    def __call__(self, images, keys=None, references=None, prompts=None) -> list[float]:
        import torch.nn.functional as F

        x = torch.stack([t.float() / 255 for t in to_uint8(images)])
        tgt = F.interpolate(self.target[None], size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (1 - (x - tgt).abs().flatten(1).mean(1)).tolist()
