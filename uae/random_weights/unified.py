"""Random-weight models of the field's libraries for Unified-Bench's other models under test, each
built offline in seconds (tests, and `tiny` for the runner's --checkpoint / --captioner /
--generator):

    build_janus(out)        a Janus / Janus-Pro checkpoint as transformers' converter writes one
                            (JanusForConditionalGeneration + JanusProcessor with the converted
                            checkpoints' chat template; 32x32 images of 16 tokens)
    build_captioner(out)    an image-text-to-text model: the tiny preset's Qwen2.5-VL, saved with
                            save_pretrained (current key names) beside its processor
    build_gemma3(out)       another image-text-to-text model, Gemma 3 (Gemma3ForConditionalGeneration
                            + Gemma3Processor), whose processor takes one list of images per sample
    build_generator(out)    a diffusers StableDiffusion3Pipeline saved whole (DiT, VAE, scheduler,
                            CLIP-L / CLIP-G text encoders and tokenizers; no T5, recorded as null in
                            model_index.json)

Each tokenizer carries the special tokens of the real checkpoints' files (names, which of them the
encoding adds, which decoding skips), so that code relying on them (a BOS at the start of every
prompt, a pad token, an image placeholder) is tested as it runs on the real ones; only the
vocabulary is a small byte-level BPE trained offline.

`embedded(kind)` builds each once into the cache folder, keyed by the content of its specs
(tokenizer specs included), as the embedded `tiny` UAE checkpoint is
(uae.random_weights.embedded). Two builds from the same seed are identical."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import uae
from uae.files import atomic_folder, build_once
from uae.hashing import content_key
from uae.paths import MODEL_PRESETS, cache_dir
from uae.random_weights.checkpoint import (QWEN_SPECIAL_TOKENS, build_clip_tokenizer, build_dit, build_llm,
                                           build_processor, build_sd3_parts, load_preset, preset_key)

logger = logging.getLogger(__name__)

KINDS = ("janus", "captioner", "generator", "gemma3", "flux")

# The converted Janus checkpoints' chat template (transformers' convert_janus_weights_to_hf.py,
# CHAT_TEMPLATE): "<|User|>: ...\n\n<|Assistant|>:", images as <image_placeholder>, text items
# stripped at the ends of a turn. Real checkpoints ship their own.
JANUS_CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}"
    "<|User|>: "
    "{%elif message['role']|lower=='assistant'%}"
    "<|Assistant|>:{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}"
    "{{message['role'].capitalize()}}: "
    "{%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>"
    "{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}"
    "{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}"
    "{{' '+text}}"
    "{%else%}"
    "{{text}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}"
    "{{seps[0]}}"
    "{%else%}"
    "{{seps[1]}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)

# DeepSeek's special tokens as the Janus-Pro tokenizers name them: deepseek-ai/Janus-Pro-1B / -7B's
# special_tokens_map.json (bos, eos, pad and the additional special tokens) and tokenizer_config.json
# (LlamaTokenizer, which adds the BOS to every encoding: the converted deepseek-community/Janus-Pro-*
# tokenizer, LlamaTokenizerFast, keeps add_bos_token true), plus the three image tokens transformers'
# convert_janus_weights_to_hf.py names for JanusProcessor. The unconditional prompt of Janus' image
# generation keeps the BOS and blanks the rest, so a tokenizer without it would test another model.
JANUS_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
JANUS_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
JANUS_PAD = "<\uff5c\u2581pad\u2581\uff5c>"
JANUS_IMAGE_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                      "eoi_token": "<end_of_image>"}
JANUS_TOKENIZER: dict[str, Any] = {
    "bos_token": JANUS_BOS, "eos_token": JANUS_EOS, "pad_token": JANUS_PAD, "add_bos_token": True,
    "extra_special_tokens": ["<image_placeholder>", "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>",
                             "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"],
    "model_specific_special_tokens": JANUS_IMAGE_TOKENS,
}

# Sizes. Janus: vision image_size / patch_size = 4 patches a side = 16 image tokens (understanding
# and generation alike); the VQ decoder upsamples 4 -> 32 pixels (channel_multiplier of four levels);
# base_channels 32 because its GroupNorms have 32 groups. Widths that must agree: the aligners'
# projection_dim and image_token_embed_dim equal the text model's hidden_size.
TINY_JANUS: dict[str, Any] = {
    "vocab_size": 400,
    "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096},
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32,
                      "patch_size": 8, "mlp_ratio": 2.0, "projection_dim": 32, "num_image_tokens": 16, "depth": 2},
    "vq_config": {"embed_dim": 8, "num_embeddings": 64, "latent_channels": 8, "base_channels": 32,
                  "channel_multiplier": [1, 1, 1, 1], "num_res_blocks": 1, "projection_dim": 32,
                  "image_token_embed_dim": 32, "num_hidden_layers": 2},
    # Janus-Pro's preprocessor: mean = std = 0.5 (the decoder's output in [-1, 1] maps to [0, 255]).
    "image_processor": {"size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5],
                        "image_std": [0.5, 0.5, 0.5]},
    # The converter's generation_config.json: image tokens at temperature 1, guidance 5.
    "generation": {"temperature": 1.0, "guidance_scale": 5},
    # An untied output layer with logits of a trained model's scale (as configs/models/tiny.yaml's
    # LLM): at the default init the text logits are near zero, the caption distribution almost
    # uniform and almost insensitive to a LoRA, so no reward could be learned in a test.
    "output_embedding_std": 0.125,
    # The image head likewise (generation_head: proj_out, GELU, vision_head): at the default init its
    # logits are ~0.01 (measured std 0.007), the image-token distribution uniform whatever the prompt,
    # guidance or LoRA. These give logits of std ~2 on normed hidden states (entropy 2.8 of ln 64 = 4.2).
    "image_head_std": {"proj_out": 0.18, "vision_head": 0.5},
}

# Caption-like text for the offline byte-level BPE.
CORPUS = [
    "a photo of a red cube on a wooden table in a bright room with white walls",
    "a serene mountain landscape with snow-capped peaks reflecting in a crystal clear lake",
    "a cat sitting on a window sill looking outside at the rain, soft natural light",
    "an astronaut in a white space suit standing in front of a flag",
    "a cup of coffee with latte art on a saucer, top view, dark background",
    "the image shows a rocket on a launch pad under a blue sky with some clouds",
    "text on the sign reads \"open\" in bold black letters on a yellow background",
    "you are an expert vision-language model. given an input image, generate a textual description",
]


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _written(out: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """`write(folder)` into a folder that becomes `out` only when complete (uae.files.atomic_folder)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    with atomic_folder(out) as tmp:
        write(tmp)
    return out


