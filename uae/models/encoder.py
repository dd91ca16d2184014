"""The understanding half: Qwen2.5-VL + LoRA (image -> long caption) and the projector that turns
its last hidden states into the DiT's `encoder_hidden_states` (caption -> conditioning)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from uae.errors import UAEError

logger = logging.getLogger(__name__)


@dataclass
class EncoderPrompts:
    """The fixed texts of the release (DESIGN.md). The order instruction-then-image is inferred."""

    caption_instruction: str = (
        "You are an expert vision-language model. Given an input image, generate a textual "
        "description of the image. If there is text in the image, transcribe it inside double quotes.")
    negative_prompt: str = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
    generate_role: str = "generate"


PROJECTOR_FILE = "projector.safetensors"


def save_projector(projector: nn.Module, llm_dir: Path) -> None:
    """A trained projector beside unchanged LLM weights (`llm/projector.safetensors`)."""
    from safetensors.torch import save

    from uae.io import atomic_write_bytes

    state = {f"projector.{k}": v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()}
    atomic_write_bytes(Path(llm_dir) / PROJECTOR_FILE, save(state, metadata={"format": "pt"}))


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> GELU -> Linear, token by token (keys projector.0 / projector.2 as in the release)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def llm_lora_config(llm, r: int, alpha: float, dropout: float = 0.0):
    """LoRA on every linear layer of the *language model* (the release wrapped 4.50's text model;
    a plain "all-linear" on today's model would also wrap the vision tower)."""
    from peft import LoraConfig

    leaf = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules()
                   if isinstance(m, nn.Linear) and ".language_model." in f".{n}"})
    if not leaf:
        raise UAEError("the LLM has no language_model linear layers: is it a Qwen2.5-VL model?")
    pattern = r".*language_model\..*\.(" + "|".join(map(re.escape, leaf)) + r")$"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=pattern)


class UAEEncoder(nn.Module):
    """Qwen2.5-VL (optionally LoRA-wrapped) + projector + processor.

    `llm` is the Qwen2.5-VL model, or the PEFT model around it after `add_lora`."""

    def __init__(self, llm, projector: nn.Module, processor, prompts: EncoderPrompts | None = None):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.processor = processor
        self.prompts = prompts or EncoderPrompts()

    # -------------------------------------------------------------- construction
    @property
    def qwen(self):
        """The bare Qwen2.5-VL model (inside the PEFT wrapper, if any)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def add_lora(self, config) -> None:
        from peft import get_peft_model

        self.llm = get_peft_model(self.llm, config)

    @classmethod
    def from_pretrained(cls, llm_path: str, processor_path: str, lora_path: str | None = None, *,
                        lora_alpha_ratio: float = 2.0, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                        prompts: EncoderPrompts | None = None) -> "UAEEncoder":
        """Load `llm/` (Qwen2.5-VL + projector, release or current key names), the processor, and
        the LoRA shards of `llm_lora/` (rank read from the shards, alpha = ratio * rank; the
        release used r=32, alpha=64)."""
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        from uae.checkpoints import load_official_llm_lora, lora_rank_in_shards

        try:
            processor = AutoProcessor.from_pretrained(processor_path)
        except Exception as e:
            raise UAEError(f"could not load the processor from {processor_path} ({type(e).__name__}: {e})") from None
        try:
            llm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                llm_path, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True)
        except Exception as e:  # size mismatches, corrupt files, bad config
            raise UAEError(f"could not load the LLM from {llm_path}: {type(e).__name__}: {e}") from None
        missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
        if missing or info.get("mismatched_keys"):
            raise UAEError(f"LLM weights in {llm_path} do not fit its config.json: missing "
                           f"{missing[:3]}, mismatched {list(info.get('mismatched_keys', []))[:3]}")
        projector = load_projector(llm_path, llm.config.text_config.hidden_size, dtype)
        encoder = cls(llm.eval(), projector.eval(), processor, prompts)
        if lora_path is not None:
            r = lora_rank_in_shards(Path(lora_path))
            encoder.add_lora(llm_lora_config(encoder.llm, r=r, alpha=lora_alpha_ratio * r))
            load_official_llm_lora(encoder, Path(lora_path))
        return encoder.to(device=device, dtype=dtype).eval()

    # -------------------------------------------------------------- captioning
    def caption_messages(self, image) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": self.prompts.caption_instruction},
                                             {"type": "image", "image": image}]}]

    @torch.no_grad()
    def caption(self, images: Sequence, *, max_new_tokens: int = 512, temperature: float = 0.7,
                do_sample: bool = True, seed: int | None = None, min_new_tokens: int | None = None) -> list[str]:
        """Batched captioning (left padding); sampling at `temperature` as in the release.
        `min_new_tokens` holds back the end of the caption (benchmarks fix the length with it)."""
        texts = [self.processor.apply_chat_template(self.caption_messages(im), tokenize=False,
                                                    add_generation_prompt=True) for im in images]
        batch = self.processor(text=texts, images=list(images), padding=True, padding_side="left",
                               return_tensors="pt").to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.projector[0].weight.dtype)
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if min_new_tokens:
            kwargs["min_new_tokens"] = min_new_tokens
        if do_sample:
            kwargs["temperature"] = temperature
        out = self.llm.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    # -------------------------------------------------------------- conditioning
    def generate_texts(self, prompts: Sequence[str]) -> list[str]:
        return [self.processor.apply_chat_template(
            [{"role": self.prompts.generate_role, "content": [{"type": "text", "text": p}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]

    def get_projected_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projector(last hidden state after the final norm) of each prompt in the "generate"
        template, right-padded together with the pad token. Returns (embeds (B, T, joint_dim),
        attention_mask (B, T)). Gradients flow when called outside no_grad."""
        tok = self.processor.tokenizer(self.generate_texts(prompts), padding=True, padding_side="right",
                                       return_tensors="pt").to(self.device)
        # The inner model gives the post-norm last hidden state without the LM head's vocab matmul.
        hidden = self.qwen.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return self.projector(hidden), tok["attention_mask"]

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) embeddings for classifier-free guidance, padded together."""
        embeds, _ = self.get_projected_embeddings(list(prompts) + [self.prompts.negative_prompt])
        n = len(prompts)
        return embeds[:n], embeds[n:].expand(n, -1, -1)


def load_projector(llm_path: str, in_dim: int, dtype: torch.dtype) -> nn.Sequential:
    """The projector's tensors (`projector.0.*`, `projector.2.*`) from the safetensors in llm/;
    widths are read from the stored shapes."""
    from safetensors import safe_open

    # Later files win: a trained `projector.safetensors` overrides the projector inside the shards
    # (sorted after them, as the official strict=False loader would also apply it last).
    state = {}
    for f in sorted(Path(llm_path).glob("*.safetensors"), key=lambda f: (f.name == PROJECTOR_FILE, f.name)):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if key.startswith("projector."):
                    state[key[len("projector."):]] = h.get_tensor(key)
    need = {"0.weight", "0.bias", "2.weight", "2.bias"}
    if set(state) != need:
        raise UAEError(f"llm folder {llm_path} has projector tensors {sorted(state)}, expected "
                       f"{sorted(need)} (Linear, GELU, Linear)")
    hidden, got_in = state["0.weight"].shape
    if got_in != in_dim:
        raise UAEError(f"projector in {llm_path} takes {got_in} features but the LLM's hidden size is {in_dim}")
    projector = build_projector(in_dim, hidden, state["2.weight"].shape[0])
    projector.load_state_dict(state)
    return projector.to(dtype)
