"""What the adapters share: the batches a seed policy allows, caption sampling settings read as
UAE's encoder reads them (the run's temperature, the rest from the checkpoint's
generation_config.json unless given), loading errors that name the setting, and telling a UAE
checkpoint folder apart from the field's formats."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from uae.errors import UAEError
from uae.images import to_rgb
from uae.models.encoder import token_bar
from uae.runtime import resolve_dtype

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("top_k", "top_p", "repetition_penalty")


def seed_groups(n: int, seeds: Sequence[int], batched: bool) -> list[tuple[list[int], int]]:
    """(indices, seed) of each generate() call: one item per call, seeded with its own seed (the
    default: outputs do not depend on batching), or all items in one call seeded with the first
    seed (`batched`: faster; an output then depends on its batch-mates)."""
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} items")
    if n == 0:
        return []
    return [(list(range(n)), seeds[0])] if batched else [([i], s) for i, s in enumerate(seeds)]


@torch.no_grad()
def caption_images(model, processor, inputs, images: Sequence, seeds: Sequence[int], batched: bool,
                   progress: bool = False, **generate_kwargs) -> list[str]:
    """Captions of `images` by a transformers model: `inputs(images)` are the prompts, each
    generate() call (one image, or the batch with `batched`) after torch.manual_seed(its seed),
    decoded without the prompt and special tokens, unstripped. `progress`: a bar of each call's
    tokens."""
    images = [to_rgb(im) for im in images]
    out: list[str] = [""] * len(images)
    for idx, seed in seed_groups(len(images), seeds, batched):
        batch = inputs([images[i] for i in idx])
        torch.manual_seed(seed)
        ids = model.generate(**batch, **generate_kwargs,
                             streamer=token_bar(generate_kwargs.get("max_new_tokens"), progress))
        for i, text in zip(idx, processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)):
            out[i] = text
    return out


def caption_prompt(processor, instruction: str) -> str:
    """The release's caption prompt through a checkpoint's own chat template: one user turn holding
    the instruction, then the image, and the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "image"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def caption_sampling(settings, generation_config) -> tuple[dict, dict]:
    """(keyword arguments for generate(), the effective values for settings()): sampling at the
    run's temperature, top_k / top_p / repetition_penalty from the run when given, else from the
    checkpoint's generation_config.json (as UAE's captioner reads them); or, with the run's
    do_sample False, greedy decoding: no temperature / top_k / top_p passed (generate() applies
    none of them without sampling, whatever the checkpoint's file says), repetition_penalty as
    above (a logits processor of greedy decoding too)."""
    sample = settings.do_sample
    keys = SAMPLING_KEYS if sample else ("repetition_penalty",)
    given = {k: getattr(settings, k) for k in keys if getattr(settings, k) is not None}
    head = {"do_sample": sample, **({"temperature": settings.temperature} if sample else {}),
            "max_new_tokens": settings.max_new_tokens}
    kwargs = {**head, **given}
    effective = dict(head) if sample else {**head, "decoding": "greedy",
                                           **{k: "unused: greedy" for k in ("temperature", "top_k", "top_p")}}
    for k in keys:
        value = given.get(k, getattr(generation_config, k, None))
        effective[k] = "unset: transformers' default" if value is None else value
    effective["from_generation_config"] = [k for k in keys if k not in given]
    return kwargs, effective


def torch_dtype(settings) -> torch.dtype:
    return resolve_dtype(settings.dtype, torch.device(settings.device))


def short_name(source: str) -> str:
    """A report name from a hub id or folder: its last part, lower case."""
    return Path(str(source).rstrip("/")).name.lower() or str(source)


def is_uae_checkpoint(source: str) -> bool:
    """A folder in UAE's official layout (llm/ and dit/ or SD3/ side by side)."""
    p = Path(source)
    return p.is_dir() and (p / "llm").is_dir() and ((p / "dit").is_dir() or (p / "SD3").is_dir())


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_config(source: str, setting: str, what: str):
    """transformers' AutoConfig of `source`, or a one-line error naming `setting`."""
    from transformers import AutoConfig

    if is_uae_checkpoint(source):
        raise UAEError(f"{setting} {source} is a UAE checkpoint (llm/, dit/, ...), not {what}: UAE is --model uae "
                       "(and --model uae --captioner ID pairs another captioner with UAE's own generation)")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as e:  # missing folder, no config.json, offline hub id, unknown model type
        raise UAEError(f"{setting} {source}: could not read a transformers config.json there, expected {what} "
                       f"({first_line(e)})") from None


def load_pretrained(model_class, source: str, setting: str, what: str, dtype: torch.dtype):
    """(processor, model) of `source` in `dtype`, or a one-line error naming `setting`."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source), model_class.from_pretrained(source, dtype=dtype)
    except Exception as e:
        raise UAEError(f"{setting} {source}: could not load {what} or its processor ({first_line(e)})") from None


def to_device(batch, device, dtype):
    """A processor's output on `device`, floating tensors (pixels) in `dtype`."""
    out = batch.to(device)
    for k, v in out.items():
        if torch.is_tensor(v) and v.is_floating_point():
            out[k] = v.to(dtype)
    return out
