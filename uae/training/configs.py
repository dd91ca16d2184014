"""The training configs, shaped like TRL's: one typed dataclass per trainer on a base that holds what
every trainer shares. Each dataclass is the CLI of its script and is readable from YAML; fields
declare their choices and bounds (uae.dataclass_cli.field), checks across fields live in __post_init__.

    TrainConfig                   the run: data, checkpoint, optimisation, precision, checkpoints, logging
    ├── SFTConfig                 decoder pre-training (train_sft.py)
    └── GRPOConfig                what the three Unified-GRPO stages share (train_grpo.py)
        ├── ColdStartConfig       stage 1 (--stage cold_start)
        └── GroupConfig           groups, advantages, PPO-clip and KL of the two RL stages
            ├── G4UConfig         stage 2 (--stage g4u)
            └── U4GConfig         stage 3 (--stage u4g)

Stage defaults are the published values: Flow-GRPO's SD3.5 configs (config/grpo.py, scripts/train_sd3.py)
for stage 3, TRL's GRPOConfig for stage 2, the release's training code for stage 1; docs/unified-grpo.md's
"Defaults and the published values" lists each and every deviation.
"""

from __future__ import annotations

from dataclasses import dataclass

from uae.dataclass_cli import check_fields, field
from uae.errors import UAEError
from uae.rl.grpo import LOSS_TYPES

DIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
STAGES = ("cold_start", "g4u", "u4g")


