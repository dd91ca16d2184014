"""Janus' image-token sampling with the per-token log-probabilities an RL update needs, and their
teacher-forced recomputation with gradient.

Janus (and Janus-Pro) generate an image as `num_image_tokens` codes of its VQ tokenizer, one at a
time, with classifier-free guidance: each prompt runs beside an unconditional copy (every token but
BOS and <begin_of_image> replaced by padding), and the next token is drawn from

    softmax((u + w (c - u)) / T)

with c and u the generation head's logits of the conditional and unconditional rows, w the guidance
scale and T the temperature (DeepSeek's Janus repository, generation_inference.py; transformers'
JanusForConditionalGeneration.generate with its ClassifierFreeGuidanceLogitsProcessor). Here:

    sample_image_tokens     that loop, with one torch.Generator per row (a row's tokens do not depend
                            on its batch-mates' draws), any w (w = 1: the conditional rows alone), and
                            each token's log-probability under the guided distribution it was drawn
                            from and under the conditional branch alone (log_softmax(c / T))
    image_token_logprobs    the same log-probabilities recomputed in one teacher-forced pass with
                            gradient, the language model called through the module the trainer
                            prepared (so a DDP all-reduce sees the forward)

Positions follow the attention mask (cumsum - 1), so a left-padded row computes what it computes
alone; logits are taken in float32 before guidance in both functions, so the two agree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from uae.errors import UAEError

MODES = ("guided", "conditional")


def unconditional_ids(input_ids: torch.Tensor, bos_id: int | None, boi_id: int, pad_id: int) -> torch.Tensor:
    """The classifier-free-guidance prompt: every token other than BOS and <begin_of_image> turned
    into padding (DeepSeek's generation_inference.py; transformers' Janus generate). `bos_id` None (a
    tokenizer without a BOS): only <begin_of_image> is kept."""
    keep = input_ids == boi_id
    if bos_id is not None:
        keep |= input_ids == bos_id
    return torch.where(keep, input_ids, torch.full_like(input_ids, pad_id))


@dataclass
class ImageSample:
    """Sampled image tokens and their log-probabilities (float32), each (B, N).

    tokens        the image tokens
    guided        log p(token) under the distribution it was drawn from: log_softmax((u + w (c - u)) / T)
    conditional   log p(token) under the conditional branch alone: log_softmax(c / T)
    """

    tokens: torch.Tensor
    guided: torch.Tensor
    conditional: torch.Tensor


def _janus(model, what: str):
    """The JanusForConditionalGeneration inside DDP / accelerate and PEFT wrappers (PEFT injects its
    LoRA layers in place, so the unwrapped model still runs them)."""
    inner = model
    for _ in range(8):
        if hasattr(inner, "get_base_model"):  # PEFT
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP, DataParallel
            inner = inner.module
        else:
            break
    if getattr(getattr(inner, "config", None), "model_type", None) != "janus":
        raise UAEError(f"{what}: {type(model).__name__} is not a JanusForConditionalGeneration (nor a PEFT / DDP "
                       "wrapper of one)")
    return inner


def _check(input_ids, attention_mask, boi_id: int, temperature: float) -> None:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise UAEError(f"input_ids {tuple(input_ids.shape)} / attention_mask {tuple(attention_mask.shape)}: expected "
                       "two (batch, length) tensors of one shape")
    if not (bool((input_ids[:, -1] == boi_id).all()) and bool(attention_mask[:, -1].bool().all())):
        raise UAEError("input_ids: every prompt must end in <begin_of_image>, left-padded (JanusProcessor(..., "
                       "generation_mode='image', padding_side='left'); JanusAdapter.image_inputs gives them)")
    if not temperature > 0:
        raise UAEError(f"temperature {temperature}: must be > 0")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts its own tokens from 0 (pads get 1, as
    transformers' generate gives them; they are masked out)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _guide(cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """u + w (c - u) on raw logits; the conditional logits themselves when there is no unconditional
    branch (w = 1)."""
    return cond if uncond is None else uncond + guidance_scale * (cond - uncond)


def _logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_image_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                        generators: Sequence[torch.Generator], guidance_scale: float, temperature: float = 1.0,
                        bos_id: int | None, boi_id: int, pad_id: int, progress: bool = False) -> ImageSample:
    """Image tokens of left-padded prompts ending in <begin_of_image> (B, L), row i drawn with
    torch.multinomial from generators[i] only; the conditional and unconditional rows run as one
    batch of 2B through a KV cache (B rows when guidance_scale is 1: the guided distribution is then
    the conditional one, and the unconditional rows are skipped). `model`: a Janus model, possibly
    PEFT-wrapped (its LoRA applies unless disabled by the caller). `progress`: a bar over the tokens."""
    base = _janus(model, "sample_image_tokens: model")
    _check(input_ids, attention_mask, boi_id, temperature)
    batch = input_ids.shape[0]
    if len(generators) != batch:
        raise UAEError(f"generators: {len(generators)} for {batch} prompts (one torch.Generator per row)")
    n = base.config.vision_config.num_image_tokens
    guided = guidance_scale != 1
    ids = torch.cat([input_ids, unconditional_ids(input_ids, bos_id, boi_id, pad_id)]) if guided else input_ids
    mask = attention_mask.repeat(2, 1) if guided else attention_mask
    lm, head = base.model.language_model, base.model.generation_head
    embeds = base.get_input_embeddings()(ids)
    positions = _positions(mask)
    cache = None
    tokens = torch.empty(batch, n, dtype=torch.long, device=input_ids.device)
    lp_guided = torch.empty(batch, n, dtype=torch.float32, device=input_ids.device)
    lp_cond = torch.empty_like(lp_guided)
    for k in tqdm(range(n), desc="image tokens", disable=not progress, leave=False):
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache = out.cache
        logits = head(out.last_hidden_state[:, -1]).float()
        cond, uncond = (logits[:batch], logits[batch:]) if guided else (logits, None)
        logp = torch.log_softmax(_guide(cond, uncond, guidance_scale) / temperature, dim=-1)
        probs = logp.exp()
        nxt = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
        tokens[:, k] = nxt
        lp_guided[:, k] = logp.gather(-1, nxt[:, None]).squeeze(-1)
        lp_cond[:, k] = _logprob(cond, nxt, temperature) if guided else lp_guided[:, k]
        step = nxt.repeat(2) if guided else nxt
        embeds = base.prepare_embeddings_for_image_generation(step[:, None])
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return ImageSample(tokens, lp_guided, lp_cond)


def image_token_logprobs(model, base, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: torch.Tensor, *,
                         guidance_scale: float, temperature: float = 1.0, mode: str = "guided",
                         detach_uncond: bool = False, bos_id: int | None, boi_id: int, pad_id: int) -> torch.Tensor:
    """(B, N) float32 log-probabilities of image `tokens` after their prompts, teacher-forced with
    gradient: under the guided distribution they were sampled from (`mode` "guided": the conditional
    and unconditional rows in one pass of 2B), or under the conditional branch alone ("conditional",
    or guidance_scale 1: one pass of B rows).

    The language model runs through `model(...)` (the prepared module: DDP / accelerate wrapper of
    the PEFT model, so its forward hooks and all-reduce see the pass); `base`, the unwrapped
    JanusForConditionalGeneration, gives only the frozen parts around it: the prompt's text
    embeddings, the image tokens' generation embeddings and the generation head. `detach_uncond`:
    the unconditional branch runs without gradient (a separate, cheaper pass), so the update moves
    the guided distribution through the conditional logits only."""
    if mode not in MODES:
        raise UAEError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    base = _janus(base, "image_token_logprobs: base")
    _check(input_ids, attention_mask, boi_id, temperature)
    n = base.config.vision_config.num_image_tokens
    if tokens.shape != (input_ids.shape[0], n):
        raise UAEError(f"tokens {tuple(tokens.shape)}: expected ({input_ids.shape[0]}, {n}), one row of "
                       "num_image_tokens per prompt")
    length = input_ids.shape[1]
    # Logits of token k come from the position before it: the prompt's <begin_of_image> for the first,
    # image token k - 1 after that, so the last token is never an input.
    image = base.prepare_embeddings_for_image_generation(tokens[:, :-1])
    embed = base.get_input_embeddings()

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = ids.shape[0] // input_ids.shape[0]
        full = torch.cat([mask, mask.new_ones(mask.shape[0], n - 1)], dim=1)
        embeds = torch.cat([embed(ids), image.repeat(rows, 1, 1).to(embed.weight.dtype)], dim=1)
        # The image logits come from the generation head on the language model's final-normed hidden
        # states, taken from its final norm as it runs (output_hidden_states would also keep every
        # layer's states, gigabytes at Janus-Pro's size in a no-grad pass); logits_to_keep=1: the text
        # head (lm_head) on one position only.
        final = []
        hook = base.model.language_model.norm.register_forward_hook(lambda module, args, out: final.append(out))
        try:
            model(inputs_embeds=embeds, attention_mask=full, position_ids=_positions(full), logits_to_keep=1,
                  use_cache=False)
        finally:
            hook.remove()
        if len(final) != 1:
            raise UAEError(f"image_token_logprobs: the language model's final norm ran {len(final)} times in one "
                           "forward, expected once")
        return base.model.generation_head(final[0][:, length - 1:]).float()

    if mode == "conditional" or guidance_scale == 1:
        return _logprob(logits(input_ids, attention_mask), tokens, temperature)
    uncond_ids = unconditional_ids(input_ids, bos_id, boi_id, pad_id)
    if detach_uncond:
        cond = logits(input_ids, attention_mask)
        with torch.no_grad():
            uncond = logits(uncond_ids, attention_mask)
    else:
        cond, uncond = logits(torch.cat([input_ids, uncond_ids]), attention_mask.repeat(2, 1)).chunk(2)
    return _logprob(_guide(cond, uncond, guidance_scale), tokens, temperature)
