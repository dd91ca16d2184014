"""`--model janus`: Janus / Janus-Pro through transformers (`JanusForConditionalGeneration`,
`JanusProcessor`; checkpoints as transformers' converter writes them, e.g.
deepseek-community/Janus-Pro-7B and deepseek-community/Janus-Pro-1B).

Captioning: one user turn [the image, the release's caption instruction] (the image first, as
DeepSeek's Janus demo and transformers' Janus docs write it) through the checkpoint's chat template;
the processor prepends its default system prompt (use_default_system_prompt, as DeepSeek's release
does for understanding) and expands the image into its image tokens; text generation
(generation_mode="text") samples at the run's temperature (top_k / top_p / repetition_penalty from
the run, else generation_config.json's, else transformers' defaults), after torch.manual_seed(the
image's seed), one image per call (a batch per call with caption_batching: not batch-invariant).

Generation: one user turn [caption] through the chat template, then the processor's image mode
(appends <begin_of_image>), left-padded (`image_inputs`), then classifier-free-guided
autoregressive image-token sampling by uae.unified.janus_images.sample_image_tokens: each prompt
beside an unconditional copy whose tokens other than BOS and <begin_of_image> are padding, the next
token drawn from softmax((u + w (c - u)) / T) with w = --guidance_scale (DeepSeek's 5 by default;
any value: 1 is the conditional model alone) and T the checkpoint's temperature (1 in the converted
checkpoints), over the full codebook (no top-k / top-p, as DeepSeek's release samples). Images go in
calls of `images_per_call` (16, DeepSeek's parallel_size), each image drawing from a torch.Generator
of its own on the model's device seeded with its seed, so an image depends on its caption and seed
only, not on its batch-mates or the batching (dit_batching has no effect on Janus). The tokens are
decoded one image at a time (`decode`: a batched decode rounds a pixel differently) by the model's
VQ decoder and the processor's postprocess into PIL. The image size is fixed by the checkpoint
(384 x 384 for Janus-Pro): --steps, --height and --width do not apply. A batch's arithmetic can
differ from a single image's in the last bits (padding, kernel shapes; in bf16 on a GPU more than in
fp32), which may flip a token drawn right at a boundary of the distribution.

A captioner LoRA (PEFT, --captioner_lora or stage 2's policy) applies to the captions; the images use
it only with `image_lora` True (a LoRA trained end to end on its own images), else they are the base
model's.

One workaround for transformers 5.x, inert where the library does not need it:
`processor.postprocess(..., return_tensors="PIL.Image.Image")` fails in the image processor's tensor
conversion (the uint8 tensors it returns with return_tensors=None are converted here)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import fields
from typing import Sequence

import torch

from uae.errors import UAEError
from uae.unified.common import (caption_images, caption_sampling, load_config, load_pretrained, short_name, to_device,
                                torch_dtype)
from uae.unified.janus_images import ImageSample, sample_image_tokens

logger = logging.getLogger(__name__)


class JanusAdapter:
    """Janus / Janus-Pro behind the UnifiedModel protocol."""

    text_kwargs = {"generation_mode": "text"}  # generate() writes text (captions), not image tokens
    images_per_call = 16  # images sampled together (DeepSeek's parallel_size); no effect on the images
    image_lora = False  # images with the model's PEFT adapter (True) or with it disabled (False)

    def __init__(self, checkpoint: str, settings, *, setting: str = "--checkpoint", label: str | None = None):
        from transformers import JanusForConditionalGeneration, JanusProcessor

        config = load_config(checkpoint, setting, "a Janus checkpoint")
        if config.model_type != "janus":
            raise UAEError(f"{setting} {checkpoint} holds a {config.model_type!r} model, not a Janus checkpoint "
                           "(transformers' converted layout, model_type 'janus', e.g. deepseek-community/Janus-Pro-7B; "
                           "DeepSeek's original deepseek-ai/Janus-Pro-7B layout needs converting)")
        self.checkpoint, self.settings_ = checkpoint, settings
        self.name = label or short_name(checkpoint)
        self.dtype = torch_dtype(settings)
        self.processor, self.model = load_pretrained(JanusForConditionalGeneration, checkpoint, setting,
                                                     "the Janus model", self.dtype)
        if not isinstance(self.processor, JanusProcessor):
            raise UAEError(f"{setting} {checkpoint}: its processor is {type(self.processor).__name__}, "
                           "not JanusProcessor")
        if getattr(self.processor, "chat_template", None) is None:
            raise UAEError(f"{setting} {checkpoint}: the processor has no chat template")
        self.model.to(settings.device).eval()
        tok = self.processor.tokenizer
        gen = self.model.generation_config
        # The unconditional prompt of image generation keeps BOS (None: a tokenizer without one) and
        # <begin_of_image>, and pads the rest.
        self.boi = tok.convert_tokens_to_ids(self.processor.image_start_token)
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else getattr(gen, "pad_token_id", None)
        if getattr(gen, "boi_token_id", self.boi) != self.boi:
            raise UAEError(f"{setting} {checkpoint}: generation_config.json's boi_token_id {gen.boi_token_id} is not "
                           f"the tokenizer's {self.processor.image_start_token} ({self.boi})")
        if self.pad_id is None:
            raise UAEError(f"{setting} {checkpoint}: neither the tokenizer nor generation_config.json has a pad token "
                           "(the unconditional prompt of image generation is made of it)")
        self.sampling, self.effective = caption_sampling(settings, gen)
        self.image_temperature = getattr(gen, "temperature", None) or 1.0
        self.image_tokens = self.model.config.vision_config.num_image_tokens
        side = janus_image_side(self.model.config)
        self.image_size = [side, side]
        logger.info("janus: images are %dx%d (%d tokens, fixed by the checkpoint); --steps, --height and --width do "
                    "not apply", side, side, self.image_tokens)

    # -------------------------------------------------------------- captioning
    def caption_prompt(self) -> str:
        """The release's caption instruction after the image, in one user turn through the checkpoint's
        chat template (Janus puts the image first: DeepSeek's demo, transformers' Janus docs)."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.settings_.caption_instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, images: Sequence):
        """Caption prompts of `images` (RGB), left-padded, on the model's device."""
        prompt = self.caption_prompt()
        batch = self.processor(text=[prompt] * len(images), images=list(images), generation_mode="text",
                               padding=True, padding_side="left", return_tensors="pt")
        return to_device(batch, self.model.device, self.dtype)

    def caption(self, images: Sequence, seeds: Sequence[int]) -> list[str]:
        return caption_images(self.model, self.processor, self.inputs, images, seeds, self.settings_.caption_batching,
                              self.settings_.caption_progress, **self.text_kwargs, **self.sampling)

    # -------------------------------------------------------------- generation
    def generation_prompt(self, text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def to_pil(self, pixels: torch.Tensor) -> list:
        """The VQ decoder's (B, H, W, C) output -> PIL, through the processor's postprocess (its
        mean / std and rescale)."""
        from PIL import Image

        out = self.processor.postprocess(list(pixels.float()), return_tensors=None)["pixel_values"]
        images = []
        for im in out:
            if isinstance(im, Image.Image):
                images.append(im)
                continue
            arr = im.detach().cpu()
            if arr.ndim == 3 and arr.shape[0] in (1, 3):
                arr = arr.permute(1, 2, 0)
            images.append(Image.fromarray(arr.to(torch.uint8).numpy()))
        return images

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list:
        """Image tokens (B, N) -> PIL images, one VQ decoder call per image: a batch's convolutions
        round differently from a single image's (pixels a level apart, measured on the tiny Janus),
        and an image must not depend on its batch-mates."""
        return [im for row in tokens for im in self.to_pil(self.model.decode_image_tokens(row[None]))]

    def image_inputs(self, texts: Sequence[str]):
        """Image-generation prompts of `texts` (chat template, then <begin_of_image>), left-padded, on
        the model's device: what generate() and stage 2's trainer sample from."""
        return self.processor(text=[self.generation_prompt(t) for t in texts], generation_mode="image", padding=True,
                              padding_side="left", return_tensors="pt").to(self.model.device)

    def image_lora_context(self):
        """The context images are generated in: the PEFT adapter disabled unless `image_lora` (a stage-2
        captioner LoRA that trained the captions only leaves the images as the base model's)."""
        if self.image_lora or not hasattr(self.model, "disable_adapter"):
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    @torch.no_grad()
    def sample_images(self, texts: Sequence[str], seeds: Sequence[int]) -> tuple[dict, ImageSample]:
        """The image tokens of `texts` by the model as it is (call it inside `image_lora_context()`
        for the adapter's choice of LoRA), with their log-probabilities: the prompts left-padded
        together (`image_inputs`), then sampled `images_per_call` at a time, image i from a generator
        of its own seeded with seeds[i]. Returns the prompts (input_ids, attention_mask) and the
        sample; generate() decodes it, stage 2's trainer also keeps the prompts and log-probs."""
        texts, seeds = list(texts), list(seeds)
        if len(seeds) != len(texts):
            raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts")
        if self.images_per_call < 1:
            raise UAEError(f"images_per_call {self.images_per_call}: must be at least 1")
        batch = self.image_inputs(texts)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        gens = [torch.Generator(device=ids.device).manual_seed(s) for s in seeds]
        outs = [sample_image_tokens(self.model, ids[rows], mask[rows], generators=gens[rows],
                                    guidance_scale=self.settings_.guidance_scale, temperature=self.image_temperature,
                                    bos_id=self.bos_id, boi_id=self.boi, pad_id=self.pad_id)
                for rows in (slice(i, i + self.images_per_call) for i in range(0, len(texts), self.images_per_call))]
        return batch, ImageSample(*(torch.cat([getattr(o, f.name) for o in outs]) for f in fields(ImageSample)))

    @torch.no_grad()
    def generate(self, texts: Sequence[str], seeds: Sequence[int]) -> list:
        texts, seeds = list(texts), list(seeds)
        if len(seeds) != len(texts):
            raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts")
        images: list = []
        step = max(self.images_per_call, 1)
        for start in range(0, len(texts), step):  # each call's prompts padded on their own
            chunk = slice(start, start + step)
            with self.image_lora_context():
                _, out = self.sample_images(texts[chunk], seeds[chunk])
            images += self.decode(out.tokens)
        return images

    def settings(self) -> dict:
        s = self.settings_
        system = bool(getattr(self.processor, "use_default_system_prompt", False))
        return {"model": "janus", "name": self.name, "checkpoint": self.checkpoint, "device": s.device,
                "dtype": str(self.dtype),
                "caption": {"instruction": s.caption_instruction,
                            "prompt": "chat template, one user turn [image, instruction]; the processor's default "
                                      f"system prompt: {system}",
                            "sampling": self.effective},
                "generation": {"image_tokens": self.image_tokens, "image_size": self.image_size,
                               "guidance_scale": s.guidance_scale, "temperature": self.image_temperature,
                               "top_k": "off", "top_p": 1.0, "images_per_call": self.images_per_call,
                               "seeded": "one torch.Generator(seed) per image on the model's device",
                               "batch_invariant": True, "image_lora": self.image_lora,
                               "dit_batching": "no effect: images are sampled images_per_call at a time, each "
                                               "from its own generator",
                               "not_applicable": ["steps", "height", "width"]},
                "seeded": "torch.manual_seed(seed) before each caption's generate()" if not s.caption_batching
                          else "one caption generate() per batch, first seed",
                "batch_invariant": not s.caption_batching}


def janus_image_side(config) -> int:
    """The side in pixels of a Janus checkpoint's images (its config: the VQ model's latent grid
    times its upsampling; 384 for Janus-Pro), fixed by the checkpoint."""
    vq = config.vq_config
    return vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)
