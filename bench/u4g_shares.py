"""Simulation: how evenly stage 3's optimizer steps load the processes (no model is run).

Each optimizer step of u4g trains on one share of the iteration's rollouts; every process trains on
its own samples of the share, in forward calls of at most `train_batch_size` samples of one
conditioning length, and the step's gradient all-reduce waits for the slowest process. This counts,
per share and trained step, the samples and forward calls of the slowest process against the mean
over processes, for the shares as they were drawn before (one permutation of all processes'
samples together) and as `uae.methods.u4g.update_shares` draws them now (blocks of
`updates_per_iteration` consecutive samples, one to each share: each process's own samples), in two
cases of prompt lengths: every prompt of one conditioning length (the best case for batching) and
each prompt of its own length (the worst).

    python bench/u4g_shares.py                      # Flow-GRPO's SD3.5 scale: 8 GPUs, 48 x 24 = 1,152
    python bench/u4g_shares.py --processes 32 --iterations 50
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch

from uae.cli import setup_logging
from uae.methods.u4g import same_length_batches, update_shares
from uae.training.seeding import generator_for

logger = logging.getLogger("uae.bench.u4g_shares")


def shares_before(n: int, updates: int, seed: int, it: int, epoch: int = 0) -> list[list[int]]:
    """The rule replaced: one permutation of all processes' samples, cut into `updates` shares."""
    perm = torch.randperm(n, generator=generator_for(seed + 3 + 7919 * epoch, it)).tolist()
    return [perm[u * n // updates:(u + 1) * n // updates] for u in range(updates)]


def load(rule, *, processes: int, prompts: int, group: int, updates: int, batch: int, iterations: int,
         lengths: str, seed: int = 0) -> dict[str, float]:
    """Per share (an optimizer step's work per trained step): the slowest process's samples and
    forward calls, the mean over processes, averaged over iterations and shares."""
    n = prompts * group
    per = n // processes
    length = (lambda j: 0) if lengths == "one" else (lambda j: j // group)  # the prompt's own length
    slow_s, mean_s, slow_f, mean_f = [], [], [], []
    for it in range(iterations):
        for share in rule(n, updates, seed, it):
            counts, calls = [], []
            for rank in range(processes):
                mine = sorted((j for j in share if rank * per <= j < (rank + 1) * per), key=length)
                counts.append(len(mine))
                calls.append(len(same_length_batches(mine, length, batch)))
            slow_s.append(max(counts))
            mean_s.append(statistics.mean(counts))
            slow_f.append(max(calls))
            mean_f.append(statistics.mean(calls))
    return {"slowest_samples": statistics.mean(slow_s), "mean_samples": statistics.mean(mean_s),
            "slowest_forwards": statistics.mean(slow_f), "mean_forwards": statistics.mean(mean_f)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--prompts", type=int, default=48, help="prompts per iteration (Flow-GRPO's SD3.5: 48)")
    p.add_argument("--group_size", type=int, default=24)
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per iteration (shares)")
    p.add_argument("--train_batch_size", type=int, default=8, help="samples per forward call")
    p.add_argument("--iterations", type=int, default=200)
    args = p.parse_args(argv)
    setup_logging("INFO")
    if args.prompts * args.group_size % args.processes:
        p.error("prompts x group_size must be divisible by the number of processes")
    common = dict(processes=args.processes, prompts=args.prompts, group=args.group_size, updates=args.updates,
                  batch=args.train_batch_size, iterations=args.iterations)
    logger.info("%d processes, %d x %d = %d rollouts, %d shares, forward calls of <= %d samples, %d iterations: "
                "per share and trained step, the slowest process (mean over processes)", args.processes,
                args.prompts, args.group_size, args.prompts * args.group_size, args.updates, args.train_batch_size,
                args.iterations)
    logger.info("%-17s %-8s %22s %22s %8s", "prompt lengths", "shares", "samples", "forward calls", "ratio")
    for lengths in ("one", "each its own"):
        rows = {name: load(rule, lengths=lengths, **common)
                for name, rule in (("before", shares_before), ("now", update_shares))}
        for name, r in rows.items():
            logger.info("%-17s %-8s %10.2f (%8.2f) %10.2f (%8.2f) %7.3fx", lengths, name, r["slowest_samples"],
                        r["mean_samples"], r["slowest_forwards"], r["mean_forwards"],
                        r["slowest_forwards"] / r["mean_forwards"])
        logger.info("%-17s slowest process's forward calls, before / now: %.3fx", lengths,
                    rows["before"]["slowest_forwards"] / rows["now"]["slowest_forwards"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
