"""Benchmark: the cold start's gradient, exact against its shortcuts, and what exactness costs in
memory with per-step gradient checkpointing.

1. Gradients (one process, SD3.5's schedule: shift 3.0, `--steps` steps): the trained weights'
   gradient of one cold-start loss with the default (full, per-step checkpointing) against
   truncation to the last k steps (k = 1 .. steps) and the one-step x0 estimate: norm ratio and
   cosine to the exact gradient. Random weights behave alike at every timestep, so these numbers
   bound the truncation error on this model only; on a trained DiT early steps set content.
2. Memory (a fresh process per setting): peak memory of one loss + backward at `--memory_steps`
   (e.g. 2 and 10) with and without per-step checkpointing, above the memory held before the step
   (GPU: torch's allocator peak; CPU: resident memory sampled every 2 ms, with glibc told to hand
   large blocks back to the OS on free, so that it follows live memory). The ratio 10 vs 2 steps
   is the claim: with checkpointing it stays near 1 (one step's activations), without it grows
   with the number of steps.

    python bench/bench_cold_start.py --preset tiny --resolution 64 --steps 10
    python bench/bench_cold_start.py --preset mid --resolution 256 --memory_steps 2 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine, write_json

import torch
from accelerate.state import AcceleratorState

from uae.cli import setup_logging
from uae.config import parse_config
from uae.images import to_uint8
from uae.methods.cold_start import ColdStartConfig, ColdStartRecipe
from uae.random_weights import build_checkpoint
from uae.runtime import release_freed_memory
from uae.training.run import Run
from uae.training.seeding import generator_for


def _pair(folder: Path) -> Path:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg")
    path = folder / "pairs.jsonl"
    path.write_text(json.dumps({"image": "astronaut.jpg", "caption": "an astronaut in a white suit with a flag"}) + "\n")
    return path


def _recipe(ckpt: Path, pairs: Path, out: Path, steps: int, resolution: int, *extra: str):
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = parse_config(ColdStartConfig, [
        "--stage", "cold_start", "--checkpoint", str(ckpt), "--data", str(pairs), "--output_dir", str(out),
        "--num_steps", str(steps), "--resolution", str(resolution), "--guidance_scale", "5.0",
        "--scorer_weights", "tiny", "--report_to", "none", "--device", "auto",
        "--overwrite_output_dir", *extra])  # a scratch folder each measurement reuses
    run = Run(cfg, "bench")
    recipe = ColdStartRecipe(run)
    run.set_up(recipe)
    return recipe


def _gradient(recipe, seed: int = 1) -> torch.Tensor:
    item = recipe.items[0]
    image = item.open()
    target = recipe.clip.encode_images(to_uint8([image])).detach()
    for p in recipe.trainable:
        p.grad = None
    recipe.loss(image, item.caption, generator_for(0, seed), target).backward()
    return torch.cat([p.grad.flatten().float() for p in recipe.trainable])


def gradients(args, ckpt: Path, pairs: Path, tmp: Path) -> list[dict]:
    recipe = _recipe(ckpt, pairs, tmp / "grad", args.steps, args.resolution)
    cfg = recipe.cfg
    exact = _gradient(recipe)
    rows = []
    settings = [("truncated", k) for k in range(1, args.steps + 1)] + [("x0", None)]
    for mode, k in settings:
        cfg.gradient = mode
        if k is not None:
            cfg.truncate_steps = k
        g = _gradient(recipe)
        rows.append({"gradient": mode if k is None else f"truncated-{k}", "norm_ratio": float(g.norm() / exact.norm()),
                     "cosine": float(torch.nn.functional.cosine_similarity(g, exact, dim=0))})
    cfg.gradient = "full"
    return rows


class PeakSampler:
    """Peak resident memory of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(args) -> dict:
    """One loss + backward in this (fresh) process: memory above what was held before the step."""
    tmp = Path(args.tmp)
    recipe = _recipe(Path(args.ckpt), Path(args.pairs), tmp / f"m{args.steps}", args.steps, args.resolution,
                     "--step_checkpointing", str(args.checkpointing).lower())
    _gradient(recipe)  # warm-up: allocator pools, lazy initialisation
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        _gradient(recipe)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return {"peak_mb": (torch.cuda.max_memory_allocated() - before) / 2 ** 20, "seconds": seconds, "memory": "gpu"}
    # Freed memory handed back to the OS first, and (env of this process) large blocks mmap-ed and
    # returned on free: resident memory then follows what is alive.
    for p in recipe.trainable:
        p.grad = None
    release_freed_memory()
    t0 = time.perf_counter()
    with PeakSampler() as s:
        _gradient(recipe)
    return {"peak_mb": (s.peak - s.base) / 2 ** 20, "seconds": time.perf_counter() - t0, "memory": "cpu rss"}


def memory(args, ckpt: Path, pairs: Path, tmp: Path) -> list[dict]:
    rows = []
    for checkpointing in (True, False):
        for steps in args.memory_steps:
            cmd = [sys.executable, __file__, "--_measure", "--ckpt", str(ckpt), "--pairs", str(pairs), "--tmp", str(tmp),
                   "--steps", str(steps), "--resolution", str(args.memory_resolution or args.resolution),
                   "--checkpointing", str(checkpointing)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"steps": steps, "checkpointing": checkpointing, **res})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="model preset built here (tiny, mid, ...)")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead of building one")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="sampling steps of the gradient comparison")
    ap.add_argument("--memory_steps", type=int, nargs="*", default=[2, 10], help="sampling steps compared for memory")
    ap.add_argument("--memory_resolution", type=int, default=None, help="resolution of the memory runs (default --resolution)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", default="True", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        args.checkpointing = args.checkpointing == "True"
        print(json.dumps(measure(args)))
        return {}
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            ckpt = build_checkpoint(tmp / "ckpt", args.preset, seed=0)
        pairs = _pair(tmp)
        grads = gradients(args, ckpt, pairs, tmp)
        mem = memory(args, ckpt, pairs, tmp) if args.memory_steps else []
    res = {"machine": machine(), "preset": args.checkpoint or args.preset, "resolution": args.resolution,
           "steps": args.steps, "gradients": grads, "memory": mem}
    print(f"cold-start gradient ({res['machine']}); {res['preset']}, {args.resolution}px, shift 3.0, {args.steps} steps")
    print(f"{'gradient':<14} {'norm ratio':>11} {'cosine':>8}   (against the exact gradient)")
    for r in grads:
        print(f"{r['gradient']:<14} {r['norm_ratio']:>11.4g} {r['cosine']:>8.4f}")
    if mem:
        print(f"one loss + backward, memory above the step's start ({mem[0]['memory']}):")
        by = {(r["steps"], r["checkpointing"]): r for r in mem}
        for ck in (True, False):
            cells = ", ".join(f"{s} steps {by[(s, ck)]['peak_mb']:.0f} MB / {by[(s, ck)]['seconds']:.2f} s"
                              for s in args.memory_steps)
            lo, hi = min(args.memory_steps), max(args.memory_steps)
            ratio = by[(hi, ck)]["peak_mb"] / max(by[(lo, ck)]["peak_mb"], 1e-9)
            print(f"  checkpointing {'on ' if ck else 'off'}: {cells}; {hi} vs {lo} steps: {ratio:.2f}x")
            res[f"memory_ratio_{hi}_vs_{lo}_{'checkpointing' if ck else 'no_checkpointing'}"] = ratio
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
