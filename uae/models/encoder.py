"""The understanding half: Qwen2.5-VL + LoRA (image -> long caption) and the projector that turns
its last hidden states into the DiT's `encoder_hidden_states` (caption -> conditioning)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from uae.errors import UAEError
from uae.files import atomic_write_bytes
from uae.models.layout import LORA_SHARDS, load_official_llm_lora, lora_layout_in_shards

logger = logging.getLogger(__name__)


# The release's captioning instruction, character for character (its demo.py `gen_prompt`): two
# spaces before each newline, the ** around "textual description", the empty quotes and the
# trailing space are all part of what the model was trained and evaluated with.
RELEASE_CAPTION_INSTRUCTION = (
    "You are an expert vision-language model.  \n"
    "Your task is: Given an input image, generate a **textual description** of the image. If there is text in "
    "the image, transcribe it inside double quotes \"\".  \n"
    "Now, carefully analyze the input image and output the full description. ")


@dataclass
class EncoderPrompts:
    """The fixed texts of the release (its demo.py): the captioning instruction (text first, then
    the image), the negative prompt of classifier-free guidance and the role of the generation
    template."""

    caption_instruction: str = RELEASE_CAPTION_INSTRUCTION
    negative_prompt: str = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
    generate_role: str = "generate"


class TokenBar:
    """A tqdm bar of the tokens one generate() call has made (transformers' streamer interface:
    `generate(..., streamer=TokenBar(max_new_tokens))`): a caption of 512 tokens takes tens of
    seconds at full size, and this is what shows it moving. generate() first puts the prompt, then
    each step's new token of every sequence (one tick), then calls end() (the bar goes away)."""

    def __init__(self, max_new_tokens: int, desc: str = "caption tokens"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", leave=False)
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def token_bar(max_new_tokens: int, show: bool, desc: str = "caption tokens") -> TokenBar | None:
    """generate()'s `streamer`: a TokenBar when `show`, else None (no bar)."""
    return TokenBar(max_new_tokens, desc) if show else None


PROJECTOR_FILE = "projector.safetensors"


def save_projector(projector: nn.Module, llm_dir: Path) -> None:
    """A trained projector beside unchanged LLM weights (`llm/projector.safetensors`)."""
    from safetensors.torch import save

    state = {f"projector.{k}": v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()}
    atomic_write_bytes(Path(llm_dir) / PROJECTOR_FILE, save(state, metadata={"format": "pt"}))


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> GELU -> Linear, token by token (keys projector.0 / projector.2 as in the release)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def llm_lora_config(llm, r: int, alpha: float, dropout: float = 0.0, *, target_modules: Sequence[str] | None = None,
                    include_vision: bool = False):
    """LoRA r/alpha with the release's "gaussian" init. By default it wraps every linear layer of
    the *language model*: the release wrapped transformers-4.50's text model, and a plain
    "all-linear" on today's model would also wrap the vision tower. `include_vision` wraps the
    vision tower's linear layers too (what "all-linear" on a >= 4.52 `model` does); an explicit
    list of module names (e.g. read from LoRA shards) overrides both."""
    from peft import LoraConfig

    if target_modules is None:
        scopes = (".language_model.", ".visual.") if include_vision else (".language_model.",)
        target_modules = [n for n, m in llm.named_modules()
                          if isinstance(m, nn.Linear) and any(s in f".{n}" for s in scopes)]
        if not target_modules:
            raise UAEError("the LLM has no language_model linear layers: is it a Qwen2.5-VL model?")
    # Full module names: PEFT matches each exactly (a leaf name such as "0" would also match blocks).
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


def release_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's text-only positions as transformers 4.x numbered them (the release's version):
    cumsum(mask) - 1, every pad at position 1, the same in the three M-RoPE rows: (3, B, T).
    Transformers 5 numbers right pads n, n+1, ...; the pad rows are part of the conditioning, so
    their positions change the image."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[None].expand(3, -1, -1)


