"""Rewards in TRL's shape: a list of named reward functions with one weight each; the total is
their weighted sum, and every function's own values are logged as `reward_<name>`.

A reward function is a plain callable `(images, keys, references, prompts) -> list[float]`, one
value per sample: `images` the generated images (PIL, or float (B, 3, H, W) in [0, 1]), `keys` the
references' names, `references` their PIL images, `prompts` the captions. Built in, by name:

    clip, dinov2, dinov3, longclip   image similarity to the reference (the Unified-Bench scorers,
                                     the same objects the benchmark uses, loaded once)
    text:clip, text:longclip         the caption's similarity to the reference (caption faithfulness)
    module:callable                  any importable callable, e.g. `my_rewards:aesthetic`
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from uae.errors import UAEError
from uae.images import to_uint8
from uae.random_weights import scorer_checkpoint
from uae.runtime import resolve_dtype
from uae.scoring.scorers import SCORERS, load_scorer

logger = logging.getLogger(__name__)


class _ReferenceFeatures:
    """Reference features computed once per (scorer, reference key) and reused across a group and
    across iterations. One reference at a time: its feature must not depend on which others
    happened to be encoded with it (batch composition changes float results; resumes must match)."""

    def __init__(self):
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, scorer, keys: Sequence[str], references: Sequence) -> torch.Tensor:
        for k, r in dict(zip(keys, references)).items():
            if (scorer.name, k) not in self.cache:
                self.cache[(scorer.name, k)] = scorer.encode_images(to_uint8([r]))[0].cpu()
        return torch.stack([self.cache[(scorer.name, k)] for k in keys])


class ImageSimilarity:
    """cos(f(image), f(reference)) with one Unified-Bench scorer."""

    def __init__(self, scorer, references: _ReferenceFeatures):
        self.scorer, self.references = scorer, references

    @torch.no_grad()
    def __call__(self, images, keys, references, prompts=None) -> list[float]:
        ref = self.references(self.scorer, keys, references)
        return (self.scorer.encode_images(to_uint8(images)).cpu() * ref).sum(-1).tolist()


class CaptionSimilarity:
    """cos(text(caption), image(reference)) with CLIP or LongCLIP."""

    def __init__(self, scorer, references: _ReferenceFeatures):
        if not scorer.has_text:
            raise UAEError(f"reward text:{scorer.name}: {scorer.name} has no text encoder (use clip or longclip)")
        self.scorer, self.references = scorer, references

    @torch.no_grad()
    def __call__(self, images, keys, references, prompts) -> list[float]:
        ref = self.references(self.scorer, keys, references)
        return (self.scorer.encode_text(list(prompts)).cpu() * ref).sum(-1).tolist()


@dataclass
class RewardFunc:
    name: str
    weight: float
    fn: Callable


class Rewards:
    """Named, weighted reward functions: `score` gives every function's values and the weighted
    `total`; calling the object gives the total."""

    def __init__(self, funcs: Sequence[RewardFunc]):
        names = [f.name for f in funcs]
        if len(set(names)) != len(names):
            raise UAEError(f"reward functions with the same name: {names}")
        self.funcs = list(funcs)

    @classmethod
    def wrap(cls, reward) -> "Rewards":
        """A Rewards as it is, or one plain callable as the only reward (weight 1)."""
        return reward if isinstance(reward, Rewards) else cls([RewardFunc("reward", 1.0, reward)])

    def score(self, images, keys, references, prompts) -> dict[str, list[float]]:
        out, total = {}, None
        for f in self.funcs:
            values = [float(v) for v in f.fn(images, keys, references, prompts)]
            if len(values) != len(keys):
                raise UAEError(f"reward {f.name} returned {len(values)} value(s) for {len(keys)} sample(s)")
            out[f.name] = values
            total = [f.weight * v for v in values] if total is None else [t + f.weight * v for t, v in zip(total, values)]
        out["total"] = total
        return out

    def __call__(self, images, keys, references, prompts) -> list[float]:
        return self.score(images, keys, references, prompts)["total"]


def load_callable(spec: str) -> Callable:
    """`module:callable` (or `module.callable`) -> the callable."""
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UAEError(f"reward {spec!r}: cannot import {name!r} from module {module!r} ({e})") from None
    if not callable(obj):
        raise UAEError(f"reward {spec!r} is not callable")
    return obj


def build_rewards(specs: Sequence[str], weights: Sequence[float] | None, *, scorer_weights: str, device,
                  dtype: torch.dtype | None = None) -> Rewards:
    """The Rewards of a config's `reward_funcs` / `reward_weights` (module docstring); the scorers
    they need are loaded once."""
    weights = list(weights) if weights is not None else [1.0] * len(specs)
    scorers: dict[str, object] = {}
    refs = _ReferenceFeatures()

    def scorer(name):
        if name not in SCORERS:
            raise UAEError(f"reward {name!r}: unknown scorer; built-in rewards are {', '.join(SCORERS)}, "
                           f"text:clip, text:longclip, or module:callable")
        if name not in scorers:
            scorers[name] = load_scorer(name, scorer_checkpoint(name, scorer_weights), device=device,
                                        dtype=dtype or resolve_dtype("float32", device))
        return scorers[name]

    funcs = []
    for spec, w in zip(specs, weights):
        if spec.startswith("text:"):
            funcs.append(RewardFunc(f"text_{spec[5:]}", w, CaptionSimilarity(scorer(spec[5:]), refs)))
        elif ":" in spec:
            fn = load_callable(spec)
            funcs.append(RewardFunc(getattr(fn, "__name__", spec.rpartition(":")[2]), w, fn))
        else:
            funcs.append(RewardFunc(spec, w, ImageSimilarity(scorer(spec), refs)))
    return Rewards(funcs)


def default_reward(cfg, device, dtype=None):
    """The configured rewards (`reward_funcs`, `reward_weights`; the reconstruction similarity by
    default), their scorers in `dtype` (the frozen dtype of the precision policy)."""
    return build_rewards(cfg.reward_funcs, cfg.reward_weights, device=device, dtype=dtype,
                         scorer_weights=cfg.scorer_weights)


def score(reward, images, keys, references, prompts) -> dict[str, list[float]]:
    """{"total": [...], and each reward function's values}."""
    return Rewards.wrap(reward).score(images, keys, references, prompts)
