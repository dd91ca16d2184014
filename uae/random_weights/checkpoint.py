"""Random-weight UAE checkpoints in the official release layout, and UAE models built from a preset
without files.

`build_checkpoint(out_dir, preset="tiny")` writes, in seconds and without any network access:

    SD3/            diffusers StableDiffusion3Pipeline folder (VAE, FlowMatch scheduler, CLIP-L and
                    CLIP-G text encoders + tokenizers; no transformer, no T5: UAE never uses them)
    dit/            SD3Transformer2DModel
    dit_lora/       PEFT adapter for the DiT
    llm/            Qwen2.5-VL weights + projector, with the transformers-4.50 key names of the release
    llm_lora/       the LLM LoRA as the release stores it: a full state dict in three shards
    llm_processor/  Qwen2.5-VL processor (offline-trained BPE tokenizer with Qwen's special tokens and
                    chat template, image processor, video processor)

The presets (configs/models/: tiny, mid, full) set the sizes: the same code builds full-size random
models (speed and memory measurements on a GPU without downloads) and, with `build_uae`, full-size
models on the meta device (the memory plan). Two builds from the same seed are identical.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from uae.files import atomic_folder
from uae.hashing import content_key
from uae.models.decoder import UAEDecoder, add_dit_lora, save_dit_lora
from uae.models.encoder import UAEEncoder, build_projector, llm_lora_config
from uae.models.layout import current_to_official, save_official_llm_lora, save_sharded
from uae.models.uae import UAE
from uae.paths import preset_path

logger = logging.getLogger(__name__)

# Qwen2.5's special tokens, in the release's order (so ids keep their relative layout).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# A chat template equivalent to Qwen2.5-VL's: default system turn, any role name (UAE uses
# "generate"), image / video placeholders, generation prompt. Real checkpoints ship their own.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Built-in corpus for the offline BPE: caption-like English, so merges look like a real tokenizer's.
_CORPUS = """
a photo of a red cube on a wooden table in a bright room with white walls
a serene mountain landscape with snow-capped peaks reflecting in a crystal clear lake
a cat sitting on a window sill looking outside at the rain, soft natural light
an astronaut in a white space suit standing in front of an american flag
a cup of coffee with latte art on a saucer, top view, dark background
the image shows a rocket on a launch pad under a blue sky with some clouds
a close-up portrait of a person smiling, shallow depth of field, warm colors
text on the sign reads "open" in bold black letters on a yellow background
a city street at night with neon lights, cars, and people walking on the sidewalk
generate a random, low quality, ugly, blur, bad and anime, cartoon image
you are an expert vision-language model. given an input image, generate a textual description
of the image. if there is text in the image, transcribe it inside double quotes.
in the foreground there is a green field; in the background, tall trees and a small house
""".strip().splitlines()


def load_preset(preset: str | os.PathLike) -> dict[str, Any]:
    with open(preset_path(str(preset))) as f:
        return yaml.safe_load(f)


def preset_key(preset: str | os.PathLike) -> str:
    """Short content hash of a preset file: cached builds are rebuilt when the preset changes."""
    return content_key(Path(preset_path(str(preset))).read_bytes())[:10]


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- processor

def build_processor(cfg: dict[str, Any]):
    """Qwen2.5-VL processor with an offline-trained byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=int(cfg["tokenizer"]["vocab_size"]), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2TokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                                   unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    vis = cfg["llm"]["vision_config"]
    proc_cfg = cfg["processor"]
    image_processor = Qwen2VLImageProcessor(
        min_pixels=proc_cfg["min_pixels"], max_pixels=proc_cfg["max_pixels"],
        size={"shortest_edge": proc_cfg["min_pixels"], "longest_edge": proc_cfg["max_pixels"]},
        patch_size=vis["patch_size"], merge_size=vis["spatial_merge_size"],
        temporal_patch_size=vis["temporal_patch_size"])
    video_processor = Qwen2VLVideoProcessor(patch_size=vis["patch_size"], merge_size=vis["spatial_merge_size"],
                                            temporal_patch_size=vis["temporal_patch_size"])
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------- encoder

def llm_config(cfg: dict[str, Any], tokenizer):
    """Qwen2.5-VL config from the preset, with the special-token ids of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(cfg["llm"]["text_config"])
    text.setdefault("vocab_size", len(tokenizer))
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(f"text_config.vocab_size {text['vocab_size']} < tokenizer size {len(tokenizer)}")
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(cfg["llm"]["vision_config"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=cfg["llm"].get("tie_word_embeddings", True))
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_llm(cfg: dict[str, Any], tokenizer, seed: int, dtype=None):
    """Random Qwen2.5-VL + projector (widths from the preset and the DiT's joint_attention_dim)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = llm_config(cfg, tokenizer)
    _seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    std = cfg["llm"].get("output_embedding_std")
    if std:  # see configs/models/tiny.yaml
        if config.text_config.tie_word_embeddings:
            raise ValueError("output_embedding_std needs tie_word_embeddings: false in the preset")
        out = model.get_output_embeddings().weight
        with torch.no_grad():
            out.copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 11), device="cpu") * float(std))
    # Sampling processors in generation_config.json, as Qwen2.5-VL's own file has (the preset's
    # `generation`): captioning inherits whatever the checkpoint's file holds.
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id, do_sample=True, temperature=0.7,
        **cfg["llm"].get("generation", {}))
    _seed(seed + 1)
    projector = build_projector(config.text_config.hidden_size, cfg["projector"]["hidden_dim"],
                                cfg["dit"]["joint_attention_dim"])
    if dtype is not None:
        model.to(dtype)
        projector.to(dtype)
    return model.eval(), projector.eval()


