"""Randomness and data order as functions of (seed, step): a resumed run draws exactly what an
uninterrupted one would, with no saved RNG state, and every process draws its share of the same
global order."""

from __future__ import annotations

from typing import Iterator

import torch

from uae.errors import UAEError


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
