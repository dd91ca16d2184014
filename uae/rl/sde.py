"""Stochastic sampling steps for flow-matching RL, with per-step Gaussian log-probabilities.

Notation (Flow-GRPO's): sigma is the scheduler sigma (1 = pure noise), d = sigma_next - sigma < 0,
v the velocity predicted by the DiT (after CFG), a the noise level. All maths in float32.

- "sde": Flow-GRPO's SDE step (Liu et al., arXiv 2505.05470, eq. 9-12):
      s = a * sqrt(sigma / (1 - sigma))          (sigma_1 in the denominator where sigma = 1)
      mu = x + [v + s^2 / (2 sigma) * (x + (1 - sigma) v)] * d,   std = s * sqrt(-d)
      log p = mean_D [ -(x' - mu)^2 / (2 std^2) - log std - log sqrt(2 pi) ]
  With a = 0 it is the Euler step x + v d of FlowMatchEulerDiscreteScheduler.
- "cps": coefficients-preserving sampling (newer Flow-GRPO):
      x0 = x - sigma v, x1 = x + (1 - sigma) v, s = sigma_next * sin(a pi / 2)
      mu = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s^2) x1,   std = s
      log p = -mean_D (x' - mu)^2
  Flow-GRPO's convention, kept so that its clip ranges mean the same here: it drops the
  constants (which cancel in a ratio) and also the factor 1/(2 s^2), which does NOT cancel: the
  ratio exp(lp - lp_old) is the Gaussian ratio raised to the power 2 s^2.

`Step.noise_scale` is what Flow-GRPO calls std_dev_t and divides its KL by (2 std_dev_t^2): s
for "sde" (a sqrt(sigma / (1 - sigma)), without the sqrt(-d) of the step's std) and the step's
std for "cps".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Step:
    prev_sample: torch.Tensor   # x_{i+1}
    mean: torch.Tensor          # mu
    std: torch.Tensor           # per-sample std of the step, shape (B, 1, ..., 1)
    log_prob: torch.Tensor      # (B,)
    noise_scale: torch.Tensor   # Flow-GRPO's std_dev_t (see the module docstring), shape (B, 1, ..., 1)


def _bcast(t, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.view(-1, *([1] * (like.ndim - 1)))


def sde_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise_level: float, *, kind: str = "sde",
             sigma_max=None, generator: torch.Generator | list[torch.Generator] | None = None,
             prev_sample: torch.Tensor | None = None) -> Step:
    """One stochastic step from x at `sigma` to `sigma_next`. Draws x' (with `generator`) unless
    `prev_sample` is given, in which case its log-probability under this step is returned (the
    policy-ratio recomputation). A list of generators gives each sample its own noise stream, so
    a sample's noise does not depend on which batch or process it was drawn in. `sigma_max` (the scheduler's second sigma) replaces sigma in
    s's denominator where sigma == 1."""
    v, x = v.float(), x.float()
    sig, nxt = _bcast(sigma, x), _bcast(sigma_next, x)
    dims = tuple(range(1, x.ndim))
    if kind == "sde":
        d = nxt - sig
        denom = 1 - torch.where(sig >= 1, _bcast(sigma_max if sigma_max is not None else nxt, x), sig)
        s = noise_level * torch.sqrt(sig / denom)
        mean = x + (v + s ** 2 / (2 * sig) * (x + (1 - sig) * v)) * d
        std = s * torch.sqrt(-d)
        scale = s
    elif kind == "cps":
        x0, x1 = x - sig * v, x + (1 - sig) * v
        std = nxt * math.sin(noise_level * math.pi / 2)
        mean = (1 - nxt) * x0 + torch.sqrt((nxt ** 2 - std ** 2).clamp(min=0)) * x1
        scale = std
    else:
        raise ValueError(f"unknown SDE kind {kind!r}: use sde or cps")
    if prev_sample is None:
        if isinstance(generator, (list, tuple)):
            eps = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generator])
        else:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        eps = eps.to(x.device)
        prev_sample = mean + std * eps
    prev_sample = prev_sample.float()
    if kind == "sde":
        safe = std.clamp(min=1e-12)
        lp = -((prev_sample - mean) ** 2) / (2 * safe ** 2) - torch.log(safe) - math.log(math.sqrt(2 * math.pi))
        log_prob = lp.mean(dim=dims)
    else:
        log_prob = -((prev_sample - mean) ** 2).mean(dim=dims)
    return Step(prev_sample, mean, std, log_prob, scale)


def sde_window(num_steps: int, window: tuple[int, int] | None) -> list[bool]:
    """Which of the `num_steps` steps are stochastic (and trained): all but the last by default
    (Flow-GRPO trains steps 0..T-2), or the half-open range `window` (Flow-GRPO-Fast / MixGRPO:
    SDE on a window, deterministic ODE steps elsewhere)."""
    lo, hi = window if window is not None else (0, num_steps - 1)
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(f"SDE window {window} does not fit {num_steps} steps")
    return [lo <= i < hi for i in range(num_steps)]
