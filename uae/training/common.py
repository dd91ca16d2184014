"""Pieces every trainer uses (the run itself is uae/training/run.py): the accelerator, the
optimizer, data order and randomness derived from (seed, step) so that a resumed run is
bit-identical to an uninterrupted one, atomic checkpoints with rotation, and the official output
layout of final/."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from uae.errors import UAEError
from uae.io import atomic_write_json

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def make_accelerator(cfg, project_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       log_with=trackers or None,
                       project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs")),
                       cpu=cfg.device == "cpu")


def make_optimizer(cfg, params):
    """The optimizer every trainer uses: AdamW with the config's betas, epsilon and weight decay
    (`params`: parameters, or param groups with their own `lr`); `optimizer: adamw8bit` is
    torchao's 8-bit AdamW, whose two moments take a quarter of fp32 AdamW's memory."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise UAEError("--optimizer adamw8bit needs torchao: pip install torchao (or use --optimizer adamw)") from None
        return AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def generator_for(seed: int, step: int, device="cpu") -> torch.Generator:
    """The randomness of one (micro-)step: a pure function of the run's seed and the step index,
    so it needs no saved RNG state to resume exactly."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


class StepSampler(torch.utils.data.Sampler):
    """Indices for micro-steps `start`, `start + 1`, ...: each epoch is a permutation seeded by
    (seed, epoch), cut into global batches of `batch * world` (split across processes by rank).
    With `groups` (e.g. aspect-ratio buckets), a batch only holds items of one group and the
    batches' order is shuffled too; incomplete batches are dropped."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, start: int, total: int,
                 groups: list | None = None):
        self.n, self.batch, self.world, self.rank = n, batch, world, rank
        self.seed, self.start, self.total, self.groups = seed, start, total, groups
        gb = batch * world
        counts = {}
        for g in groups or [0] * n:
            counts[g] = counts.get(g, 0) + 1
        self.per_epoch = sum(c // gb for c in counts.values())
        if self.per_epoch == 0:
            raise UAEError(f"the dataset has {n} usable item(s), fewer than one global batch "
                           f"(train_batch_size {batch} x {world} process(es)) in any group: add data or lower "
                           "train_batch_size")

    def __len__(self) -> int:
        return max(self.total - self.start, 0) * self.batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        gb = self.batch * self.world
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + 7919 * epoch)).tolist()
        if self.groups is None:
            return [order[i * gb:(i + 1) * gb] for i in range(self.per_epoch)]
        by_group: dict = {}
        for i in order:
            by_group.setdefault(self.groups[i], []).append(i)
        batches = [idx[j:j + gb] for idx in by_group.values() for j in range(0, len(idx) - gb + 1, gb)]
        perm = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed + 7919 * epoch + 1))
        return [batches[k] for k in perm.tolist()]

    def __iter__(self) -> Iterator[int]:
        cached_epoch, batches = None, []
        for m in range(self.start, self.total):
            epoch, pos = divmod(m, self.per_epoch)
            if epoch != cached_epoch:
                cached_epoch, batches = epoch, self.epoch_batches(epoch)
            yield from batches[pos][self.rank::self.world]


class Checkpoints:
    """`output_dir/checkpoint-<step>/` written atomically via accelerate's save_state, plus
    `uae_state.json` (step, resolved config); the oldest are removed past `limit`."""

    def __init__(self, output_dir: Path, limit: int | None):
        self.dir, self.limit = Path(output_dir), limit

    def all(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.dir.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))
                 and (p / "uae_state.json").exists()]
        return [p for _, p in sorted(found)]

    def resolve(self, what: str | None) -> Path | None:
        if not what:
            return None
        if what == "latest":
            found = self.all()
            if not found:
                logger.info("no checkpoint in %s: starting from scratch", self.dir)
            return found[-1] if found else None
        p = Path(what)
        if not (p / "uae_state.json").exists():
            raise UAEError(f"--resume_from_checkpoint {what}: not a checkpoint folder (no uae_state.json); "
                           f"use 'latest' or one of {[c.name for c in self.all()]}")
        return p

    def save(self, accelerator, step: int, config: dict) -> Path:
        final = self.dir / f"checkpoint-{step}"
        tmp = self.dir / f".checkpoint-{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        tmp.mkdir(parents=True, exist_ok=True)  # every rank writes its RNG state there
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
        if accelerator.is_main_process:
            atomic_write_json(tmp / "uae_state.json", {"step": step, "config": config})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if self.limit:
                for old in self.all()[:-self.limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(accelerator, path: Path) -> int:
        accelerator.load_state(str(path))
        return int(json.loads((path / "uae_state.json").read_text())["step"])


def link_or_copy(src: str | Path, dst: Path, link: bool) -> None:
    """Unchanged parts of a checkpoint: a symlink (no multi-GB copies) or a copy."""
    src = Path(src).resolve()
    if dst.exists() or dst.is_symlink():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    if link:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def write_final(out_dir: Path, paths, link: bool, keep: tuple[str, ...], manifest: dict) -> Path:
    """`<out_dir>/final/` in the official layout: the parts in `keep` linked (or copied) from the
    source checkpoint, the manifest written; the caller then writes the parts it trained."""
    from uae.checkpoints import MANIFEST

    final = Path(out_dir) / "final"
    final.mkdir(exist_ok=True)
    for part in keep:
        if getattr(paths, part):
            link_or_copy(getattr(paths, part), final / part, link)
    if "dit_lora" in keep and not paths.dit_lora:
        manifest = {**manifest, "dit_lora": None}
    atomic_write_json(final / MANIFEST, manifest)
    return final
