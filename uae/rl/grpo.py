"""GRPO mechanics shared by every RL stage: group-relative advantages, the PPO-clip loss with a
KL term, and their statistics (DeepSeekMath GRPO, arXiv 2402.03300; Flow-GRPO, arXiv 2505.05470)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uae.config import field
from uae.errors import UAEError
from uae.scoring.scorers import SCORERS
from uae.training.run import TrainConfig


@dataclass
class Advantages:
    values: torch.Tensor          # (N,) advantages (0 for samples of zero-variance groups)
    keep: torch.Tensor            # (N,) bool: False for samples of zero-variance groups (no signal)
    skipped_groups: int
    groups: int


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group",
                     unbiased: bool = False, eps: float = 1e-4, clip: float | None = 5.0) -> Advantages:
    """A = (r - mean of the sample's group) / (std + eps), the std that of the sample's group
    (`scale` "group"), of the whole batch ("batch") or none (no division: Dr. GRPO); then clipped
    to [-clip, clip] (None or 0: not clipped). `unbiased`: the std with Bessel's correction, as
    TRL's `nanstd`; without, as Flow-GRPO's `np.std`. A group whose rewards are all equal carries
    no signal: its advantages are exactly 0 (not the float noise of r - mean) and it is marked
    not kept (Flow-GRPO drops such samples from training; TRL keeps their tokens)."""
    rewards = rewards.float()
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    g = len(uniq)
    count = torch.zeros(g, device=rewards.device).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros(g, device=rewards.device).index_add_(0, inv, rewards) / count
    centred = rewards - mean[inv]
    sq = torch.zeros(g, device=rewards.device).index_add_(0, inv, centred ** 2)
    group_std = (sq / ((count - 1).clamp(min=1) if unbiased else count)).sqrt()
    if scale == "group":
        adv = centred / (group_std[inv] + eps)
    elif scale == "batch":
        adv = centred / (rewards.std(unbiased=unbiased) + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale {scale!r}: use group, batch or none")
    if clip:
        adv = adv.clamp(-clip, clip)
    zero = group_std <= 1e-12
    adv = adv.masked_fill(zero[inv], 0.0)
    return Advantages(adv, ~zero[inv], int(zero.sum()), g)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip per element: (max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho), rho = exp(log p_theta
    - log p_old). (TRL writes it -min(A rho, A clip(rho)): the same.)"""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


@torch.no_grad()
def ratio_stats(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float,
                kl: torch.Tensor | None = None) -> dict[str, float]:
    """Ratio, clip-fraction, approximate-KL (Flow-GRPO's 0.5 (log ratio)^2) and KL statistics over
    the given (already selected) elements; NaN when there are none."""
    names = ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "approx_kl", "kl")
    if not log_prob.numel():
        return {k: float("nan") for k in names}
    d = log_prob - old_log_prob
    ratio = torch.exp(d)
    return {"ratio_mean": ratio.mean().item(), "ratio_min": ratio.min().item(), "ratio_max": ratio.max().item(),
            "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
            "approx_kl": (0.5 * d ** 2).mean().item(), "kl": kl.mean().item() if kl is not None else 0.0}


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                  kl: torch.Tensor | None = None, beta: float = 0.0, keep: torch.Tensor | None = None,
                  normalizer: float | None = None):
    """sum over kept samples of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + beta * KL, divided by
    `normalizer` (default: the number of kept samples), rho = exp(log p_theta - log p_old).
    Returns (loss, stats). With nothing to train on (no sample, or none kept) the loss is a zero
    that still depends on `log_prob`, so every process of a distributed run takes part in the
    gradient all-reduce; its statistics are then NaN, never an error."""
    per, _ = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)
    if kl is not None and beta:
        per = per + beta * kl
    w = keep.float() if keep is not None else torch.ones_like(per)
    loss = (per * w).sum() / (normalizer if normalizer is not None else w.sum().clamp(min=1))
    if per.numel() == 0:
        loss = log_prob.sum() * 0.0
    return loss, ratio_stats(log_prob, old_log_prob, clip_range, kl)


LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")


def token_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *, accumulation_steps: int,
               tokens_in_batch: float, num_processes: int, max_completion_length: int) -> torch.Tensor:
    """One micro-batch's share of the loss from per-token losses (B, T) and the loss mask (B, T), as
    TRL's GRPOTrainer aggregates them (`_compute_loss`), for an optimizer step that accumulates
    `accumulation_steps` micro-batches on each of `num_processes` data-parallel processes (whose
    gradients DDP averages):

    - dapo: sum(loss * mask) / (tokens_in_batch / num_processes), tokens_in_batch the mask's
      total over every micro-batch of the step on all processes: the mean over all tokens;
    - bnpo: sum(loss * mask) / sum(mask) of this micro-batch, / accumulation_steps;
    - grpo: mean over sequences of sum_t(loss * mask) / sum_t(mask), / accumulation_steps;
    - dr_grpo: sum(loss * mask) / (B * max_completion_length), / accumulation_steps."""
    mask = mask.float()
    total = (per_token * mask).sum()
    if loss_type == "dapo":
        return total / (max(float(tokens_in_batch), 1.0) / num_processes)
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0) / accumulation_steps
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_completion_length) / accumulation_steps
    raise ValueError(f"loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")


def flow_kl(mean: torch.Tensor, ref_mean: torch.Tensor, noise_scale: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL between the policy's and the reference's Gaussian steps, per sample:
    mean_D (mu_theta - mu_ref)^2 / (2 s^2), with s its `std_dev_t` (`Step.noise_scale`: the noise
    scale a sqrt(sigma / (1 - sigma)) of the SDE step, not the step's std s sqrt(-d); dividing by
    the step's variance would make the penalty 1/|d| times stronger, 4-25x at 10 steps, and
    published beta values would not carry over)."""
    dims = tuple(range(1, mean.ndim))
    return ((mean - ref_mean) ** 2).mean(dim=dims) / (2 * noise_scale.reshape(-1).clamp(min=1e-12) ** 2)


# ---------------------------------------------------------------------------- the RL stages' settings
@dataclass
class GRPOConfig(TrainConfig):
    """What the three Unified-GRPO stages share."""

    stage: str = field("u4g", help="cold_start: stage 1 (the reconstruction loss through the decoder's sampling into the "
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
        for spec in self.reward_funcs:
            name = spec[5:] if spec.startswith("text:") else spec
            if ":" not in name and name not in SCORERS:
                raise UAEError(f"--reward_funcs: reward {spec!r} is neither a scorer ({', '.join(SCORERS)}), "
                               "text:<scorer> nor module:callable")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise UAEError(f"--reward_weights has {len(self.reward_weights)} weight(s) for {len(self.reward_funcs)} "
                           "reward function(s) (--reward_funcs): give one each, or none for 1.0 each")



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
    use_bias_correction_kl: bool = field(False, help="multiply the per-token k3 KL by the importance ratio (kept "
                                                     "differentiable), as TRL 1.16's default: the unbiased reverse-KL "
                                                     "gradient (DeepSeek-V3.2); changes the gradient only with beta > 0")
    checkpointing_steps: int = field(50, min=0, run_only=True,
                                     help="resumable checkpoint every N iterations (0: only at the end)")

    # Why a stage refuses use_bias_correction_kl (None: it applies it, through uae.rl.kl.k3_kl).
    bias_correction_kl_refused = "this stage does not apply it yet"

    def __post_init__(self):
        super().__post_init__()
        if self.use_bias_correction_kl and self.bias_correction_kl_refused:
            raise UAEError(f"--use_bias_correction_kl: stage {self.stage}: {self.bias_correction_kl_refused}; "
                           "leave it off")
        if self.gradient_accumulation_steps != 1:
            raise UAEError("--gradient_accumulation_steps must stay 1 for GRPO (it accumulates over samples and steps)")
