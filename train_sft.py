"""Decoder pre-training (SFT) on image + long caption pairs: projector + DiT (full or LoRA),
encoder frozen, SD3 rectified-flow loss. See uae/training/sft.py for the objective.

    python train_sft.py --config configs/sft/tiny.yaml                       # CPU, seconds
    accelerate launch --config_file configs/accelerate/... train_sft.py --config configs/sft/paper.yaml
    python train_sft.py --config configs/sft/tiny.yaml --resume_from_checkpoint latest
    python train_sft.py --data data.jsonl --validate_data                    # only check the data
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from uae.cli import script_main, setup_logging
from uae.config import field, parse_config
from uae.errors import UAEError

logger = logging.getLogger("uae.sft")


@dataclass
class SFTConfig:
    """Decoder pre-training (SFT) on image + long caption pairs."""

    data: str = field(None, help="a .jsonl of {image, caption}, a folder of images with .txt captions, or a "
                                 "`datasets` save_to_disk folder (columns image, caption)")
    checkpoint: str = field("tiny", help="starting UAE checkpoint: folder in the official layout, hub id, or tiny")
    output_dir: str = field("runs/sft", help="checkpoints, logs, validation grids, loss plot and final/ (official layout)")
    validate_data: bool = field(False, help="only check the data, report counts, and exit")
    on_bad_data: str = field("error", help="error: stop when any item is missing / unreadable / caption-less; skip: train without them")
    resolution: int = field(512, help="training size: images are resized and centre-cropped to resolution^2 pixels "
                                      "(a square, or with --bucketing the closest aspect-ratio bucket of that area)")
    bucketing: bool = field(False, help="aspect-ratio buckets instead of square centre crops; a batch holds one bucket")
    bucket_step: int = field(64, help="bucket sides are multiples of this (a multiple of 16)")
    max_aspect_ratio: float = field(2.0, help="most elongated bucket (height/width or width/height)")
    dit_mode: str = field("lora", help="lora (train a new DiT LoRA) or full (fine-tune every DiT weight)")
    lora_rank: int = field(32, help="DiT LoRA rank")
    lora_alpha: float = field(64.0, help="DiT LoRA alpha")
    lora_target_modules: list[str] = field(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                            "to_add_out"], help="DiT modules the LoRA wraps")
    cache_latents: bool = field(False, help="precompute each image's VAE posterior once (on disk); steps sample from it")
    cache_text: bool = field(False, help="precompute the frozen LLM's hidden states of each caption once (on disk); "
                                         "needs --text_padding max_length")
    cache_dir: str | None = field(None, help="cache folder (default: <output_dir>/cache); entries are keyed by content "
                                            "and by a fingerprint of the model and settings")
    text_padding: str = field("longest", help="longest (pad captions to the longest of the batch, as at inference) or "
                                              "max_length (to --max_caption_tokens, batch-independent)")
    max_caption_tokens: int = field(512, help="with text_padding max_length: tokens per templated caption (longer "
                                              "captions are an error, never cut)")
    train_projector: bool = field(True, help="train the projector (LLM hidden states -> DiT conditioning)")
    caption_dropout: float = field(0.1, help="probability of replacing a caption with the empty prompt (for CFG)")
    weighting_scheme: str = field("logit_normal", help="timestep density / loss weighting: logit_normal, mode, uniform, sigma_sqrt, cosmap")
    logit_mean: float = field(0.0, help="logit_normal mean")
    logit_std: float = field(1.0, help="logit_normal std")
    mode_scale: float = field(1.29, help="scale of the mode weighting scheme")
    latent_sampling: str = field("sample", help="VAE latents: sample (from the posterior, as diffusers' SD3 scripts) or mode")
    train_batch_size: int = field(1, help="batch size per process")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    max_train_steps: int = field(1000, help="optimizer steps")
    learning_rate: float = field(1e-4, help="AdamW learning rate")
    lr_scheduler: str = field("constant_with_warmup", help="diffusers scheduler name: constant, constant_with_warmup, linear, cosine")
    lr_warmup_steps: int = field(0, help="warm-up steps")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.999, help="AdamW beta2")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    adam_epsilon: float = field(1e-8, help="AdamW epsilon")
    max_grad_norm: float = field(1.0, help="gradient clipping (0: off)")
    use_ema: bool = field(False, help="keep an EMA of the trained weights; the output uses it")
    ema_decay: float = field(0.999, help="EMA decay")
    mixed_precision: str = field("no", help="no, bf16, fp16 (accelerate)")
    gradient_checkpointing: bool = field(False, help="recompute DiT activations in the backward pass to save memory")
    checkpointing_steps: int = field(500, help="save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int | None = field(None, help="keep at most this many checkpoints")
    resume_from_checkpoint: str | None = field(None, help="'latest' or a checkpoint folder")
    validation_prompts: list[str] = field(["a red cube on a wooden table", "a cat sitting on a window sill"],
                                          help="fixed prompts rendered every validation_steps (seeded)")
    validation_steps: int = field(250, help="render validation images every N steps (0: never)")
    validation_inference_steps: int = field(28, help="denoising steps of validation images")
    validation_guidance_scale: float = field(5.0, help="CFG of validation images")
    link_unchanged: bool = field(True, help="final/: symlink the unchanged parts (SD3, llm weights, ...) instead of copying")
    dataloader_num_workers: int = field(0, help="DataLoader workers")
    report_to: str = field("tensorboard", help="accelerate trackers, comma-separated: tensorboard, wandb, none")
    seed: int = field(0, help="seed: data order, noise and timesteps are functions of (seed, step)")
    device: str = field("auto", help="auto or cpu (force CPU); GPUs are chosen by accelerate launch")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING")

    def __post_init__(self):
        if not self.data:
            raise UAEError("--data is required (a .jsonl, a folder of images with .txt captions, or a datasets folder)")
        if self.on_bad_data not in ("error", "skip"):
            raise UAEError(f"--on_bad_data {self.on_bad_data}: use error or skip")
        if self.dit_mode not in ("lora", "full"):
            raise UAEError(f"--dit_mode {self.dit_mode}: use lora or full")
        if self.weighting_scheme not in ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"):
            raise UAEError(f"--weighting_scheme {self.weighting_scheme}: use logit_normal, mode, uniform, sigma_sqrt, cosmap or none")
        if self.text_padding not in ("longest", "max_length"):
            raise UAEError(f"--text_padding {self.text_padding}: use longest or max_length")
        if self.cache_text and self.text_padding != "max_length":
            raise UAEError("--cache_text needs --text_padding max_length (a cached caption's states must not depend "
                           "on the other captions of its batch)")
        if self.latent_sampling not in ("sample", "mode"):
            raise UAEError(f"--latent_sampling {self.latent_sampling}: use sample or mode")
        if not 0 <= self.caption_dropout <= 1:
            raise UAEError("--caption_dropout must be in [0, 1]")
        for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            if getattr(self, name) < 1:
                raise UAEError(f"--{name} must be at least 1")
        if self.bucket_step % 16 or self.bucket_step < 16:
            raise UAEError(f"--bucket_step {self.bucket_step} must be a positive multiple of 16")
        if self.max_aspect_ratio < 1:
            raise UAEError(f"--max_aspect_ratio must be >= 1 (got {self.max_aspect_ratio})")
        if self.resolution % 16:
            raise UAEError(f"--resolution {self.resolution} must be a multiple of 16")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UAEError(f"--mixed_precision {self.mixed_precision}: use no, bf16 or fp16")


@script_main
def main(argv=None) -> int:
    cfg = parse_config(SFTConfig, argv, description=__doc__)
    setup_logging(cfg.log_level)
    if cfg.validate_data:
        from uae.data import read_items, validate

        v = validate(read_items(cfg.data))
        logger.info("data %s: %s", cfg.data, v.report())
        return 1 if v.bad else 0
    from uae.training.run import Run
    from uae.training.sft import SFTRecipe

    run = Run(cfg, "uae_sft")
    run.train(SFTRecipe(run), cfg.max_train_steps, "sft")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