def save_llm_release_format(model, projector, out: Path, n_shards: int = 2, with_projector: bool = True) -> None:
    """Write `llm/` as the release does: Qwen2.5-VL weights with transformers-4.50 key names
    (`model.*` = text model, `visual.*` = vision tower) and the projector in the same shards."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {current_to_official(k, peft=False): v for k, v in model.state_dict().items()}
    if with_projector:
        state.update({f"projector.{k}": v for k, v in projector.state_dict().items()})
    save_sharded(state, out, n_shards, index_name="model.safetensors.index.json")


def _randomise_lora_b(module, seed: int, std: float = 0.02) -> None:
    """PEFT initialises LoRA B to zero, which would make a LoRA that changes nothing and a
    round-trip test that cannot fail. Give B small random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * std)


# ---------------------------------------------------------------------------- decoder

def build_dit(cfg: dict[str, Any], seed: int, dtype=None):
    from diffusers import SD3Transformer2DModel

    _seed(seed)
    dit = SD3Transformer2DModel(**cfg["dit"])
    return dit.to(dtype) if dtype is not None else dit


def dit_lora_config(cfg: dict[str, Any]):
    from peft import LoraConfig

    lcfg = cfg["dit_lora"]
    return LoraConfig(r=lcfg["r"], lora_alpha=lcfg["alpha"], init_lora_weights="gaussian",
                      target_modules=list(lcfg["target_modules"]))


def build_clip_tokenizer(max_length: int):
    """Byte-level CLIP tokenizer without merges (ids 0/1 = start/end of text): every string
    encodes, offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in sorted(ByteLevel.alphabet()):
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_sd3_parts(cfg: dict[str, Any], seed: int, dtype=None) -> dict[str, Any]:
    """VAE, scheduler, CLIP-L / CLIP-G text encoders and tokenizers (the pooled vector's path)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    _seed(seed)
    vae = AutoencoderKL(**cfg["vae"])
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    parts: dict[str, Any] = {"vae": vae, "scheduler": scheduler}
    for i, key in enumerate(("text_encoder", "text_encoder_2")):
        tok = build_clip_tokenizer(cfg[key]["max_position_embeddings"])
        tcfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                              **cfg[key])
        _seed(seed + 1 + i)
        parts[key] = CLIPTextModelWithProjection(tcfg).eval()
        parts[key.replace("text_encoder", "tokenizer")] = tok
    if dtype is not None:
        for key in ("vae", "text_encoder", "text_encoder_2"):
            parts[key].to(dtype)
    return parts


# ---------------------------------------------------------------------------- folder