@contextlib.contextmanager
def attention(model, implementation: str):
    """Run `model`'s text decoder with another attention implementation for the duration of the
    block (the release embedded prompts with sdpa; flash-attention-2 zeroes pad rows)."""
    lm = model.model.language_model
    before = lm.config._attn_implementation
    if before == implementation:
        yield
        return
    lm.set_attn_implementation(implementation)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


CAPTION_SAMPLING_KEYS = ("top_k", "top_p", "repetition_penalty")


class UAEEncoder(nn.Module):
    """Qwen2.5-VL (optionally LoRA-wrapped) + projector + processor.

    `llm` is the Qwen2.5-VL model, or the PEFT model around it after `add_lora`."""

    def __init__(self, llm, projector: nn.Module, processor, prompts: EncoderPrompts | None = None):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.processor = processor
        self.prompts = prompts or EncoderPrompts()
        self._logged_sampling: set = set()

    # -------------------------------------------------------------- construction
    @property
    def qwen(self):
        """The bare Qwen2.5-VL model (inside the PEFT wrapper, if any)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def add_lora(self, config) -> None:
        """Wrap the LLM with PEFT. On a bf16 / fp16 base the LoRA weights stay fp32, as the
        release's `get_peft_model` (autocast_adapter_dtype) keeps them."""
        from peft import get_peft_model

        self.llm = get_peft_model(self.llm, config, autocast_adapter_dtype=True)

    @classmethod
    def from_pretrained(cls, llm_path: str, processor_path: str, lora_path: str | None = None, *,
                        lora_alpha_ratio: float = 2.0, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                        prompts: EncoderPrompts | None = None, projector_dtype: torch.dtype | None = None) -> "UAEEncoder":
        """Load `llm/` (Qwen2.5-VL + projector, release or current key names), the processor, and
        the LoRA shards of `llm_lora/`. The LoRA's rank and the modules it wraps are read from
        the shards (alpha = ratio * rank; the release used r=32, alpha=64); a projector in the
        shards overrides the one in `llm/`, as the release's strict=False load applied them last."""
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

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
        lora_files = [] if lora_path is None else [Path(lora_path) / s for s in LORA_SHARDS]
        projector = load_projector(llm_path, llm.config.text_config.hidden_size, projector_dtype or dtype,
                                   later_files=lora_files)
        encoder = cls(llm.eval(), projector.eval(), processor, prompts)
        if lora_path is not None:
            layout = lora_layout_in_shards(Path(lora_path))
            encoder.add_lora(llm_lora_config(encoder.llm, r=layout.rank, alpha=lora_alpha_ratio * layout.rank,
                                             target_modules=layout.modules))
            load_official_llm_lora(encoder, Path(lora_path))
        # Device only: a dtype cast here would also cast the fp32 LoRA weights.
        return encoder.to(device=device).eval()

    # -------------------------------------------------------------- captioning
    def caption_messages(self, image) -> list[dict]:
        return [{"role": "user", "content": [{"type": "text", "text": self.prompts.caption_instruction},
                                             {"type": "image", "image": image}]}]

    def caption_inputs(self, images: Sequence, padding_side: str = "left", answers: Sequence[str] | None = None):
        """Processor inputs for captioning, built as the release builds them: chat template of
        [instruction, image], pixels through qwen_vl_utils' `process_vision_info` (its RGB
        conversion and bicubic resize), then the processor. `answers` are appended after the
        generation prompt (teacher forcing: a caption, or the negative prompt)."""
        from qwen_vl_utils import process_vision_info

        conversations = [self.caption_messages(im) for im in images]
        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in conversations]
        if answers is not None:
            texts = [t + a for t, a in zip(texts, answers)]
        patch = getattr(self.processor.image_processor, "patch_size", 14)
        image_inputs, video_inputs = process_vision_info(conversations, image_patch_size=patch)
        batch = self.processor(text=texts, images=image_inputs, videos=video_inputs, padding=True,
                               padding_side=padding_side, return_tensors="pt").to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.projector[0].weight.dtype)
        return batch

    def caption_sampling(self, temperature: float, do_sample: bool = True, **overrides) -> dict:
        """The sampling settings of a caption: temperature from the caller (the release's 0.7),
        top_k / top_p / repetition_penalty from `llm/generation_config.json` unless overridden
        (None = the file's). `do_sample` False: greedy decoding (the most likely token at each
        step, ties to the lowest id, as no top_k=1 in bf16 guarantees): no temperature / top_k /
        top_p, which generate() would not apply anyway; repetition_penalty as above. Logged once
        per distinct setting."""
        gen = self.qwen.generation_config
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - set(CAPTION_SAMPLING_KEYS)
        if unknown:
            raise UAEError(f"unknown caption sampling setting(s) {sorted(unknown)}; known: {list(CAPTION_SAMPLING_KEYS)}")
        keys = CAPTION_SAMPLING_KEYS if do_sample else ("repetition_penalty",)
        unused = sorted(set(given) - set(keys))
        if unused:
            raise UAEError(f"caption setting(s) {unused} apply to sampling, and do_sample=False decodes greedily: "
                           "leave them unset")
        out = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        out.update(given)
        key = tuple(sorted(out.items()))
        if key not in self._logged_sampling:
            self._logged_sampling.add(key)
            effective = {**{k: getattr(gen, k, None) for k in keys}, **out}
            logger.info("caption %s: %s (%s from llm/generation_config.json)",
                        "sampling" if do_sample else "greedy decoding",
                        ", ".join(f"{k}={v}" for k, v in effective.items()),
                        ", ".join(k for k in keys if k not in given) or "nothing")
        return out

    @torch.no_grad()
    def caption(self, images: Sequence, *, max_new_tokens: int = 512, temperature: float = 0.7,
                seed: int | Sequence[int] | None = None, batch: bool = False, min_new_tokens: int | None = None,
                top_k: int | None = None, top_p: float | None = None,
                repetition_penalty: float | None = None, do_sample: bool = True,
                progress: bool = False) -> list[str]:
        """Captions, sampled as the release samples them (temperature 0.7, 512 new tokens, the rest
        from `llm/generation_config.json`) and returned unstripped; `do_sample=False`: decoded
        greedily instead (`caption_sampling`), the same caption for any seed.

        By default each image is captioned alone, seeded with its seed (`seed`: one for all, or one
        per image): a caption does not depend on the other images. `batch=True` samples all images
        in one left-padded generate() call seeded once with the first seed: faster on a GPU, but
        a sampled caption then depends on its batch-mates. `min_new_tokens` holds back the end of
        the caption (benchmarks fix the length with it). `progress`: a bar of each generate() call's
        tokens (TokenBar)."""
        images = list(images)
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(images)
        if len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        kwargs = dict(max_new_tokens=max_new_tokens, **self.caption_sampling(
            temperature, do_sample, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty))
        if min_new_tokens:
            kwargs["min_new_tokens"] = min_new_tokens
        groups = [(images, seeds[0])] if batch else [([im], s) for im, s in zip(images, seeds)]
        out = []
        for group, s in groups:
            inputs = self.caption_inputs(group)
            if s is not None:
                torch.manual_seed(s)
            ids = self.llm.generate(**inputs, **kwargs, streamer=token_bar(max_new_tokens, progress))
            out += self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    # -------------------------------------------------------------- conditioning
    def generate_texts(self, prompts: Sequence[str]) -> list[str]:
        return [self.processor.apply_chat_template(
            [{"role": self.prompts.generate_role, "content": [{"type": "text", "text": p}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]

    def generate_ids(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids of each prompt in the "generate" template (the release's tokenizer.encode)."""
        tok = self.processor.tokenizer
        return [torch.tensor(tok.encode(t), dtype=torch.long) for t in self.generate_texts(prompts)]

    def pad_right(self, ids: Sequence[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad with the pad token (to the longest, or to `length`); mask = ids != pad, as
        the release computes it."""
        pad = self.processor.tokenizer.pad_token_id
        if length is not None:
            ids = [torch.cat([i, i.new_full((length - len(i),), pad)]) for i in ids]
        batch = torch.nn.utils.rnn.pad_sequence(list(ids), batch_first=True, padding_value=pad).to(self.device)
        return batch, batch.ne(pad).long()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state (after the final norm) of text-only input, computed as the release
        computed it: transformers-4.x position ids (pads at position 1) and sdpa attention, pad rows
        kept. Gradients flow when called outside no_grad."""
        with attention(self.qwen, "sdpa"):
            return self.qwen.model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=release_position_ids(attention_mask)).last_hidden_state

    def get_projected_embeddings(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projector(last hidden state) of the prompts in the "generate" template, right-padded
        together. Returns (embeds (B, T, joint_dim), attention_mask (B, T))."""
        ids, mask = self.pad_right(self.generate_ids(prompts))
        return self.projector(self.hidden_states(ids, mask)), mask

    def embed_pair(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) conditioning of one prompt exactly as the release computes it:
        [negative, positive] right-padded together into one forward, every row projected, pad rows
        included (the DiT gets no mask). Each is (1, T, joint_dim), T = the longer of the two."""
        ids, mask = self.pad_right(self.generate_ids([self.prompts.negative_prompt, prompt]))
        neg, pos = self.projector(self.hidden_states(ids, mask)).chunk(2)
        return pos, neg

    def encode_prompts(self, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`embed_pair` of every prompt: a list of (positive, negative), each (1, T_i, joint_dim).
        Lengths differ between prompts; `group_by_length` batches the equal ones."""
        return [self.embed_pair(p) for p in prompts]


def group_by_length(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Batches of (indices, positive, negative) whose conditioning has one length, in order of first
    appearance: batching them changes no prompt's conditioning (a longer batch-mate would pad it
    further, and the pad rows reach the DiT)."""
    groups: dict[int, list[int]] = {}
    for i, (pos, _) in enumerate(pairs):
        groups.setdefault(pos.shape[1], []).append(i)
    return [(idx, torch.cat([pairs[i][0] for i in idx]), torch.cat([pairs[i][1] for i in idx]))
            for idx in groups.values()]


def load_projector(llm_path: str, in_dim: int, dtype: torch.dtype, later_files: Sequence[Path] = ()) -> nn.Sequential:
    """The projector's tensors (`projector.0.*`, `projector.2.*`), widths read from the stored shapes.

    Sources, later ones winning, as the release applied them: the safetensors in llm/ (a trained
    `projector.safetensors` after the shards), then `later_files` (the llm_lora shards, which the
    release loaded last with strict=False). The projector may live in either place."""
    from safetensors import safe_open

    files = sorted(Path(llm_path).glob("*.safetensors"), key=lambda f: (f.name == PROJECTOR_FILE, f.name))
    state, found_in = {}, []
    for f in files + [Path(f) for f in later_files if Path(f).exists()]:
        with safe_open(str(f), framework="pt") as h:
            keys = [k for k in h.keys() if k.startswith("projector.")]
            for key in keys:
                state[key[len("projector."):]] = h.get_tensor(key)
        if keys:
            found_in.append(f.name)
    need = {"0.weight", "0.bias", "2.weight", "2.bias"}
    if set(state) != need:
        where = f"llm folder {llm_path}" + (" and the llm_lora shards" if later_files else "")
        raise UAEError(f"{where} hold projector tensors {sorted(state)}, expected {sorted(need)} (Linear, GELU, "
                       "Linear). The release's projector is in llm/ or in the llm_lora shards: do not switch "
                       "llm_lora off if llm/ has none.")
    hidden, got_in = state["0.weight"].shape
    if got_in != in_dim:
        raise UAEError(f"projector in {llm_path} takes {got_in} features but the LLM's hidden size is {in_dim}")
    projector = build_projector(in_dim, hidden, state["2.weight"].shape[0])
    projector.load_state_dict(state)
    logger.debug("projector from %s", ", ".join(found_in))
    return projector.to(dtype)
