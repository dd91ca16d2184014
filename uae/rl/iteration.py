"""What an RL iteration draws and logs, the same on every process: its prompts and each process's
share of their samples, its SDE window (stage 3), the rewards gathered into advantages, and the
per-iteration metrics with the time of each phase."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import NamedTuple

import torch

from uae.errors import UAEError
from uae.rl.grpo import Advantages, group_advantages
from uae.training.seeding import generator_for

PHASES = ("sampling", "reward", "train")


class Phases:
    """Where a step's time goes: `with phases("sampling"): ...` adds to that phase (sampling,
    reward, train); `metrics()` gives time_<phase> and time_other, the rest of the step since the
    timer was made."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: use one of {PHASES}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"time_{p}": self.seconds[p] for p in PHASES}
        out["time_other"] = total - sum(out.values())
        return out


def gathered_advantages(acc, rewards: list[float], share: "Share", cfg, *, unbiased: bool) -> tuple[torch.Tensor,
                                                                                                     Advantages]:
    """Every process's rewards (a group may span processes), in global sample order, and the
    advantages of every sample (`cfg.scale_rewards`, `cfg.adv_clip`; `unbiased`: the std
    estimator, TRL's with Bessel's correction or Flow-GRPO's without)."""
    all_rewards = acc.gather(torch.tensor(rewards, dtype=torch.float32, device=acc.device))
    group_ids = torch.arange(len(share.prompts), device=acc.device).repeat_interleave(cfg.group_size)
    adv = group_advantages(all_rewards, group_ids, scale=cfg.scale_rewards, unbiased=unbiased, clip=cfg.adv_clip)
    return all_rewards, adv


def iteration_metrics(acc, all_rewards: torch.Tensor, scores: dict, adv: Advantages, phases: Phases) -> dict:
    """What every RL stage logs per iteration: the reward over all processes (and each reward
    function's mean), the zero-variance groups, and the seconds per phase."""
    values = {"reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std(unbiased=False).item(),
              "skipped_groups": adv.skipped_groups, "groups": adv.groups}
    for name, v in scores.items():
        if name != "total":
            values[f"reward_{name}"] = float(acc.gather(torch.as_tensor(v, device=all_rewards.device)).mean())
    return {**values, **phases.metrics()}


class Share(NamedTuple):
    prompts: list[int]   # the iteration's prompts (reference indices), the same on every process
    samples: list[int]   # this process's samples: the prompt of each, groups in order
    size: int            # samples per process
    offset: int          # global index of this process's first sample


def check_share(cfg, n_refs: int, world: int) -> None:
    """Whether iterations can be drawn from `n_refs` references over `world` processes: checked by
    the stages as soon as the references are read, before any model loads."""
    if cfg.prompts_per_iteration > n_refs:
        raise UAEError(f"--prompts_per_iteration {cfg.prompts_per_iteration} is more than the {n_refs} reference(s) "
                       f"of --data {cfg.data}: prompts are drawn without replacement; lower it or add references")
    samples = cfg.prompts_per_iteration * cfg.group_size
    if samples % world:
        raise UAEError(f"--prompts_per_iteration x --group_size = {samples} is not divisible by {world} processes")


def iteration_share(cfg, it: int, n_refs: int, world: int, rank: int) -> Share:
    """The iteration's prompts, drawn without replacement (a permutation seeded by (seed, iteration),
    as Flow-GRPO's sampler does, so no two groups share a prompt), each repeated group_size times;
    samples split across processes in contiguous shares, so a group may span processes."""
    check_share(cfg, n_refs, world)
    pick = torch.randperm(n_refs, generator=generator_for(cfg.seed + 1, it))[:cfg.prompts_per_iteration].tolist()
    samples = [p for p in pick for _ in range(cfg.group_size)]
    per = len(samples) // world
    return Share(pick, samples[rank * per:(rank + 1) * per], per, rank * per)


def sde_window_for(cfg, it: int) -> tuple[int, int] | None:
    """The steps [lo, hi) sampled with the SDE (and trained) in iteration `it`; None: all but the
    last (Flow-GRPO). `sde_window_mode`:
    - fixed: `sde_window`, the same every iteration;
    - random: a window of `sde_window_size` steps whose start is drawn anew each iteration within
      `sde_window_range` (Flow-GRPO-Fast; the same on every process here);
    - sliding: the start moves by `sde_window_shift` steps every `sde_window_shift_every`
      iterations across `sde_window_range`, back to its beginning after the end (MixGRPO's
      progressive strategy)."""
    mode = cfg.sde_window_mode
    if mode == "fixed":
        return tuple(cfg.sde_window) if cfg.sde_window else None
    lo, hi = sde_window_range(cfg)
    starts = hi - cfg.sde_window_size - lo + 1
    if mode == "random":
        start = lo + int(torch.randint(starts, (1,), generator=generator_for(cfg.seed + 5, it)))
    else:
        start = lo + (it // cfg.sde_window_shift_every) * cfg.sde_window_shift % starts
    return start, start + cfg.sde_window_size


def sde_window_range(cfg) -> tuple[int, int]:
    """Where a moving window may lie; default: the first half of the schedule (Flow-GRPO-Fast)."""
    return tuple(cfg.sde_window_range) if cfg.sde_window_range else (0, cfg.num_steps // 2)