@dataclass
class TrainConfig:
    """What every trainer shares."""

    data: str = field(None, help="training data (see the script's page in docs/ for the accepted sources)")
    checkpoint: str = field("tiny", help="starting UAE checkpoint: folder in the official layout, hub id, or tiny")
    output_dir: str = field("runs/train", run_only=True,
                            help="checkpoints, metrics.jsonl, plots, grids and final/ (official layout)")
    resolution: int = field(512, min=16, help="training / rollout size in pixels (a multiple of 16)")
    max_steps: int = field(1000, min=1, aliases=["--max_train_steps", "--max_iterations"],
                           help="optimizer steps (SFT, cold start) or iterations (GRPO stages)", run_only=True)
    learning_rate: float = field(1e-4, min=0, help="AdamW learning rate")
    adam_beta1: float = field(0.9, min=0, max=1, help="AdamW beta1")
    adam_beta2: float = field(0.999, min=0, max=1, help="AdamW beta2")
    adam_epsilon: float = field(1e-8, min=0, help="AdamW epsilon")
    weight_decay: float = field(1e-4, min=0, help="AdamW weight decay")
    optimizer: str = field("adamw", choices=("adamw", "adamw8bit"),
                           help="adamw (torch), or adamw8bit (torchao's 8-bit AdamW: a quarter of the state; "
                                "pip install torchao)")
    max_grad_norm: float = field(1.0, min=0, help="gradient clipping (0: off)")
    lora_rank: int = field(32, min=1, help="rank of a new DiT LoRA")
    lora_alpha: float = field(64.0, min=0, help="alpha of a new DiT LoRA")
    lora_target_modules: list[str] = field(DIT_LORA_TARGETS, help="DiT modules a new LoRA wraps")
    use_ema: bool = field(False, help="keep an EMA of the trained weights; final/ uses it")
    ema_decay: float = field(0.999, min=0, max=1, help="EMA decay (warm-up min((1+s)/(10+s), decay), s = optimizer steps)")
    ema_every: int = field(1, min=1, help="EMA update every N optimizer steps")
    ema_device: str = field("same", choices=("same", "cpu"), run_only=True,
                            help="where the EMA weights live (cpu: none on the GPU)")
    mixed_precision: str = field("no", choices=("no", "bf16", "fp16"),
                                 help="no, bf16 or fp16: frozen weights in that dtype, trained weights and optimizer "
                                      "state in fp32, forward passes under autocast")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass, in every model "
                                                     "that trains (DiT, LLM)", run_only=True)
    gradient_accumulation_steps: int = field(1, min=1, help="micro-batches per optimizer step")
    checkpointing_steps: int = field(500, min=0, run_only=True,
                                     help="resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int | None = field(None, min=1, help="keep at most this many checkpoints", run_only=True)
    resume_from_checkpoint: str | None = field(None, help="'latest' or a checkpoint folder", run_only=True)
    overwrite_output_dir: bool = field(False, run_only=True,
                                       help="a fresh run into an --output_dir that holds a run deletes that run's "
                                            "files (all but cache/) first; without it, that is an error")
    cache_dir: str | None = field(None, run_only=True,
                                  help="cache of precomputed frozen-model outputs (default <output_dir>/cache)")
    link_unchanged: bool = field(True, help="final/: symlink the unchanged parts instead of copying", run_only=True)
    report_to: str = field("tensorboard", run_only=True,
                           help="accelerate trackers, comma-separated: tensorboard, wandb, none")
    seed: int = field(0, help="seed: data order, noise and sampling are functions of (seed, step)")
    device: str = field("auto", choices=("auto", "cpu"), run_only=True,
                        help="auto or cpu (force CPU); GPUs are chosen by accelerate launch")
    log_level: str = field("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level", run_only=True)
    scorer_weights: str = field("auto", choices=("auto", "official", "tiny"),
                                help="weights of the scorers (rewards, held-out evaluation): auto (tiny for the tiny "
                                     "model, else official), official, tiny")
    eval_steps: int = field(0, min=0, run_only=True,
                            help="held-out Unified-Bench every N steps, and at the start and the end (0: never)")
    eval_data: str | None = field(None, help="held-out references: a folder of images, a .jsonl or any --data source "
                                             "(sample: the six sample photos)", run_only=True)
    eval_scorers: list[str] = field(["clip", "longclip", "dinov2", "dinov3"], help="scorers of the held-out evaluation "
                                                                                   "(overall: their mean)",
                                                                                   run_only=True)
    eval_resolution: int | None = field(None, min=16, run_only=True,
                                        help="size of the held-out reconstructions (default --resolution)")
    eval_inference_steps: int = field(40, min=1, run_only=True,
                                      help="denoising steps of the held-out reconstructions (the benchmark's)")
    eval_guidance_scale: float = field(5.0, min=0, run_only=True,
                                       help="CFG of the held-out reconstructions (the benchmark's)")
    eval_max_new_tokens: int = field(512, min=1, run_only=True,
                                     help="caption length limit of the held-out captions (the benchmark's)")

    def __post_init__(self):
        if not self.data:
            raise UAEError("--data is required (see --help for the accepted sources)")
        check_fields(self)
        if self.resolution % 16:
            raise UAEError(f"--resolution {self.resolution} must be a multiple of 16")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise UAEError("--overwrite_output_dir starts a run again and --resume_from_checkpoint continues one: give "
                           "one of them")
        if self.eval_steps and not self.eval_data:
            raise UAEError(f"--eval_steps {self.eval_steps} needs --eval_data (a folder of held-out reference images, a "
                           ".jsonl, or sample for the six sample photos)")
        if self.eval_resolution is not None and self.eval_resolution % 16:
            raise UAEError(f"--eval_resolution {self.eval_resolution} must be a multiple of 16")
        from uae.scoring.scorers import SCORERS

        unknown = [s for s in self.eval_scorers if s not in SCORERS]
        if unknown:
            raise UAEError(f"--eval_scorers {' '.join(unknown)}: choose from {', '.join(SCORERS)}")


@dataclass
class SFTConfig(TrainConfig):
    """Decoder pre-training (SFT) on image + long caption pairs."""

    data: str = field(None, help="a .jsonl of {image, caption}, a folder of images with .txt captions, a `datasets` "
                                 "save_to_disk folder (columns image, caption) or webdataset shards")
    output_dir: str = field("runs/sft", run_only=True,
                            help="checkpoints, logs, validation grids, loss plot and final/ (official layout)")
    validate_data: bool = field(False, help="only check the data, report counts, and exit", run_only=True)
    on_bad_data: str = field("error", choices=("error", "skip"),
                             help="error: stop when any item is missing / unreadable / caption-less; skip: train without them")
    bucketing: bool = field(False, help="aspect-ratio buckets instead of square centre crops; a batch holds one bucket")
    bucket_step: int = field(64, min=16, help="bucket sides are multiples of this (a multiple of 16)")
    max_aspect_ratio: float = field(2.0, min=1, help="most elongated bucket (height/width or width/height)")
    dit_mode: str = field("lora", choices=("lora", "full"), help="lora (train a new DiT LoRA) or full (every DiT weight)")
    cache_latents: bool = field(False, help="precompute each image's VAE posterior once (on disk); steps sample from it")
    cache_text: bool = field(False, help="precompute the frozen LLM's hidden states of each caption once (on disk); "
                                         "needs --text_padding max_length")
    text_padding: str = field("longest", choices=("longest", "max_length"),
                              help="longest (pad captions to the longest of the batch, as at inference) or "
                                   "max_length (to --max_caption_tokens, batch-independent)")
    max_caption_tokens: int = field(512, min=1, help="with text_padding max_length: tokens per templated caption "
                                                     "(longer captions are an error, never cut)")
    train_projector: bool = field(True, help="train the projector (LLM hidden states -> DiT conditioning)")
    caption_dropout: float = field(0.1, min=0, max=1, help="probability of replacing a caption with the empty prompt (for CFG)")
    weighting_scheme: str = field("logit_normal", choices=("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"),
                                  help="timestep density / loss weighting (SD3, diffusers' training utilities)")
    logit_mean: float = field(0.0, help="logit_normal mean")
    logit_std: float = field(1.0, min=0, help="logit_normal std")
    mode_scale: float = field(1.29, help="scale of the mode weighting scheme")
    latent_sampling: str = field("sample", choices=("sample", "mode"),
                                 help="VAE latents: sample (from the posterior, as diffusers' SD3 scripts) or mode")
    train_batch_size: int = field(1, min=1, help="batch size per process")
    lr_scheduler: str = field("constant_with_warmup", choices=("constant", "constant_with_warmup", "linear", "cosine",
                                                               "cosine_with_restarts", "polynomial"),
                              help="diffusers' learning-rate schedule (diffusers.optimization.get_scheduler)")
    lr_warmup_steps: int = field(0, min=0, help="warm-up steps")
    validation_prompts: list[str] = field(["a red cube on a wooden table", "a cat sitting on a window sill"],
                                          help="fixed prompts rendered every validation_steps (seeded)", run_only=True)
    validation_steps: int = field(250, min=0, help="render validation images every N steps (0: never)", run_only=True)
    validation_inference_steps: int = field(28, min=1, help="denoising steps of validation images", run_only=True)
    validation_guidance_scale: float = field(5.0, min=0, help="CFG of validation images", run_only=True)
    dataloader_num_workers: int = field(0, min=0, help="DataLoader workers", run_only=True)

    def __post_init__(self):
        super().__post_init__()
        if self.cache_text and self.text_padding != "max_length":
            raise UAEError("--cache_text needs --text_padding max_length (a cached caption's states must not depend "
                           "on the other captions of its batch)")
        if self.bucket_step % 16:
            raise UAEError(f"--bucket_step {self.bucket_step} must be a positive multiple of 16")


@dataclass
class GRPOConfig(TrainConfig):
    """What the three Unified-GRPO stages share."""

    stage: str = field("u4g", choices=STAGES + ("all",),
                       help="cold_start: stage 1 (the reconstruction loss through the decoder's sampling into the "
                            "encoder's LoRA, the projector and the decoder's LoRA); g4u: stage 2 (GRPO on the "
                            "encoder's LoRA, captions as actions); u4g: stage 3 (Flow-GRPO on the decoder's LoRA); "
                            "all: the three in sequence, each from the previous one's final/ (<output_dir>/<stage>/)")
    data: str = field(None, help="reference images: a folder (captions from the encoder), a folder with .txt "
                                 "captions, a .jsonl of {image, caption}, a datasets folder or webdataset shards")
    output_dir: str = field("runs/grpo", run_only=True,
                            help="checkpoints, metrics.jsonl, grids/, curves.png and final/")
    num_steps: int = field(10, min=1, help="sampling steps per reconstruction / rollout")
    guidance_scale: float = field(5.0, min=0, help="classifier-free guidance of the reconstructions")
    reward_funcs: list[str] = field(["clip"], help="rewards, each a scorer (clip, dinov2, dinov3, longclip: image "
                                                   "similarity to the reference), text:<scorer> (caption vs "
                                                   "reference), or module:callable (a reward of your own)")
    reward_weights: list[float] | None = field(None, help="one weight per reward function (default all 1.0)")
    max_new_tokens: int = field(512, min=1, help="caption length limit (stage 3 prompts; stage 2 actions)")
    temperature: float = field(0.7, min=1e-6, help="caption sampling temperature (stage 2 log-probs use the same)")
    image_log_steps: int = field(10, min=0, run_only=True,
                                 help="save a reference | group grid every N steps (0: never)")
    checkpointing_steps: int = field(50, min=0, run_only=True,
                                     help="resumable checkpoint every N steps (0: only at the end)")

    def __post_init__(self):
        super().__post_init__()
        from uae.scoring.scorers import SCORERS

        for spec in self.reward_funcs:
            name = spec[5:] if spec.startswith("text:") else spec
            if ":" not in name and name not in SCORERS:
                raise UAEError(f"--reward_funcs: reward {spec!r} is neither a scorer ({', '.join(SCORERS)}), "
                               "text:<scorer> nor module:callable")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise UAEError(f"--reward_weights has {len(self.reward_weights)} weight(s) for {len(self.reward_funcs)} "
                           "reward function(s) (--reward_funcs): give one each, or none for 1.0 each")


@dataclass
class ColdStartConfig(GRPOConfig):
    """Unified-GRPO stage 1, cold start (the release's training code: 512 px, 10 steps, CFG 5)."""

    stage: str = field("cold_start", choices=("cold_start",), help="this stage")
    max_steps: int = field(200, min=1, aliases=["--max_train_steps", "--max_iterations"], run_only=True,
                           help="optimizer steps")
    batch_size: int = field(1, min=1, help="images per step and process")
    learning_rate: float = field(1e-4, min=0, help="AdamW learning rate of the encoder's LoRA and the projector")
    decoder_learning_rate: float = field(1e-5, min=0, help="AdamW learning rate of the decoder's LoRA (ours: "
                                                           "\"gently\", the paper gives none)")
    train_decoder: bool = field(True, help="train the decoder's LoRA too (the checkpoint's dit_lora, or a new one)")
    gradient: str = field("full", choices=("full", "truncated", "x0"),
                          help="full (exact, through every sampling step), truncated (only the last "
                               "truncate_steps), x0 (one-step x0 estimate at a random step)")
    truncate_steps: int = field(1, min=1, help="with --gradient truncated: steps that keep gradients (the last N)")
    step_checkpointing: bool = field(True, help="checkpoint each sampling step (about one step's activations in "
                                                "memory, one more forward per step)")
    conditioning: str = field("caption_tokens", choices=("caption_tokens", "all_tokens", "generate_template"),
                              help="caption_tokens (states at the caption's tokens after instruction + image: the "
                                   "release's cold start), all_tokens, or generate_template (as at inference)")
    detach_uncond: bool = field(False, help="the unconditional CFG branch as a constant for the gradient (Flow-GRPO's "
                                            "training forward); the cold start keeps both by default: its loss's exact "
                                            "gradient, which trains the negative prompt's conditioning too")
    fixed_noise: bool = field(False, help="the same initial noise for an image at every step (a deterministic loss, "
                                          "for debugging and overfitting checks)")

    def __post_init__(self):
        super().__post_init__()
        if self.truncate_steps > self.num_steps:
            raise UAEError(f"--truncate_steps {self.truncate_steps} must be at most num_steps ({self.num_steps})")
        if self.gradient_accumulation_steps != 1:
            raise UAEError("--gradient_accumulation_steps: the cold start accumulates over --batch_size itself; keep 1")


@dataclass
class GroupConfig(GRPOConfig):
    """Groups, advantages, PPO-clip and KL: the two RL stages."""

    group_size: int = field(24, min=2, help="rollouts per prompt (G; advantages are relative to the group)")
    prompts_per_iteration: int = field(2, min=1, help="prompts per iteration over all processes, drawn without replacement")
    inner_epochs: int = field(1, min=1, help="passes over each iteration's rollouts")
    clip_range: float = field(1e-4, min=0, help="PPO clip range")
    beta: float = field(0.04, min=0, help="KL weight to the reference policy")
    kl_reference: str = field("start", choices=("start", "base"),
                              help="the KL's reference: start (the LoRA as the stage began; a fresh LoRA starts at the "
                                   "base model) or base (the model without LoRA)")
    scale_rewards: str = field("group", choices=("group", "batch", "none"), aliases=["--adv_std_scope"],
                               help="advantages (r - group mean) divided by the std of the group, of the whole batch, "
                                    "or by nothing (TRL's scale_rewards; Flow-GRPO's global_std is batch)")
    adv_clip: float = field(5.0, min=0, help="advantages are clipped to [-adv_clip, adv_clip] (0: no clipping)")
    checkpointing_steps: int = field(50, min=0, run_only=True,
                                     help="resumable checkpoint every N iterations (0: only at the end)")

    def __post_init__(self):
        super().__post_init__()
        if self.gradient_accumulation_steps != 1:
            raise UAEError("--gradient_accumulation_steps must stay 1 for GRPO (it accumulates over samples and steps)")


@dataclass
class G4UConfig(GroupConfig):
    """Unified-GRPO stage 2, Generation for Understanding. UAE publishes no settings: these are TRL's
    GRPO defaults for VLMs (8 generations, LoRA lr 1e-5, epsilon 0.2, beta 0)."""

    stage: str = field("g4u", choices=("g4u",), help="this stage")
    max_steps: int = field(1000, min=1, aliases=["--max_train_steps", "--max_iterations"], run_only=True,
                           help="GRPO iterations")
    learning_rate: float = field(1e-5, min=0, help="AdamW learning rate of the encoder's LoRA")
    group_size: int = field(8, min=2, help="captions per image (G)")
    prompts_per_iteration: int = field(16, min=1, help="images per iteration over all processes, drawn without replacement")
    clip_range: float = field(0.2, min=0, help="PPO clip range (token level)")
    beta: float = field(0.0, min=0, help="KL (k3, per token) weight to the reference policy")
    train_batch_size: int | None = field(4, min=1, help="captions per log-probability forward (their logits are "
                                                        "captions x tokens x vocabulary: the stage's largest activation)")
    frozen_embedding: bool = field(False, help="condition the decoder through the LoRA-free LLM instead of the "
                                               "current encoder weights")
    decoder_noise: str = field("group", choices=("group", "sample"),
                               help="the decoder's initial noise: one per group (the captions of a group are compared "
                                    "on the same noise) or one per caption")
    model: str = field("uae", choices=("uae", "janus", "pipeline"),
                       help="whose captioner trains: uae (the checkpoint's encoder LoRA; images through its own "
                            "decoder), janus (--checkpoint: Janus / Janus-Pro; a new LoRA on its language model, images "
                            "by its own generation with the LoRA off), pipeline (--captioner: any transformers "
                            "image-text-to-text model, a new LoRA on its language model; --generator: any diffusers "
                            "text-to-image pipeline): the paper's '+ Ours' rows")
    captioner: str | None = field(None, help="--model pipeline: the captioner that trains (hub id, folder or tiny)")
    generator: str | None = field(None, help="--model pipeline: the frozen text-to-image pipeline of the reward (hub "
                                             "id, folder or tiny)")
    captioner_lora_rank: int = field(16, min=1, help="--model janus / pipeline: rank of the new LoRA")
    captioner_lora_alpha: float = field(32.0, min=0, help="--model janus / pipeline: alpha of the new LoRA")
    captioner_lora_targets: str = field(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                        help="--model janus / pipeline: the modules the new LoRA wraps (a regex on module "
                                             "names: the language model's attention and MLP; the vision tower, the "
                                             "aligners and Janus's image head stay frozen; add |lm_head for the output "
                                             "layer)")
    loss_type: str = field("dapo", choices=LOSS_TYPES,
                           help="how token losses are summed into the loss, TRL's normalisers: dapo (over every "
                                "completion token of the iteration, on all processes: TRL's default), bnpo (over the "
                                "tokens of each micro-batch), grpo (each caption's mean, then the mean over captions), "
                                "dr_grpo (over micro-batch size x max_new_tokens)")
    mask_truncated_completions: bool = field(False, help="leave captions cut at max_new_tokens (no end-of-sequence "
                                                         "token) out of the loss (DAPO; TRL's option)")
    adv_clip: float = field(0.0, min=0, help="advantages are clipped to [-adv_clip, adv_clip] (0: no clipping, as TRL)")

    def __post_init__(self):
        super().__post_init__()
        _check_g4u_model(self)


@dataclass
class U4GConfig(GroupConfig):
    """Unified-GRPO stage 3, Understanding for Generation: Flow-GRPO's SD3.5 settings."""

    stage: str = field("u4g", choices=("u4g",), help="this stage")
    max_steps: int = field(300, min=1, aliases=["--max_train_steps", "--max_iterations"], run_only=True,
                           help="GRPO iterations")
    learning_rate: float = field(3e-4, min=0, help="AdamW learning rate of the decoder's LoRA")
    guidance_scale: float = field(4.5, min=0, help="CFG during rollouts and training (both branches in one batch)")
    prompts_per_iteration: int = field(48, min=1, help="prompts per iteration over all processes, drawn without "
                                                       "replacement (Flow-GRPO's SD3.5 configs: 48, whatever the GPU count)")
    scale_rewards: str = field("batch", choices=("group", "batch", "none"), aliases=["--adv_std_scope"],
                               help="advantages (r - group mean) divided by the std of the whole batch (Flow-GRPO's "
                                    "global_std), of the group, or by nothing")
    detach_uncond: bool = field(True, help="the unconditional CFG branch of the training forward is a constant for the "
                                           "gradient (Flow-GRPO); false: the gradient of the guided velocity flows "
                                           "through both branches")
    sample_batch_size: int = field(8, min=1, help="rollouts sampled together; rewards of a chunk overlap the sampling "
                                                  "of the next")
    train_batch_size: int | None = field(None, min=1, help="samples per training forward (default sample_batch_size)")
    updates_per_iteration: int = field(2, min=1, help="optimizer steps per batch of rollouts, each on a share shuffled "
                                                      "across groups (Flow-GRPO: 2, so that the clip range acts)")
    sde_kind: str = field("sde", choices=("sde", "cps"), help="sde (Flow-GRPO) or cps (coefficients-preserving)")
    noise_level: float = field(0.7, min=0, help="SDE noise level a (0.8 is usual for cps)")
    sde_window_mode: str = field("fixed", choices=("fixed", "random", "sliding"),
                                 help="fixed (--sde_window), random (a window of --sde_window_size steps drawn anew each "
                                      "iteration within --sde_window_range: Flow-GRPO-Fast) or sliding (moves by "
                                      "--sde_window_shift every --sde_window_shift_every iterations: MixGRPO)")
    sde_window: list[int] | None = field(None, min=0, help="fixed mode: two ints [lo, hi), SDE (and training) only on "
                                                           "steps lo..hi-1, ODE elsewhere; default: all but the last")
    sde_window_size: int = field(3, min=1, help="random / sliding mode: SDE steps per window (Flow-GRPO-Fast: 3)")
    sde_window_range: list[int] | None = field(None, min=0, help="random / sliding mode: [lo, hi) the window stays in; "
                                                                 "default the first half of the schedule")
    sde_window_shift_every: int = field(25, min=1, help="sliding mode: iterations between moves (MixGRPO: 25)")
    sde_window_shift: int = field(1, min=1, help="sliding mode: steps per move (MixGRPO: 1)")
    fresh_dit_lora: bool = field(False, help="train a new DiT LoRA instead of the checkpoint's dit_lora")
    use_data_captions: bool = field(False, help="use the captions that come with the data instead of the encoder's")
    ema_decay: float = field(0.9, min=0, max=1, help="EMA decay (Flow-GRPO: 0.9)")
    ema_every: int = field(8, min=1, help="EMA update every N optimizer steps (Flow-GRPO: 8)")

    def __post_init__(self):
        super().__post_init__()
        if self.sde_window is not None and (len(self.sde_window) != 2 or
                                            not 0 <= self.sde_window[0] < self.sde_window[1] <= self.num_steps):
            raise UAEError(f"--sde_window {self.sde_window}: give lo hi with 0 <= lo < hi <= num_steps ({self.num_steps})")
        if self.sde_window_mode != "fixed":
            lo, hi = self.sde_window_range or (0, self.num_steps // 2)
            if not (0 <= lo < hi <= self.num_steps and self.sde_window_size <= hi - lo):
                raise UAEError(f"--sde_window_range {[lo, hi]} / --sde_window_size {self.sde_window_size}: need "
                               f"0 <= lo < hi <= num_steps ({self.num_steps}) and size <= hi - lo")
        # CPS's last step has noise scale sigma_next sin(a pi / 2) = 0: its "sample" is its mean, its
        # log-probability carries no signal and Flow-GRPO's KL divides by 2 s^2 = 0.
        if self.sde_kind == "cps":
            if self.sde_window_mode == "fixed":
                hi, setting = (self.sde_window[1] if self.sde_window else self.num_steps - 1), "--sde_window"
            else:
                hi, setting = (self.sde_window_range or (0, self.num_steps // 2))[1], "--sde_window_range"
            if hi >= self.num_steps:
                raise UAEError(f"{setting} reaches the last step ({self.num_steps - 1}), where the cps step has no "
                               f"noise (sigma_next = 0): end the window at {self.num_steps - 1} or earlier, or use "
                               "--sde_kind sde")


def _check_g4u_model(cfg: "G4UConfig") -> None:
    if cfg.model == "pipeline" and not (cfg.captioner and cfg.generator):
        raise UAEError("--model pipeline trains --captioner's LoRA with rewards through --generator: give both")
    if cfg.model != "pipeline" and (cfg.captioner or cfg.generator):
        raise UAEError(f"--captioner / --generator are --model pipeline's; --model {cfg.model} uses --checkpoint")


STAGE_CONFIGS: dict[str, type[GRPOConfig]] = {"cold_start": ColdStartConfig, "g4u": G4UConfig, "u4g": U4GConfig}
