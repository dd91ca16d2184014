"""Unified-GRPO. Stage 1, cold start (`--stage cold_start`): the reconstruction loss back-propagated
through the decoder's sampling into the encoder's LoRA, the projector and the decoder's LoRA.
Stage 2, Generation for Understanding (`--stage g4u`): GRPO on the encoder's LoRA, captions as
actions, rewarded by how well the frozen decoder reconstructs the image from them. Stage 3,
Understanding for Generation (`--stage u4g`): Flow-GRPO on the decoder's LoRA with the
reconstruction reward. `--stages all` runs the three in sequence.

    python train_grpo.py --stage g4u --config configs/grpo/tiny_g4u.yaml --data refs/

    python train_grpo.py --stage u4g --config configs/grpo/tiny.yaml --data refs/        # CPU, tiny
    accelerate launch --multi_gpu --num_processes 8 train_grpo.py --stage u4g --config configs/grpo/u4g.yaml \
        --checkpoint zhiyuanyan1/UAE --data /data/images
    python train_grpo.py --stage u4g --config configs/grpo/tiny.yaml --data refs/ --resume_from_checkpoint latest
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from uae.cli import script_main, setup_logging
from uae.config import field, parse_config
from uae.errors import UAEError

logger = logging.getLogger("uae.grpo")

STAGES = ("cold_start", "g4u", "u4g")


@dataclass
class GRPOConfig:
    """Unified-GRPO training (defaults: Flow-GRPO's published SD3.5 values, DESIGN.md)."""

    stage: str = field("u4g", help="cold_start: stage 1 (reconstruction loss through the DiT's sampling into the "
                                    "encoder LoRA, the projector and the decoder LoRA); g4u: stage 2, the encoder's LoRA learns to caption for "
                                    "reconstruction; u4g: stage 3, the decoder's LoRA learns from the reconstruction reward")
    stages: str | None = field(None, help="'all': cold_start, then g4u, then u4g, each starting from the previous "
                                          "stage's final/ (in <output_dir>/<stage>/); overrides --stage")
    cold_start_max_steps: int = field(200, help="cold_start: optimizer steps")
    cold_start_batch_size: int = field(1, help="cold_start: images per step and process")
    cold_start_learning_rate: float = field(1e-4, help="cold_start: AdamW learning rate (LoRA + projector)")
    cold_start_fixed_noise: bool = field(False, help="cold_start: the same initial noise for an image at every step "
                                                     "(a deterministic loss, for debugging and overfitting checks)")
    cold_start_gradient: str = field("full", help="cold_start: full (exact, through every sampling step), truncated "
                                                  "(only the last truncate_steps), x0 (one-step x0 estimate at a random step)")
    truncate_steps: int = field(1, help="cold_start with --cold_start_gradient truncated: gradients flow through the "
                                        "last N sampling steps only")
    cold_start_checkpointing: bool = field(True, help="cold_start: checkpoint each sampling step (memory of about one "
                                                      "step's activations, one more forward per step)")
    cold_start_train_decoder: bool = field(True, help="cold_start: train the decoder's LoRA too (the checkpoint's "
                                                      "dit_lora, or a new one), at its own learning rate")
    cold_start_decoder_learning_rate: float = field(1e-5, help="cold_start: AdamW learning rate of the decoder's LoRA")
    cold_start_conditioning: str = field("caption_tokens", help="cold_start: caption_tokens (states at the caption's "
                                                               "tokens after instruction + image), all_tokens, or "
                                                               "generate_template (as at inference)")
    use_data_captions: bool = field(False, help="u4g: use the captions that come with the data instead of the "
                                                "encoder's")
    data: str = field(None, help="reference images: a folder (captions from the encoder), a folder with .txt "
                                 "captions, a .jsonl of {image, caption}, a datasets folder or webdataset shards")
    checkpoint: str = field("tiny", help="starting UAE checkpoint: folder in the official layout, hub id, or tiny")
    output_dir: str = field("runs/grpo", help="checkpoints, metrics.jsonl, grids/, curves.png and final/")
    resolution: int = field(512, help="rollout resolution (square)")
    num_steps: int = field(10, help="sampling steps per rollout")
    sde_window_mode: str = field("fixed", help="u4g: fixed (--sde_window), random (a window of --sde_window_size "
                                               "steps drawn anew each iteration within --sde_window_range: "
                                               "Flow-GRPO-Fast) or sliding (moves by --sde_window_shift every "
                                               "--sde_window_shift_every iterations: MixGRPO)")
    sde_window: list[int] | None = field(None, help="fixed mode: two ints [lo, hi), SDE (and training) only on steps "
                                                    "lo..hi-1, ODE elsewhere; default: all steps but the last (Flow-GRPO)")
    sde_window_size: int = field(3, help="random / sliding mode: SDE steps per window (Flow-GRPO-Fast: 3)")
    sde_window_range: list[int] | None = field(None, help="random / sliding mode: [lo, hi) the window stays in; "
                                                          "default the first half of the schedule")
    sde_window_shift_every: int = field(25, help="sliding mode: iterations between moves (MixGRPO: 25)")
    sde_window_shift: int = field(1, help="sliding mode: steps per move (MixGRPO: 1)")
    sde_kind: str = field("sde", help="sde (Flow-GRPO) or cps (coefficients-preserving)")
    noise_level: float = field(0.7, help="SDE noise level a (0.8 is usual for cps)")
    guidance_scale: float = field(4.5, help="CFG during rollouts and training (both branches in one batch)")
    group_size: int = field(24, help="rollouts per prompt (G)")
    prompts_per_iteration: int = field(2, help="prompts per iteration over all processes")
    sample_batch_size: int = field(8, help="rollouts sampled (and trained) together; rewards of a chunk overlap "
                                           "the sampling of the next")
    train_batch_size: int | None = field(None, help="u4g: samples per training forward (default sample_batch_size)")
    updates_per_iteration: int = field(1, help="u4g: optimizer steps per batch of rollouts, each on a share shuffled "
                                               "across groups (Flow-GRPO: 2, so that the clip range acts)")
    inner_epochs: int = field(1, help="passes over each iteration's rollouts")
    clip_range: float = field(1e-4, help="PPO clip range (tiny: the log-prob is a mean over latent dims)")
    beta: float = field(0.04, help="KL weight to the reference policy")
    kl_reference: str = field("start", help="the KL's reference: start (the LoRA as the stage began; a fresh LoRA "
                                            "starts at the base model, as in Flow-GRPO) or base (the model without LoRA)")
    adv_std_scope: str = field("group", help="advantage normalisation: group (std per prompt, TRL) or batch (std over "
                                             "the whole batch, Flow-GRPO's SD3.5 configs)")
    adv_clip: float = field(5.0, help="advantages are clipped to [-adv_clip, adv_clip]")
    reward_weights: list[str] = field(["clip=1.0"], help="scorer=weight pairs of the reconstruction reward")
    text_reward_weight: float = field(0.0, help="weight of caption faithfulness (text scorer) in the reward")
    text_scorer: str = field("longclip", help="clip or longclip, for text_reward_weight")
    scorer_weights: str = field("auto", help="auto (tiny for the tiny model, else official), official, tiny")
    max_new_tokens: int = field(512, help="caption length limit (stage 3 prompts; stage 2 actions)")
    temperature: float = field(0.7, help="caption sampling temperature (stage 2 log-probs use the same)")
    frozen_embedding: bool = field(False, help="g4u: condition the decoder through the LoRA-free LLM instead of the "
                                               "current encoder weights")
    g4u_decoder_noise: str = field("group", help="g4u: the decoder's initial noise is shared by a group's captions "
                                                 "(group) or drawn per caption (sample)")
    fresh_dit_lora: bool = field(False, help="u4g: train a new DiT LoRA instead of the checkpoint's dit_lora")
    lora_rank: int = field(32, help="DiT LoRA rank")
    lora_alpha: float = field(64.0, help="DiT LoRA alpha")
    lora_target_modules: list[str] = field(["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                            "to_add_out"], help="DiT modules the LoRA wraps")
    learning_rate: float = field(3e-4, help="AdamW learning rate")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    adam_beta1: float = field(0.9, help="AdamW beta1")
    adam_beta2: float = field(0.999, help="AdamW beta2")
    max_grad_norm: float = field(1.0, help="gradient clipping (0: off)")
    use_ema: bool = field(False, help="EMA of the LoRA weights; the output uses it")
    ema_decay: float = field(0.9, help="EMA decay")
    ema_every: int = field(8, help="EMA update every N optimizer steps (its warm-up counts optimizer steps too)")
    max_iterations: int = field(300, help="GRPO iterations (one optimizer step each, times inner_epochs)")
    gradient_checkpointing: bool = field(False, help="recompute DiT activations in backward")
    mixed_precision: str = field("no", help="no, bf16, fp16 (accelerate)")
    gradient_accumulation_steps: int = field(1, help="kept at 1: GRPO accumulates over timesteps itself")
    checkpointing_steps: int = field(50, help="resumable checkpoint every N iterations (0: only at the end)")
    checkpoints_total_limit: int | None = field(None, help="keep at most this many checkpoints")
    resume_from_checkpoint: str | None = field(None, help="'latest' or a checkpoint folder")
    image_log_steps: int = field(10, help="save a reference | group grid every N iterations (0: never)")
    link_unchanged: bool = field(True, help="final/: symlink unchanged parts instead of copying")
    report_to: str = field("tensorboard", help="accelerate trackers: tensorboard, wandb, none")
    seed: int = field(0, help="prompt choice, initial noise and SDE noise are functions of (seed, iteration)")
    device: str = field("auto", help="auto or cpu")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING")

    def __post_init__(self):
        if self.stage not in STAGES:
            raise UAEError(f"--stage {self.stage}: available stages are {', '.join(STAGES)}")
        if self.stages not in (None, "all"):
            raise UAEError(f"--stages {self.stages}: the only value is all (cold_start, g4u, u4g in sequence)")
        if not 1 <= self.truncate_steps <= self.num_steps:
            raise UAEError(f"--truncate_steps {self.truncate_steps} must be in [1, num_steps={self.num_steps}]")
        for name, allowed in (("cold_start_gradient", ("full", "truncated", "x0")),
                              ("cold_start_conditioning", ("caption_tokens", "all_tokens", "generate_template")),
                              ("sde_window_mode", ("fixed", "random", "sliding")), ("kl_reference", ("start", "base")),
                              ("g4u_decoder_noise", ("group", "sample"))):
            if getattr(self, name) not in allowed:
                raise UAEError(f"--{name} {getattr(self, name)}: use one of {', '.join(allowed)}")
        if self.sde_window_mode != "fixed":
            lo, hi = self.sde_window_range or (0, self.num_steps // 2)
            if not (0 <= lo < hi <= self.num_steps and 1 <= self.sde_window_size <= hi - lo):
                raise UAEError(f"--sde_window_range {[lo, hi]} / --sde_window_size {self.sde_window_size}: need "
                               f"0 <= lo < hi <= num_steps ({self.num_steps}) and 1 <= size <= hi - lo")
            if self.sde_window_shift_every < 1 or self.sde_window_shift < 1:
                raise UAEError("--sde_window_shift_every and --sde_window_shift must be at least 1")
        if not self.data:
            raise UAEError("--data is required (reference images)")
        if self.sde_kind not in ("sde", "cps"):
            raise UAEError(f"--sde_kind {self.sde_kind}: use sde or cps")
        if self.sde_window is not None and (len(self.sde_window) != 2 or not 0 <= self.sde_window[0] < self.sde_window[1] <= self.num_steps):
            raise UAEError(f"--sde_window {self.sde_window}: give lo hi with 0 <= lo < hi <= num_steps ({self.num_steps})")
        if self.adv_std_scope not in ("group", "batch"):
            raise UAEError(f"--adv_std_scope {self.adv_std_scope}: use group or batch")
        for name in ("resolution", "num_steps", "group_size", "prompts_per_iteration", "sample_batch_size",
                     "inner_epochs", "max_iterations", "updates_per_iteration", "ema_every"):
            if getattr(self, name) < 1:
                raise UAEError(f"--{name} must be at least 1")
        if self.group_size < 2:
            raise UAEError("--group_size must be at least 2 (advantages are relative to the group)")
        if self.resolution % 16:
            raise UAEError(f"--resolution {self.resolution} must be a multiple of 16")
        for pair in self.reward_weights:
            name, _, w = pair.partition("=")
            try:
                float(w)
            except ValueError:
                raise UAEError(f"--reward_weights {pair!r}: use scorer=weight, e.g. clip=1.0 dinov2=0.5") from None
        if self.gradient_accumulation_steps != 1:
            raise UAEError("--gradient_accumulation_steps must stay 1 for GRPO (it accumulates over timesteps)")


def run_stage(cfg: GRPOConfig, reward=None):
    from uae.rl.cold_start import ColdStartRecipe
    from uae.rl.g4u import G4URecipe
    from uae.rl.u4g import U4GRecipe
    from uae.training.run import Run

    run = Run(cfg, f"uae_grpo_{cfg.stage}")
    if cfg.stage == "cold_start":
        return run.train(ColdStartRecipe(run), cfg.cold_start_max_steps, "cold start")
    recipe = {"g4u": G4URecipe, "u4g": U4GRecipe}[cfg.stage](run, reward=reward)
    return run.train(recipe, cfg.max_iterations, f"grpo {cfg.stage}")


@script_main
def main(argv=None, reward=None) -> int:
    import dataclasses
    from pathlib import Path

    cfg = parse_config(GRPOConfig, argv, description=__doc__)
    setup_logging(cfg.log_level)
    if cfg.stages != "all":
        run_stage(cfg, reward)
        return 0
    checkpoint = cfg.checkpoint
    for stage in ("cold_start", "g4u", "u4g"):
        logger.info("stage %s from %s", stage, checkpoint)
        sub = dataclasses.replace(cfg, stage=stage, stages=None, checkpoint=checkpoint,
                                  output_dir=str(Path(cfg.output_dir) / stage),
                                  scorer_weights=cfg.scorer_weights if cfg.scorer_weights != "auto" else
                                  ("tiny" if cfg.checkpoint == "tiny" else "official"))
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per stage
        checkpoint = str(run_stage(sub, reward if stage != "cold_start" else None))
    logger.info("all stages done: %s", checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
