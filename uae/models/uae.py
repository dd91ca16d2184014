"""One facade over both halves: caption(images), generate(prompts), reconstruct(images)."""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from uae.errors import UAEError
from uae.models.layout import COMPONENTS, ComponentPaths, resolve_components
from uae.models.decoder import UAEDecoder
from uae.models.encoder import EncoderPrompts, UAEEncoder, group_by_length
from uae.runtime import attention_backend, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

ENCODER_PARTS = ("llm", "llm_lora", "llm_processor")
DECODER_PARTS = ("SD3", "dit", "dit_lora")
RELEASE_SEED = 42  # the release's demo.py generates every image with seed 42


class UAE:
    """The UAE auto-encoder: `encoder` (image -> caption, caption -> conditioning) and `decoder`
    (conditioning -> image). Either may be None when only the other is loaded."""

    def __init__(self, encoder: UAEEncoder | None, decoder: UAEDecoder | None,
                 device: torch.device, dtype: torch.dtype, components: ComponentPaths | None = None):
        self.encoder, self.decoder = encoder, decoder
        self.device, self.dtype = device, dtype
        self.components = components

    @classmethod
    def from_pretrained(cls, checkpoint: str | None, *, overrides: dict[str, str | None] | None = None,
                        load_encoder: bool = True, load_decoder: bool = True, device: str | None = None,
                        dtype: str | torch.dtype | None = None, attn_implementation: str | None = None,
                        prompts: EncoderPrompts | None = None,
                        part_dtypes: dict[str, torch.dtype] | None = None, offload: bool = False) -> "UAE":
        """Load from a checkpoint folder in the official layout or a hub id (the embedded random
        checkpoint: `uae.random_weights.embedded_checkpoint()`, which the command lines use for
        `tiny`); `overrides` gives single parts by path or hub id ("none" switches a LoRA off).
        Only the parts of the halves asked for are loaded. `part_dtypes` overrides `dtype` for
        "projector" and "dit" (a trainer loads what trains fully in fp32: uae.training.precision).
        `offload` keeps the models in CPU memory and moves each to the GPU only while it runs (the LLM,
        then the DiT, then the VAE: diffusers' model CPU offload), so that about one model's weights
        are on the GPU at a time (inference on a 24 GB card)."""
        if checkpoint == "tiny":
            raise UAEError("checkpoint 'tiny' is the embedded random checkpoint, a name the command lines resolve: "
                           "in Python, UAE.from_pretrained(uae.random_weights.embedded_checkpoint())")
        # The encoder is needed by generation too: prompts are embedded by the LLM + projector.
        need = tuple(c for c in COMPONENTS if c in ENCODER_PARTS or (load_decoder and c in DECODER_PARTS))
        paths = resolve_components(checkpoint, overrides, need)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if offload and dev.type != "cuda":
            raise UAEError("--offload moves each model between CPU memory and the GPU while it runs: it needs a "
                           f"CUDA GPU (the device is {dev}); without a GPU everything is in CPU memory already")
        load_on = torch.device("cpu") if offload else dev
        encoder = UAEEncoder.from_pretrained(paths.llm, paths.llm_processor, paths.llm_lora, dtype=dt, device=load_on,
                                             attn_implementation=attention_backend(dev, attn_implementation),
                                             prompts=prompts, projector_dtype=(part_dtypes or {}).get("projector")) \
            if (load_encoder or load_decoder) else None
        decoder = UAEDecoder.from_pretrained(paths.SD3, paths.dit, paths.dit_lora, dtype=dt, device=load_on,
                                             dit_dtype=(part_dtypes or {}).get("dit")) if load_decoder else None
        if encoder is not None and decoder is not None:
            out = encoder.projector[-1].out_features
            if out != decoder.joint_attention_dim:
                raise UAEError(f"the projector in {paths.llm} outputs {out} features but the DiT in {paths.dit} "
                               f"expects joint_attention_dim={decoder.joint_attention_dim}: llm/ and dit/ "
                               "come from different models")
        model = cls(encoder, decoder, dev, dt, paths)
        if offload:
            model._offload(dev)
        return model

    def _offload(self, device: torch.device) -> None:
        """accelerate's CPU-offload hooks: the LLM comes to the GPU for a forward and goes back after
        the encoder's work; the pipeline's components (DiT, VAE) are handled by diffusers' model
        CPU offload. The projector and the pooled vector are small and stay on the GPU."""
        from accelerate import cpu_offload_with_hook

        self._llm_hook = None
        if self.encoder is not None:
            self.encoder.projector.to(device)
            self.encoder.llm, self._llm_hook = cpu_offload_with_hook(self.encoder.llm, device)
        if self.decoder is not None:
            self.decoder.pooled = self.decoder.pooled.to(device)
            self.decoder.pipe.enable_model_cpu_offload(device=device)

    def _encoder_done(self) -> None:
        if getattr(self, "_llm_hook", None) is not None:
            self._llm_hook.offload()

    def caption(self, images: Sequence, **kwargs) -> list[str]:
        out = self.encoder.caption(images, **kwargs)
        self._encoder_done()
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, height: int = 1024, width: int = 1024,
                 num_inference_steps: int = 40, guidance_scale: float = 5.0,
                 seed: int | Sequence[int] | None = RELEASE_SEED, progress: bool = True,
                 dit_batching: bool = False) -> list:
        """One image per prompt, each exactly the image the release's demo makes from that prompt
        alone: its conditioning is its own [negative, positive] pair (`embed_pair`), its initial
        noise comes from its own generator on the model's device, seeded with `seed` (one seed for
        every image, the release's 42 by default; or one seed per prompt; None: random), and its
        DiT calls are its own. With `dit_batching`, prompts whose conditioning has the same length
        share DiT calls: the same conditioning, but batched kernels round differently, so images
        match one-at-a-time generation only to about one level of 255 on a few pixels."""
        if self.decoder is None:
            raise RuntimeError("this UAE was loaded without its decoder (load_decoder=False)")
        pairs = self.encoder.encode_prompts(list(prompts))
        self._encoder_done()
        return self.generate_from_conditioning(pairs, height=height, width=width,
                                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                               seed=seed, progress=progress, dit_batching=dit_batching)

    @torch.no_grad()
    def generate_from_conditioning(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], *, height: int = 1024,
                                   width: int = 1024, num_inference_steps: int = 40, guidance_scale: float = 5.0,
                                   seed: int | Sequence[int] | None = RELEASE_SEED, progress: bool = True,
                                   dit_batching: bool = False) -> list:
        """`generate` from each prompt's (positive, negative) conditioning (`encoder.embed_pair`),
        e.g. kept after the encoder was freed; the same images."""
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(pairs)
        if len(seeds) != len(pairs):
            raise ValueError(f"{len(seeds)} seeds for {len(pairs)} prompts")
        images: list = [None] * len(pairs)
        groups = group_by_length(pairs) if dit_batching else [([i], pos, neg) for i, (pos, neg) in enumerate(pairs)]
        for idx, pos, neg in groups:
            gens = [torch.Generator(self.device).manual_seed(seeds[i]) if seeds[i] is not None else None for i in idx]
            out = self.decoder.generate(pos, neg if guidance_scale > 1 else None, height=height, width=width,
                                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                        generator=None if None in gens else gens, progress=progress)
            for i, im in zip(idx, out):
                images[i] = im
        return images

    def reconstruct(self, images: Sequence, *, caption_kwargs: dict | None = None, **generate_kwargs):
        """image -> caption -> image. Returns (captions, reconstructions)."""
        captions = self.caption(images, **(caption_kwargs or {}))
        return captions, self.generate(captions, **generate_kwargs)
