"""GRPO mechanics shared by every RL stage: group-relative advantages, the PPO-clip loss with a
KL term, and their statistics (DeepSeekMath GRPO, arXiv 2402.03300; Flow-GRPO, arXiv 2505.05470)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor          # (N,) clipped advantages
    keep: torch.Tensor            # (N,) bool: False for samples of zero-variance groups (no signal)
    skipped_groups: int
    groups: int


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, std_scope: str = "group",
                     eps: float = 1e-4, clip: float = 5.0, skip_zero_variance: bool = True) -> Advantages:
    """A = clip((r - mean of the sample's group) / (std + eps), -clip, clip); std per group or
    over the whole batch. Groups whose rewards are all equal carry no signal: marked not kept."""
    rewards = rewards.float()
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    g = len(uniq)
    count = torch.zeros(g, device=rewards.device).index_add_(0, inv, torch.ones_like(rewards))
    mean = torch.zeros(g, device=rewards.device).index_add_(0, inv, rewards) / count
    centred = rewards - mean[inv]
    var = torch.zeros(g, device=rewards.device).index_add_(0, inv, centred ** 2) / count
    group_std = var.sqrt()
    if std_scope == "group":
        std = group_std[inv]
    elif std_scope == "batch":
        std = rewards.std(unbiased=False).expand_as(rewards)
    else:
        raise ValueError(f"std_scope {std_scope!r}: use group or batch")
    adv = (centred / (std + eps)).clamp(-clip, clip)
    zero = group_std <= 1e-12
    keep = ~zero[inv] if skip_zero_variance else torch.ones_like(rewards, dtype=torch.bool)
    return Advantages(adv, keep, int(zero.sum()) if skip_zero_variance else 0, g)


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                  kl: torch.Tensor | None = None, beta: float = 0.0, keep: torch.Tensor | None = None,
                  normalizer: float | None = None):
    """sum over kept samples of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + beta * KL, divided by
    `normalizer` (default: the number of kept samples), rho = exp(log p_theta - log p_old).
    Returns (loss, stats). With nothing to train on (no sample, or none kept) the loss is a zero
    that still depends on `log_prob`, so every process of a distributed run takes part in the
    gradient all-reduce; its statistics are then NaN, never an error."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    per = torch.maximum(unclipped, clipped)
    if kl is not None and beta:
        per = per + beta * kl
    w = keep.float() if keep is not None else torch.ones_like(per)
    loss = (per * w).sum() / (normalizer if normalizer is not None else w.sum().clamp(min=1))
    if per.numel() == 0:
        loss = log_prob.sum() * 0.0
    with torch.no_grad():
        if per.numel():
            d = log_prob - old_log_prob
            stats = {"ratio_mean": ratio.mean().item(), "ratio_min": ratio.min().item(),
                     "ratio_max": ratio.max().item(), "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                     "approx_kl": (0.5 * d ** 2).mean().item(), "kl": kl.mean().item() if kl is not None else 0.0}
        else:
            stats = {k: float("nan") for k in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "approx_kl", "kl")}
    return loss, stats


def flow_kl(mean: torch.Tensor, ref_mean: torch.Tensor, noise_scale: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL between the policy's and the reference's Gaussian steps, per sample:
    mean_D (mu_theta - mu_ref)^2 / (2 s^2), with s its `std_dev_t` (`Step.noise_scale`: the noise
    scale a sqrt(sigma / (1 - sigma)) of the SDE step, not the step's std s sqrt(-d); dividing by
    the step's variance would make the penalty 1/|d| times stronger, 4-25x at 10 steps, and
    published beta values would not carry over)."""
    dims = tuple(range(1, mean.ndim))
    return ((mean - ref_mean) ** 2).mean(dim=dims) / (2 * noise_scale.reshape(-1).clamp(min=1e-12) ** 2)