def _readme(folder: Path, what: str, seed: int) -> None:
    text = (f"Random-weight {what} built offline by uae.random_weights.unified (seed {seed}). The weights are "
            "random: captions are gibberish and images are noise.\n")
    (folder / "README.md").write_text(text)


# ---------------------------------------------------------------------------- Janus

def _bpe(specials: list[str], vocab_size: int):
    """A byte-level BPE trained offline on CORPUS, `specials` first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 4, trainer)
    return bpe


def _tokenizer(spec: dict[str, Any], vocab_size: int):
    """A fast tokenizer with `spec`'s special tokens (transformers' keyword arguments: named tokens,
    first in the vocabulary in the order given, add_bos_token, extra_special_tokens,
    model_specific_special_tokens such as image_token)."""
    from transformers import PreTrainedTokenizerFast

    named = [v for k, v in spec.items() if k.endswith("_token") and isinstance(v, str)]  # the real order
    specials = list(dict.fromkeys(named + list(spec.get("extra_special_tokens", []))
                                  + list(spec.get("model_specific_special_tokens", {}).values())))
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(specials, vocab_size), **copy.deepcopy(spec))


def build_janus_tokenizer(vocab_size: int = TINY_JANUS["vocab_size"]):
    """Byte-level BPE trained offline on CORPUS with Janus-Pro's special tokens (JANUS_TOKENIZER): a
    BOS before every encoding, and the image tokens that JanusProcessor reads from the tokenizer."""
    return _tokenizer(JANUS_TOKENIZER, vocab_size)


def build_janus(out: str | os.PathLike, seed: int = 0, spec: dict | None = None, overwrite: bool = False) -> Path:
    """A random Janus checkpoint folder loadable with JanusForConditionalGeneration / AutoProcessor,
    laid out as transformers' converter writes the Janus-Pro ones (config.json, generation_config.json
    with temperature 1, guidance 5 and boi_token_id, processor with use_default_system_prompt)."""
    spec = copy.deepcopy(spec or TINY_JANUS)

    def write(tmp: Path) -> None:
        import torch
        from transformers import (GenerationConfig, JanusConfig, JanusForConditionalGeneration,
                                  JanusImageProcessor, JanusProcessor)

        tok = build_janus_tokenizer(spec["vocab_size"])
        ids = {t: tok.convert_tokens_to_ids(t) for t in (JANUS_BOS, JANUS_EOS, JANUS_PAD, *JANUS_IMAGE_TOKENS.values())}
        text = dict(spec["text_config"], vocab_size=len(tok), bos_token_id=ids[JANUS_BOS],
                    eos_token_id=ids[JANUS_EOS], pad_token_id=ids[JANUS_PAD])
        vis = spec["vision_config"]
        if (vis["image_size"] // vis["patch_size"]) ** 2 != vis["num_image_tokens"]:
            raise ValueError("vision_config: (image_size / patch_size)^2 must equal num_image_tokens")
        std = spec.get("output_embedding_std")
        config = JanusConfig(text_config=text, vision_config=vis, vq_config=spec["vq_config"],
                             image_token_id=ids["<image_placeholder>"], tie_word_embeddings=not std)
        _seed(seed)
        model = JanusForConditionalGeneration(config).eval()
        if std:
            out_emb = model.get_output_embeddings().weight
            with torch.no_grad():
                out_emb.copy_(torch.randn(out_emb.shape, generator=torch.Generator().manual_seed(seed + 11)) * std)
        head = model.model.generation_head
        for k, (name, head_std) in enumerate(sorted(spec.get("image_head_std", {}).items())):
            weight = getattr(head, name).weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed + 12 + k)) * head_std)
        model.generation_config = GenerationConfig(
            bos_token_id=ids[JANUS_BOS], eos_token_id=ids[JANUS_EOS], pad_token_id=ids[JANUS_PAD],
            boi_token_id=ids["<begin_of_image>"], **spec["generation"])
        model.save_pretrained(tmp)
        processor = JanusProcessor(image_processor=JanusImageProcessor(**spec["image_processor"]), tokenizer=tok,
                                   chat_template=JANUS_CHAT_TEMPLATE, use_default_system_prompt=True,
                                   num_image_tokens=vis["num_image_tokens"])
        processor.save_pretrained(tmp)
        _readme(tmp, "Janus checkpoint (transformers' converted layout)", seed)

    return _written(out, overwrite, write)


# ---------------------------------------------------------------------------- captioner

def build_captioner(out: str | os.PathLike, seed: int = 0, preset: str = "tiny", overwrite: bool = False) -> Path:
    """A random Qwen2.5-VL image-text-to-text model (the preset's LLM, without UAE's projector or
    LoRA) saved with save_pretrained beside its processor: what `AutoModelForImageTextToText` /
    `AutoProcessor` load from a hub id such as Qwen/Qwen2.5-VL-7B-Instruct."""
    cfg = load_preset(preset)

    def write(tmp: Path) -> None:
        processor = build_processor(cfg)
        model, _ = build_llm(cfg, processor.tokenizer, seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _readme(tmp, f"Qwen2.5-VL captioner (preset {preset!r})", seed)

    return _written(out, overwrite, write)


# ---------------------------------------------------------------------------- Gemma 3

# Gemma 3's special tokens as google/gemma-3-*-it name them (tokenizer_config.json: <bos> added to
# every encoding, <eos>, <pad>, <unk>; the image tokens Gemma3Processor reads from the tokenizer;
# the turn markers). Its generation_config.json ends a caption at <eos> or <end_of_turn>.
GEMMA3_TOKENIZER: dict[str, Any] = {
    "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>", "add_bos_token": True,
    "extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    "model_specific_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"},
}

# A chat template equivalent to Gemma 3's for what the toolkit sends (the BOS, then user / model
# turns of text and images, the generation prompt). Real checkpoints ship their own.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%for message in messages%}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{%if message['content'] is string%}{{ message['content'] | trim }}"
    "{%else%}{%for item in message['content']%}"
    "{%if item['type'] == 'image'%}<start_of_image>{%elif item['type'] == 'text'%}{{ item['text'] | trim }}{%endif%}"
    "{%endfor%}{%endif%}"
    "<end_of_turn>\n"
    "{%endfor%}"
    "{%if add_generation_prompt%}<start_of_turn>model\n{%endif%}"
)

# Sizes: SigLIP 32 / 8 = 4 patches a side, pooled 2 x 2 into mm_tokens_per_image = 4 image tokens.
TINY_GEMMA3: dict[str, Any] = {
    "vocab_size": 400,
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 4096, "sliding_window": 64},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "image_size": 32, "patch_size": 8},
    "mm_tokens_per_image": 4,
    # Gemma 3's preprocessor (SigLIP): mean = std = 0.5, at the vision tower's size.
    "image_processor": {"size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5],
                        "image_std": [0.5, 0.5, 0.5]},
    # Gemma 3's generation_config.json sampling processors.
    "generation": {"top_k": 64, "top_p": 0.95},
}


def build_gemma3(out: str | os.PathLike, seed: int = 0, spec: dict | None = None, overwrite: bool = False) -> Path:
    """A random Gemma 3 image-text-to-text model (Gemma3ForConditionalGeneration + Gemma3Processor)
    loadable with AutoModelForImageTextToText / AutoProcessor, as google/gemma-3-4b-it is. Its
    processor reads images as one list per sample: a flat list of two images is one sample with
    two images."""
    spec = copy.deepcopy(spec or TINY_GEMMA3)

    def write(tmp: Path) -> None:
        from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor,
                                  Gemma3Processor, GenerationConfig)

        tok = _tokenizer(GEMMA3_TOKENIZER, spec["vocab_size"])
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in
               {**GEMMA3_TOKENIZER["model_specific_special_tokens"], "bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
                "end_of_turn": "<end_of_turn>"}.items()}
        text = dict(spec["text_config"], vocab_size=len(tok), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                    pad_token_id=ids["pad"])
        config = Gemma3Config(text_config=text, vision_config=spec["vision_config"],
                              mm_tokens_per_image=spec["mm_tokens_per_image"], boi_token_index=ids["boi_token"],
                              eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"])
        _seed(seed)
        model = Gemma3ForConditionalGeneration(config).eval()
        model.generation_config = GenerationConfig(
            bos_token_id=ids["bos"], eos_token_id=[ids["eos"], ids["end_of_turn"]], pad_token_id=ids["pad"],
            do_sample=True, **spec["generation"])
        model.save_pretrained(tmp)
        processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(**spec["image_processor"]), tokenizer=tok,
                                    chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=spec["mm_tokens_per_image"])
        processor.save_pretrained(tmp)
        _readme(tmp, "Gemma 3 image-text-to-text model", seed)

    return _written(out, overwrite, write)


# ---------------------------------------------------------------------------- generator

def generator_preset(preset: str = "tiny") -> dict:
    """The preset with the DiT widened to what a standalone SD3 pipeline feeds it: its prompt
    embeddings are the CLIP-L and CLIP-G hidden states side by side (zero-padded to T5's width, or
    to joint_attention_dim without T5), so joint_attention_dim must be at least the sum of the two
    CLIP widths; the pooled vector is their two projections side by side. (UAE's own DiT takes its
    projector's output instead.)"""
    cfg = copy.deepcopy(load_preset(preset))
    clip = cfg["text_encoder"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"]
    cfg["dit"]["joint_attention_dim"] = clip
    pooled = cfg["text_encoder"]["projection_dim"] + cfg["text_encoder_2"]["projection_dim"]
    cfg["dit"]["pooled_projection_dim"] = pooled
    return cfg


def build_generator(out: str | os.PathLike, seed: int = 0, preset: str = "tiny", overwrite: bool = False) -> Path:
    """A random StableDiffusion3Pipeline folder (what AutoPipelineForText2Image loads from a hub id
    such as stabilityai/stable-diffusion-3.5-large), without T5: model_index.json records
    text_encoder_3 / tokenizer_3 as null."""
    cfg = generator_preset(preset)

    def write(tmp: Path) -> None:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(transformer=build_dit(cfg, seed), text_encoder_3=None, tokenizer_3=None,
                                        **build_sd3_parts(cfg, seed + 1))
        pipe.save_pretrained(tmp)
        _readme(tmp, f"StableDiffusion3Pipeline (preset {preset!r}, no T5)", seed)

    return _written(out, overwrite, write)


TINY_FLUX = MODEL_PRESETS / "pipelines" / "tiny_flux.yaml"  # FLUX.1-dev's structure at toy sizes
# T5's special tokens as google/t5-v1_1-xxl's tokenizer has them (pad 0, end of sequence 1, unknown 2);
# none of its 100 sentinel <extra_id_*> tokens (no code here reads them).
T5_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_t5_tokenizer():
    """A T5 tokenizer (Unigram, as T5's SentencePiece model) over bytes' characters and CORPUS's
    words, offline; it appends </s> as the real one does."""
    from transformers import T5TokenizerFast

    specials = list(T5_SPECIAL_TOKENS.values())
    words = sorted({w.lower().strip(".,:;!?\"'()") for line in CORPUS for w in line.split()} - {""})
    pieces = [(t, 0.0) for t in specials] + [("\u2581" + w, -1.0) for w in words]
    pieces += [(ch, -5.0) for ch in sorted(set("".join(CORPUS)) | set("\u2581"))]
    return T5TokenizerFast(vocab=list(dict.fromkeys(pieces)), extra_ids=0, **T5_SPECIAL_TOKENS)


def build_flux(out: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
    """A random FluxPipeline folder (what FluxPipeline.from_pretrained loads from
    black-forest-labs/FLUX.1-dev): FluxTransformer2DModel with the guidance embedding, a 16x-smaller
    AutoencoderKL with FLUX's scaling and shift factors, the dynamically shifted flow-matching
    scheduler, CLIP-L (the pooled vector) and T5 (the token conditioning) with their tokenizers, at
    configs/models/pipelines/tiny_flux.yaml's sizes."""
    import yaml

    cfg = yaml.safe_load(TINY_FLUX.read_text())

    def write(tmp: Path) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        _seed(seed)
        transformer = FluxTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
        clip_tok = build_clip_tokenizer(cfg["text_encoder"]["max_position_embeddings"])
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                            **cfg["text_encoder"])).eval()
        t5_tok = build_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), pad_token_id=t5_tok.pad_token_id,
                                     eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id,
                                     **cfg["text_encoder_2"])).eval()
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]), vae=vae, text_encoder=clip,
                            tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
        pipe.save_pretrained(tmp)
        _readme(tmp, "FluxPipeline (configs/models/pipelines/tiny_flux.yaml)", seed)

    return _written(out, overwrite, write)


