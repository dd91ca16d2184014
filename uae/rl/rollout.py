"""What the RL stages share around their rollouts: the reference images, the default reward, each
process's share of an iteration's prompts, the SDE window of an iteration, the KL reference
weights, and reward scoring."""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch

from uae.errors import UAEError

logger = logging.getLogger(__name__)


class Reference(NamedTuple):
    key: str
    image: object          # PIL RGB
    caption: str | None    # the caption that came with the data, if any


def load_references(data: str) -> list[Reference]:
    """A folder of images (captions from the encoder), a folder with .txt captions, or a .jsonl /
    datasets / webdataset source; unreadable images are skipped with a warning."""
    from uae.data import read_items

    refs = []
    for it in read_items(data):
        try:
            refs.append(Reference(it.image.name if it.image is not None else it.source, it.open(), it.caption))
        except Exception as e:
            logger.warning("skipping reference %s: %s", it.source, e)
    if not refs:
        raise UAEError(f"--data {data}: no readable reference image")
    return refs


def default_reward(cfg, device, dtype=None):
    """The configured rewards (`reward_funcs`, `reward_weights`; the reconstruction similarity by
    default), their scorers in `dtype` (the frozen dtype of the precision policy)."""
    from uae.rl.rewards import build_rewards
    from uae.scoring.scorers import resolve_scorer_weights

    return build_rewards(cfg.reward_funcs, cfg.reward_weights, device=device, dtype=dtype,
                         scorer_weights=resolve_scorer_weights(cfg.scorer_weights, cfg.checkpoint))


def score(reward, images, keys, references, prompts) -> dict[str, list[float]]:
    """{"total": [...], and each reward function's values}."""
    from uae.rl.rewards import Rewards

    return Rewards.wrap(reward).score(images, keys, references, prompts)


def iteration_metrics(acc, all_rewards: torch.Tensor, scores: dict, adv, seconds: dict[str, float],
                      total: float) -> dict:
    """What every RL stage logs per iteration: the reward over all processes (and each reward
    function's mean), the zero-variance groups, and the seconds per phase (`seconds`: sampling,
    reward, train; other = the rest of `total`)."""
    values = {"reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std(unbiased=False).item(),
              "skipped_groups": adv.skipped_groups, "groups": adv.groups,
              **{f"time_{k}": v for k, v in seconds.items()}, "time_other": total - sum(seconds.values())}
    for name, v in scores.items():
        if name != "total":
            values[f"reward_{name}"] = float(acc.gather(torch.as_tensor(v, device=all_rewards.device)).mean())
    return values


class Share(NamedTuple):
    prompts: list[int]   # the iteration's prompts (reference indices), the same on every process
    samples: list[int]   # this process's samples: the prompt of each, groups in order
    size: int            # samples per process
    offset: int          # global index of this process's first sample


def iteration_share(cfg, it: int, n_refs: int, world: int, rank: int) -> Share:
    """The iteration's prompts, drawn without replacement (a permutation seeded by (seed, iteration),
    as Flow-GRPO's sampler does, so no two groups share a prompt), each repeated group_size times;
    samples split across processes in contiguous shares, so a group may span processes."""
    from uae.training.common import generator_for

    if cfg.prompts_per_iteration > n_refs:
        raise UAEError(f"prompts_per_iteration {cfg.prompts_per_iteration} is more than the {n_refs} reference(s) "
                       "of --data: prompts are drawn without replacement; lower it or add references")
    pick = torch.randperm(n_refs, generator=generator_for(cfg.seed + 1, it))[:cfg.prompts_per_iteration].tolist()
    samples = [p for p in pick for _ in range(cfg.group_size)]
    if len(samples) % world:
        raise UAEError(f"prompts_per_iteration x group_size = {len(samples)} is not divisible by {world} processes")
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
    from uae.training.common import generator_for

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


def kl_reference(cfg, trainable, accelerator) -> "ReferenceWeights | None":
    """The KL's reference weights when the stage has a KL to the LoRA it started from (kept in the
    checkpoints: a resumed run keeps the same reference); None for no KL or the base model."""
    if not (cfg.beta and cfg.kl_reference == "start"):
        return None
    ref = ReferenceWeights(trainable)
    accelerator.register_for_checkpointing(ref)
    return ref


class ReferenceWeights:
    """The KL reference "start": the trained weights as they were when the stage began, kept on
    the side (a LoRA's worth of memory) and swapped in for the reference's forward pass."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.start = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def active(self):
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.start):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self.params, current):
                    p.copy_(c)

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = [t.to(p.device) for t, p in zip(state["start"], self.params)]
