"""The understanding side that stage 2 (g4u) trains, whatever the model: a vision-language model
with a LoRA on its language model, prompted with the caption instruction and an image.

`CaptionPolicy` holds what the GRPO loop needs of it: the prompt inputs of a batch of images, on-
policy sampling (an explicit generation config whose only processors are the temperature and the
suppressed vision tokens, exactly what the log-probabilities are recomputed with: a checkpoint's
generation_config.json may set repetition_penalty, top_k or top_p, which would make the rollouts
come from another distribution than the one the ratio assumes), per-token log-probabilities under
any weights of the model, the end-of-sequence and pad ids, and decoding. UAE's encoder builds its
prompts as the release does (`UAEEncoder.caption_inputs`); Janus and any transformers
image-text-to-text model through their adapters' chat templates (uae.unified), with a new LoRA on
the language model (`add_captioner_lora`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from uae.errors import UAEError

# Config attributes naming the vision placeholder tokens of the models we know (Qwen2.5-VL: image,
# video, vision start/end; Janus: image). A caption holding one would not re-encode with its image.
VISION_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                           "vision_end_token_id")


@contextlib.contextmanager
def only_this_generation_config(model, config):
    """generate() fills what a given config leaves unset from the model's own generation_config
    (transformers 5): for the duration of the block the model's is `config` itself, so nothing of
    the checkpoint's file (repetition_penalty, top_k, top_p, ...) leaks into the sampling."""
    before = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = before


class RowSampler:
    """A logits processor that draws each row's next token from softmax(scores / temperature) with
    the row's own torch.Generator, and leaves that token alone possible (every other score -inf):
    under greedy decoding generate() then takes it. So a caption's tokens depend on its own seed
    and logits, not on the global RNG nor on which batch or process it is sampled in (transformers'
    sampling draws one multinomial over the whole batch from the global generator). It runs after
    generate()'s own processors (the suppressed tokens), as a temperature warper would."""

    def __init__(self, generators: Sequence[torch.Generator], temperature: float):
        self.generators, self.temperature = list(generators), temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSampler: {scores.shape[0]} rows, {len(self.generators)} generators")
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picks[:, None], 0.0)


def _pixel_rows(batch, rows: slice) -> torch.Tensor:
    """Qwen2-VL-style processors flatten every image's patches into one pixel_values tensor: the
    rows of images `rows` are the patches counted by their image_grid_thw."""
    counts = batch["image_grid_thw"].prod(-1).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return batch["pixel_values"][starts[rows.start]:starts[rows.stop]]