BUILDERS: dict[str, Callable[..., Path]] = {"janus": build_janus, "captioner": build_captioner,
                                             "generator": build_generator, "gemma3": build_gemma3, "flux": build_flux}


def _spec_key(kind: str) -> str:
    """What a cached build depends on: its sizes, tokenizer and chat template (a change rebuilds it)."""
    spec = {"janus": [TINY_JANUS, JANUS_TOKENIZER, JANUS_CHAT_TEMPLATE],
            "gemma3": [TINY_GEMMA3, GEMMA3_TOKENIZER, GEMMA3_CHAT_TEMPLATE],
            "captioner": [preset_key("tiny"), QWEN_SPECIAL_TOKENS],
            "generator": [preset_key("tiny")],
            "flux": [TINY_FLUX.read_text(), T5_SPECIAL_TOKENS]}[kind]
    return content_key(json.dumps([kind, spec], sort_keys=True).encode())[:10]


def embedded(kind: str) -> Path:
    """The cached tiny model of `kind` (janus, captioner, generator, gemma3), built on first use."""
    if kind not in BUILDERS:
        raise ValueError(f"kind {kind!r}: choose from {KINDS}")
    path = cache_dir() / f"tiny-{kind}-v{uae.__version__}-{_spec_key(kind)}"
    if not path.exists():
        logger.info("building the embedded tiny %s in %s (seconds, offline)", kind, path)
    return build_once(path, lambda p: BUILDERS[kind](p, seed=0))


def resolve(name: str | None, kind: str) -> str | None:
    """`tiny`: the embedded random model of `kind` (with a warning: its output is noise); for a
    generator, `tiny-flux` the embedded random FLUX pipeline; anything else (a folder, a hub id,
    None) unchanged."""
    if kind == "generator" and name == "tiny-flux":
        name, kind = "tiny", "flux"
    if name != "tiny":
        return name
    path = str(embedded(kind))
    logger.warning("using the embedded tiny %s %s: its weights are RANDOM, captions are gibberish and images are "
                   "noise", kind, path)
    return path
