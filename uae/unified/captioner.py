"""Any transformers image-text-to-text model as a captioner (`AutoModelForImageTextToText` +
`AutoProcessor`, e.g. Qwen/Qwen2.5-VL-7B-Instruct): the captioning side of `--model pipeline`
and of `--model uae --captioner ID` (the paper's Tab. 3 captioner swap).

A caption is prompted as UAE's release prompts its own: one user turn holding the release's
caption instruction, then the image, through the checkpoint's own chat template and processor.
It is sampled at the run's temperature (top_k / top_p / repetition_penalty from the checkpoint's
generation_config.json unless given), decoded without the prompt and with special tokens skipped,
and returned unstripped. Each image is captioned alone after torch.manual_seed(its seed): a
caption depends neither on its batch-mates nor on the number of processes. With
caption_batching, a batch is one left-padded generate() call seeded with its first seed."""

from __future__ import annotations

import logging
from typing import Sequence

from uae.errors import UAEError
from uae.unified.common import (caption_images, caption_prompt, caption_sampling, load_config, load_pretrained,
                              short_name, to_device, torch_dtype)

logger = logging.getLogger(__name__)


class TransformersCaptioner:
    """image -> caption with a transformers image-text-to-text model."""

    text_kwargs: dict = {}  # what generate() needs to write text (none here; Janus: its generation mode)

    def __init__(self, source: str, settings, *, setting: str = "--captioner", label: str | None = None):
        from transformers import AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

        config = load_config(source, setting, "an image-text-to-text model (AutoModelForImageTextToText)")
        if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
            raise UAEError(f"{setting} {source} holds a {config.model_type!r} model, not an image-text-to-text "
                           "model (transformers' AutoModelForImageTextToText: Qwen2.5-VL, LLaVA, Gemma 3, ...)")
        self.source, self.settings = source, settings
        self.name = label or short_name(source)
        self.dtype = torch_dtype(settings)
        self.processor, self.model = load_pretrained(AutoModelForImageTextToText, source, setting, "the model",
                                                     self.dtype)
        self.model.to(settings.device).eval()
        if getattr(self.processor, "chat_template", None) is None:
            raise UAEError(f"{setting} {source}: the processor has no chat template to put the caption instruction "
                           "and the image in")
        self.sampling, self.effective = caption_sampling(settings, self.model.generation_config)

    def caption_prompt(self) -> str:
        return caption_prompt(self.processor, self.settings.caption_instruction)

    def inputs(self, images: Sequence):
        """The caption prompts of `images` (left-padded when more than one) on the model's device."""
        text = [self.caption_prompt()] * len(images)
        kwargs = {"padding": True, "padding_side": "left"} if len(images) > 1 else {}
        # One list of images per prompt: transformers' nested form says which images belong to
        # which sample. Processors that group images by sample (Gemma 3, PaliGemma, Idefics3 /
        # SmolVLM, Mllama) read a flat list of two images as one sample with two images and
        # refuse a batch of two prompts; the others (Qwen2.5-VL, LLaVA, ...) flatten the nested
        # form in their image processor (make_flat_list_of_images) into the same tensors as a flat
        # list (tests/unified/test_captioner_batches.py checks both kinds).
        nested = [[im] for im in images]
        # A chat template that writes the BOS itself (Gemma 3, Llama-based LLaVA) would get a second
        # one from the tokenizer: not then, as transformers' ProcessorMixin.apply_chat_template.
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        if bos and text and text[0].startswith(bos):
            kwargs["add_special_tokens"] = False
        batch = self.processor(text=text, images=nested, return_tensors="pt", **kwargs)
        return to_device(batch, self.model.device, self.dtype)

    def caption(self, images: Sequence, seeds: Sequence[int]) -> list[str]:
        return caption_images(self.model, self.processor, self.inputs, images, seeds, self.settings.caption_batching,
                              self.settings.caption_progress, **self.sampling)

    def settings_dict(self) -> dict:
        return {"captioner": self.source, "class": type(self.model).__name__, "dtype": str(self.dtype),
                "instruction": self.settings.caption_instruction,
                "prompt": "the checkpoint's chat template: one user turn [instruction, image], generation prompt",
                "sampling": self.effective, "seeded": "torch.manual_seed(seed) before each image's generate()"
                if not self.settings.caption_batching else "one generate() per batch, seeded with its first seed"}
