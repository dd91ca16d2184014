"""The settings of captioning and generation that demo.py and the Unified-Bench runner share, as
one config dataclass both inherit (their flags, help and checks in one place); the generation half
alone is uae-gen-bench's."""

from __future__ import annotations

from dataclasses import dataclass

from uae.config import check_fields, field
from uae.errors import UAEError


@dataclass
class GenerationConfig:
    """Text-to-image settings (the release's by default): what every command that generates takes
    (uae-gen-bench takes only these; it captions nothing)."""

    seed: int = field(42, help="seed of every caption and image (the release generates with 42)")
    steps: int = field(40, min=1, help="denoising steps")
    guidance_scale: float = field(5.0, min=0, help="classifier-free guidance scale (<= 1 disables the negative branch)")
    height: int = field(1024, min=1, help="image height in pixels (a multiple of 16 for SD3)")
    width: int = field(1024, min=1, help="image width in pixels (a multiple of 16 for SD3)")
    dit_batching: bool = field(False, help="prompts of a batch whose conditioning has the same length share DiT calls: "
                                           "faster where lengths coincide, but images then match one-at-a-time "
                                           "generation only to about 1/255 on a few pixels (off: exact)")
    device: str = field("auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    dtype: str = field("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    log_level: str = field("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")

    def __post_init__(self):
        check_fields(self)

    def check_sd3_size(self) -> None:
        """UAE's decoder (SD3) makes images whose sides are multiples of 16 (VAE factor 8 x patch 2):
        checked before any model loads."""
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise UAEError(f"--{name} {getattr(self, name)} must be a multiple of 16 (SD3's VAE and patch size)")

    def generate_kwargs(self) -> dict:
        """UAE.generate's arguments; steps or guidance left unset (None) are left out: UAE.generate's
        own defaults, the release's, apply."""
        given = dict(num_inference_steps=self.steps, guidance_scale=self.guidance_scale)
        return dict(height=self.height, width=self.width, dit_batching=self.dit_batching,
                    **{k: v for k, v in given.items() if v is not None})


@dataclass
class InferenceConfig(GenerationConfig):
    """Captioning and text-to-image settings (the release's by default; steps and guidance: each
    model's own unless given)."""

    # Unset by default (uae.unified.RunSettings.model_defaults): UAE keeps the release's 40 steps and
    # guidance 5.0 (UAE.generate's defaults), a diffusers pipeline its __call__'s (FLUX.1-dev guidance
    # 3.5, SD3.5 28 steps, ...), Janus guidance 5.0 (DeepSeek's); each model's settings() say which.
    steps: int | None = field(None, min=1, help="denoising steps (default: the model's own: UAE's release 40, a "
                                                "diffusers pipeline's __call__ default, e.g. 28 for SD3 and FLUX)")
    guidance_scale: float | None = field(None, min=0, help="classifier-free guidance scale (default: the model's own: "
                                                           "UAE's release 5.0, a diffusers pipeline's __call__ "
                                                           "default, e.g. 3.5 for FLUX, 7.0 for SD3; <= 1 disables "
                                                           "UAE's negative branch)")
    increment_seed: bool = field(False, help="item i (of a batch mode or a benchmark, in order) uses seed + i instead "
                                             "of seed, for its caption and its image")
    do_sample: bool = field(True, help="sample each caption (at --temperature, with --top_k / --top_p); false: greedy "
                                       "decoding, the most likely token at every step, the same caption for any seed "
                                       "(temperature, top_k and top_p unused; repetition_penalty still applies, as "
                                       "in transformers' generate)")
    temperature: float = field(0.7, min=0, help="caption sampling temperature (above 0; greedy captions: --do_sample "
                                                "false)")
    max_new_tokens: int = field(512, min=1, help="caption length limit in tokens")
    top_k: int | None = field(None, min=0, help="caption sampling top-k (default: llm/generation_config.json's; 0: off)")
    top_p: float | None = field(None, min=1e-6, max=1, help="caption sampling top-p (default: llm/generation_config.json's)")
    repetition_penalty: float | None = field(None, min=1e-6, help="caption repetition penalty (default: "
                                                                  "llm/generation_config.json's)")
    exif_transpose: bool = field(False, help="rotate input images by their EXIF orientation before captioning (the "
                                             "release does not)")
    caption_batching: bool = field(False, help="caption a batch in one generate() call: faster on a GPU, but a sampled "
                                               "caption then depends on its batch-mates (off: each image alone, seeded)")

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise UAEError(f"--temperature {self.temperature}: sampling needs a temperature above 0; for greedy "
                           "captions use --do_sample false")
        for name in ("top_k", "top_p"):
            if not self.do_sample and getattr(self, name) is not None:
                raise UAEError(f"--{name} {getattr(self, name)} applies to sampling, and --do_sample false decodes "
                               f"greedily: drop --{name} or --do_sample false")
        super().__post_init__()

    def caption_kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, repetition_penalty=self.repetition_penalty, do_sample=self.do_sample,
                    batch=self.caption_batching)

    def seeds(self, indices) -> list[int]:
        """The seed of each item: the release's one seed for all, or its index added (--increment_seed)."""
        return [self.seed + i if self.increment_seed else self.seed for i in indices]
