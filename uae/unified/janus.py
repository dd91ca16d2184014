"""`--model janus`: Janus / Janus-Pro through transformers (`JanusForConditionalGeneration`,
`JanusProcessor`; checkpoints as transformers' converter writes them, e.g.
deepseek-community/Janus-Pro-7B and deepseek-community/Janus-Pro-1B).

Captioning: one user turn [the release's caption instruction, the image] through the checkpoint's
chat template; the processor prepends its default system prompt (use_default_system_prompt, as
DeepSeek's release does for understanding) and expands the image into its image tokens; text
generation (generation_mode="text") samples at the run's temperature (top_k / top_p /
repetition_penalty from the run, else generation_config.json's, else transformers' defaults),
after torch.manual_seed(the image's seed), one image per call.

Generation: one user turn [caption] through the chat template, then the processor's image mode
(appends <begin_of_image>), then Janus's own classifier-free-guided autoregressive image-token
generation (generate(generation_mode="image"): each prompt paired with an unconditional copy whose
tokens other than BOS and <begin_of_image> are padding; guidance --guidance_scale, DeepSeek's 5 by
default), image tokens sampled at the checkpoint's temperature (1 in the converted checkpoints)
from the full distribution (top_k off, top_p 1, as DeepSeek's release samples them: transformers
would otherwise apply its default top_k=50), after torch.manual_seed(the caption's seed), one image
per call; the tokens are decoded by the model's VQ decoder and the processor's postprocess into
PIL. The image size is fixed by the checkpoint (384 x 384 for Janus-Pro): --steps, --height and
--width do not apply.

Seeds: the sampling draws from torch's global generator on the model's device, so an item's
output depends only on its seed when it has its own generate() call (the default: batch- and
process-invariant). With caption_batching / dit_batching a batch is one call seeded with its first
seed (left-padded prompts): faster, not batch-invariant.

Two workarounds for transformers 5.x, both inert where the library does not need them: image
generation reads `generation_config.generation_kwargs["boi_token_id"]`, an attribute
GenerationConfig no longer has (it is set from the processor's <begin_of_image> id), and
`processor.postprocess(..., return_tensors="PIL.Image.Image")` fails in the image processor's
tensor conversion (the uint8 tensors it returns with return_tensors=None are converted here)."""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import torch

from uae.errors import UAEError
from uae.unified.common import (caption_images, caption_prompt, caption_sampling, load_config, load_pretrained,
                              seed_groups, short_name, to_device, torch_dtype)

logger = logging.getLogger(__name__)


class JanusAdapter:
    """Janus / Janus-Pro behind the UnifiedModel protocol."""

    text_kwargs = {"generation_mode": "text"}  # generate() writes text (captions), not image tokens

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
        self.boi = tok.convert_tokens_to_ids(self.processor.image_start_token)
        gen = self.model.generation_config
        if getattr(gen, "boi_token_id", self.boi) != self.boi:
            raise UAEError(f"{setting} {checkpoint}: generation_config.json's boi_token_id {gen.boi_token_id} is not "
                           f"the tokenizer's {self.processor.image_start_token} ({self.boi})")
        if not isinstance(getattr(gen, "generation_kwargs", None), dict):
            gen.generation_kwargs = {}
        gen.generation_kwargs.setdefault("boi_token_id", self.boi)
        self.sampling, self.effective = caption_sampling(settings, gen)
        self.image_temperature = getattr(gen, "temperature", None) or 1.0
        vision, vq = self.model.config.vision_config, self.model.config.vq_config
        self.image_tokens = vision.num_image_tokens
        side = vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)
        self.image_size = [side, side]
        logger.info("janus: images are %dx%d (%d tokens, fixed by the checkpoint); --steps, --height and --width do "
                    "not apply", side, side, self.image_tokens)

    # -------------------------------------------------------------- captioning
    def caption_prompt(self) -> str:
        return caption_prompt(self.processor, self.settings_.caption_instruction)

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
    def generate(self, texts: Sequence[str], seeds: Sequence[int]) -> list:
        texts = list(texts)
        images: list = [None] * len(texts)
        for idx, seed in seed_groups(len(texts), seeds, self.settings_.dit_batching):
            batch = self.processor(text=[self.generation_prompt(texts[i]) for i in idx], generation_mode="image",
                                   padding=True, return_tensors="pt").to(self.model.device)
            torch.manual_seed(seed)
            # A stage-2 captioner LoRA (--captioner_lora) trains the captions only: images without it.
            with (self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()):
                tokens = self.model.generate(**batch, generation_mode="image", do_sample=True,
                                             guidance_scale=self.settings_.guidance_scale, top_k=0, top_p=1.0,
                                             temperature=self.image_temperature)
            for i, im in zip(idx, self.to_pil(self.model.decode_image_tokens(tokens))):
                images[i] = im
        return images

    def settings(self) -> dict:
        s = self.settings_
        system = bool(getattr(self.processor, "use_default_system_prompt", False))
        return {"model": "janus", "name": self.name, "checkpoint": self.checkpoint, "device": s.device,
                "dtype": str(self.dtype),
                "caption": {"instruction": s.caption_instruction,
                            "prompt": "chat template, one user turn [instruction, image]; the processor's default "
                                      f"system prompt: {system}",
                            "sampling": self.effective},
                "generation": {"image_tokens": self.image_tokens, "image_size": self.image_size,
                               "guidance_scale": s.guidance_scale, "temperature": self.image_temperature,
                               "top_k": "off", "top_p": 1.0,
                               "not_applicable": ["steps", "height", "width"]},
                "seeded": "torch.manual_seed(seed) before each caption's and each image's generate()" if not
                          (s.caption_batching or s.dit_batching) else "one generate() per batch, first seed",
                "batch_invariant": not (s.caption_batching or s.dit_batching)}