class CaptionPolicy:
    def __init__(self, lm, base_model, processor, prompt_inputs: Callable[[Sequence], dict], temperature: float,
                 max_new_tokens: int, sample_kwargs: dict | None = None):
        """`lm`: the model whose LoRA trains (PEFT-wrapped); `base_model`: the transformers model
        inside (its config and generation_config); `prompt_inputs(images)`: the processor outputs
        of [caption instruction, image] for each image, left-padded, on the model's device;
        `sample_kwargs`: what the model's generate() needs besides (Janus: generation_mode)."""
        self.lm, self.base, self.processor = lm, base_model, processor
        self.prompt_inputs, self.temperature, self.max_new_tokens = prompt_inputs, temperature, max_new_tokens
        self.sample_kwargs = sample_kwargs or {}
        config = base_model.config
        ids = [getattr(config, a, None) for a in VISION_TOKEN_ATTRIBUTES]
        self.suppressed = sorted({i for i in ids if isinstance(i, int)})
        own = base_model.generation_config
        eos = own.eos_token_id if own.eos_token_id is not None else processor.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pad = own.pad_token_id if own.pad_token_id is not None else processor.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.bos_id = own.bos_token_id

    def generation_config(self):
        """Sampling with the temperature and the suppressed tokens only: every other processor off."""
        from transformers import GenerationConfig

        return GenerationConfig(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0, min_p=None,
                                typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                max_new_tokens=self.max_new_tokens, suppress_tokens=self.suppressed,
                                bos_token_id=self.bos_id, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)

    def sample(self, batch, seeds: Sequence[int] | None = None, **kwargs):
        """Sampled completions (B, T) of the prompts in `batch`, on-policy. With `seeds` (one per
        row), row i's tokens are drawn from a generator of its own seeded with seeds[i]
        (`RowSampler`): the same caption whatever its batch-mates and the number of processes (up
        to the rounding of batched logits); without, from the global RNG."""
        if seeds is None:
            config = self.generation_config()
        else:
            from transformers import GenerationConfig, LogitsProcessorList  # lazy: as generation_config()

            config = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens,
                                      suppress_tokens=self.suppressed, bos_token_id=self.bos_id,
                                      eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)
            device = batch["input_ids"].device
            gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
            kwargs["logits_processor"] = LogitsProcessorList([RowSampler(gens, self.temperature)])
            if self.sample_kwargs.get("generation_mode") == "text":
                # Janus's generate() (transformers 5.24) drops logits_processor in its text mode, which
                # is GenerationMixin.generate with guidance_scale=None: call that with it. A LoRA is
                # injected into the model's own modules, so the base model generates with it.
                from transformers import GenerationMixin  # lazy: as generation_config()

                rest = {k: v for k, v in self.sample_kwargs.items() if k != "generation_mode"}
                with torch.no_grad(), only_this_generation_config(self.base, config):
                    return GenerationMixin.generate(self.base, **batch, generation_config=config, guidance_scale=None,
                                                    **rest, **kwargs)
        with torch.no_grad(), only_this_generation_config(self.base, config):
            return self.lm.generate(**batch, generation_config=config, **self.sample_kwargs, **kwargs)

    def token_logprobs(self, model, batch, completion, rows: slice | None = None) -> torch.Tensor:
        """log p(completion token | prefix) under `model` with the sampling processors (temperature,
        suppressed tokens), (B, T); `rows`: only these samples of the batch. The LM head runs on
        the completion's positions only (`logits_to_keep`): the logits are samples x tokens x the
        vocabulary, the largest activation of this stage. Inputs aligned with the tokens (e.g.
        Qwen2.5-VL's mm_token_type_ids, which place its M-RoPE positions) are extended over the
        completion with zeros (text); the others (pixels, grids) are passed as they are."""
        n = batch["input_ids"].shape[0]
        if rows is not None:
            batch = {k: (_pixel_rows(batch, rows) if k == "pixel_values" and "image_grid_thw" in batch else
                         v[rows] if torch.is_tensor(v) and v.shape[:1] == (n,) else v) for k, v in batch.items()}
            completion = completion[rows]
        ids = torch.cat([batch["input_ids"], completion], dim=1)
        extra = {}
        for k, v in batch.items():
            if k == "input_ids":
                continue
            aligned = torch.is_tensor(v) and v.shape[:2] == batch["input_ids"].shape
            fill = torch.ones_like(completion) if k == "attention_mask" else torch.zeros_like(completion)
            extra[k] = torch.cat([v, fill.to(v.dtype)], dim=1) if aligned else v
        t = completion.shape[1]
        out = model(input_ids=ids, logits_to_keep=t + 1, **extra)
        logits = out.logits[:, :-1].float() / self.temperature
        logits[..., self.suppressed] = float("-inf")
        return torch.log_softmax(logits, dim=-1).gather(-1, completion[..., None])[..., 0]

    def decode(self, completion: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """The captions, unstripped (the release turns a caption into a prompt as it is). `mask`
        (B, T): each row's tokens where it is true, the completion's own (up to its end of
        sequence): the pad that fills a row after it is then never decoded, even where the pad id is
        a token that skip_special_tokens keeps. None: every token (special ones skipped)."""
        if mask is None:
            return self.processor.batch_decode(completion, skip_special_tokens=True)
        if mask.shape != completion.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the completion {tuple(completion.shape)}")
        rows = [row[keep].tolist() for row, keep in zip(completion, mask.bool())]
        return self.processor.batch_decode(rows, skip_special_tokens=True)

    def without_lora(self):
        """The model without its LoRA (the KL reference `base`)."""
        if not hasattr(self.lm, "disable_adapter"):
            raise UAEError("the captioner trains without a LoRA (--captioner_finetune full): there is no LoRA to "
                           "switch off; its KL reference is a frozen copy of the language model "
                           "(uae.rl.kl.FrozenLanguageModel)")
        return self.lm.disable_adapter()


def uae_policy(encoder, temperature: float, max_new_tokens: int) -> CaptionPolicy:
    """UAE's encoder: the release's prompt (instruction, then the image through qwen_vl_utils)."""
    return CaptionPolicy(encoder.llm, encoder.qwen, encoder.processor, encoder.caption_inputs, temperature,
                         max_new_tokens)


def add_captioner_lora(model, cfg):
    """A new LoRA (PEFT) on the language model of a transformers vision-language model: rank,
    alpha and target modules from the config (a regex on module names: the language model's
    attention and MLP by default, so the vision tower stays frozen); B starts at zero, so the model starts
    as it was. Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.captioner_lora_rank, lora_alpha=cfg.captioner_lora_alpha,
                        target_modules=cfg.captioner_lora_targets, lora_dropout=0.0)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UAEError(f"--captioner_lora_targets {cfg.captioner_lora_targets}: {e}") from None


def language_model(model):
    """The language model of a transformers vision-language model, `model.model.language_model`
    (Janus's Llama, Qwen2.5-VL's and Gemma 3's text model in transformers 5's layout)."""
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if not isinstance(lm, torch.nn.Module):
        raise UAEError(f"--captioner_finetune full: {type(model).__name__} has no model.language_model to fine-tune "
                       "(transformers' vision-language layout); use --captioner_finetune lora with "
                       "--captioner_lora_targets")
    return lm


def train_language_model(model) -> list[torch.nn.Parameter]:
    """Full fine-tuning of the language model (the paper: "only the LLM is updated"): every weight
    of `model.model.language_model` trains (its embeddings, layers and final norm), the rest of the
    model is frozen (the vision tower and its aligner; Janus's VQ model, image embeddings, image
    aligner and image head; lm_head, unless the checkpoint ties it to the input embeddings, as
    Qwen2.5-VL-3B does: then it is the same weight and trains with them). Returns what trains."""
    model.requires_grad_(False)
    language_model(model).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def save_full_captioner(model, processor, folder, dtype: torch.dtype) -> None:
    """A fully fine-tuned captioner as a plain transformers folder (weights and processor), every
    floating weight in `dtype` (the frozen parts' dtype: the one it was loaded in), so that
    `from_pretrained` and the runner's --checkpoint / --captioner load it as any checkpoint. A
    weight shared by two names (tied embeddings) stays one tensor."""
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if id(t) not in cast:
            cast[id(t)] = t.detach().to(dtype) if t.is_floating_point() else t
        state[name] = cast[id(t)]
    model.save_pretrained(str(folder), state_dict=state)
    processor.save_pretrained(str(folder))