@dataclass(frozen=True)
class ReleaseLayout:
    """Where the parts of a release checkpoint may keep their tensors. The release's code allows
    several (its loader reads the projector from llm/ or from the LoRA shards; transformers 4.50 or
    4.52 key names; PEFT's safetensors or .bin adapter), and no file of the real release was read
    here, so the loader accepts each plausible variant and the builder writes each.

    projector_in: "both" (llm/ and the llm_lora shards), "llm" (llm/ only) or "llm_lora" (the
        shards only; the release's strict=False load applied them last).
    dit_lora_format: "safetensors" or "bin" (PEFT's older adapter_model.bin).
    llm_lora_names: "4.50" (text model at `model.`, vision tower outside it, not LoRA-wrapped) or
        "4.52" (both inside `model.`, and "all-linear" wrapped the vision tower too)."""

    projector_in: str = "both"
    dit_lora_format: str = "safetensors"
    llm_lora_names: str = "4.50"

    def __post_init__(self):
        for name, allowed in (("projector_in", ("both", "llm", "llm_lora")),
                              ("dit_lora_format", ("safetensors", "bin")), ("llm_lora_names", ("4.50", "4.52"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"layout {name}={getattr(self, name)!r}: use one of {allowed}")


# The SD3 folder's parts left out on purpose (UAE's DiT is dit/; the release has no T5).
SD3_PARTS_LEFT_OUT = ("transformer", "text_encoder_3", "tokenizer_3")


class _LeftOutParts(logging.Filter):
    """Drops diffusers' "self.<part>=None of type <class 'NoneType'> cannot be saved." for the parts
    in SD3_PARTS_LEFT_OUT: a pipeline saved without them says so once per part, as if by mistake."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.endswith("cannot be saved.") and
                    msg.startswith(tuple(f"self.{p}=None " for p in SD3_PARTS_LEFT_OUT)))


@contextlib.contextmanager
def _quiet_left_out_parts():
    log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    f = _LeftOutParts()
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def save_sd3_folder(pipe, out: Path) -> None:
    """Save `pipe`, a StableDiffusion3Pipeline without the parts UAE leaves out (SD3_PARTS_LEFT_OUT),
    as the release's SD3/ folder, without diffusers' complaint about those parts."""
    with _quiet_left_out_parts():
        pipe.save_pretrained(out)


def build_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                     overwrite: bool = False, dtype: str | None = None, device: str | None = None,
                     layout: ReleaseLayout = ReleaseLayout()) -> Path:
    """Build a complete random-weight checkpoint folder in the official layout (`layout` picks
    among the plausible variants of the release). Written into a temporary sibling and renamed at
    the end, so a folder that exists is always complete. `dtype` / `device` (e.g. "bfloat16",
    "cuda") create and initialise the weights there: a full-size model is built on a GPU in
    seconds instead of minutes on a CPU. The weights then differ from a float32 CPU build of the
    same seed."""
    import torch

    if device is not None or dtype is not None:
        dt = getattr(torch, dtype) if dtype else torch.float32
        old = torch.get_default_dtype()
        torch.set_default_dtype(dt)
        try:
            with torch.device(device or "cpu"):
                return build_checkpoint(out_dir, preset, seed, overwrite, layout=layout)
        finally:
            torch.set_default_dtype(old)
    from diffusers import StableDiffusion3Pipeline

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    cfg = load_preset(preset)
    with atomic_folder(out) as tmp:
        processor = build_processor(cfg)
        processor.save_pretrained(tmp / "llm_processor")

        model, projector = build_llm(cfg, processor.tokenizer, seed)
        save_llm_release_format(model, projector, tmp / "llm", with_projector=layout.projector_in != "llm_lora")

        lcfg = cfg["llm_lora"]
        encoder = UAEEncoder(model, projector, processor)
        encoder.add_lora(llm_lora_config(encoder.llm, r=lcfg["r"], alpha=lcfg["alpha"],
                                         include_vision=layout.llm_lora_names == "4.52"))
        _randomise_lora_b(encoder, seed + 2)
        save_official_llm_lora(encoder, tmp / "llm_lora", full_state_dict=True, names=layout.llm_lora_names,
                               with_projector=layout.projector_in != "llm")

        dit = build_dit(cfg, seed + 3)
        dit.save_pretrained(tmp / "dit")
        dit.add_adapter(dit_lora_config(cfg))
        _randomise_lora_b(dit, seed + 4)
        save_dit_lora(dit, tmp / "dit_lora", binary=layout.dit_lora_format == "bin")

        parts = build_sd3_parts(cfg, seed + 5)
        pipe = StableDiffusion3Pipeline(transformer=None, text_encoder_3=None, tokenizer_3=None, **parts)
        with _quiet_left_out_parts():
            pipe.save_pretrained(tmp / "SD3")
        (tmp / "README.md").write_text(
            f"Random-weight UAE checkpoint built offline by uae.random_weights (preset {cfg.get('name', preset)!r}, "
            f"seed {seed}). Layout of the official release; the weights are random: captions are "
            "gibberish and images are noise.\n")
    return out


def build_uae(preset: str = "full", *, device: str = "meta", dtypes: dict | None = None, llm_lora: bool = True,
              dit_lora: bool = True):
    """A UAE built from a preset without files, through the toolkit's own classes and LoRA wrappers
    (UAEEncoder / UAEDecoder, the release's LLM LoRA and DiT LoRA): on the meta device, full size
    in no memory, for counting what a trainer holds (bench/memory_plan.py). `dtypes`: the dtype
    of each part ("llm", "projector", "dit", "vae"), e.g. from the precision policy."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    cfg = load_preset(preset)
    dtypes = dtypes or {}
    processor = build_processor(load_preset("tiny") if device == "meta" else cfg)  # token ids only on meta
    with torch.device(device):
        llm, projector = build_llm(cfg, processor.tokenizer, seed=0)
        dit = build_dit(cfg, seed=0)
        parts = build_sd3_parts(cfg, seed=0)
    llm.to(dtypes.get("llm", torch.float32))
    projector.to(dtypes.get("projector", torch.float32))
    dit.to(dtypes.get("dit", torch.float32))
    parts["vae"].to(dtypes.get("vae", torch.float32))
    encoder = UAEEncoder(llm, projector, processor)
    if llm_lora:
        lcfg = cfg["llm_lora"]
        encoder.add_lora(llm_lora_config(encoder.llm, r=lcfg["r"], alpha=lcfg["alpha"]))
    if dit_lora:
        add_dit_lora(dit, dit_lora_config(cfg))
    pipe = StableDiffusion3Pipeline(transformer=dit, vae=parts["vae"], scheduler=parts["scheduler"], text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pooled = torch.zeros(1, cfg["dit"]["pooled_projection_dim"], device=device)
    return UAE(encoder, UAEDecoder(pipe, pooled), torch.device(device), dtypes.get("llm", torch.float32))
