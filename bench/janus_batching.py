"""Benchmark: Janus image generation, 16 images per sampling call against one.

JanusAdapter.generate samples `images_per_call` images together (16, DeepSeek's parallel_size), each
from its own seeded generator, so batching changes the speed and not the images. Measured side by
side in one process, on random-weight Janus checkpoints built by uae.random_weights.unified:

  tiny  the tests' Janus (hidden 32, 2 layers, 16 image tokens, 32 px)
  mid   hidden 256, 4 layers, 576 image tokens (Janus-Pro's 24 x 24), a 4,096-code codebook, 192 px
        (builds in seconds; 576 sequential steps make the per-step overhead that batching shares)

For each size: a warm-up call of each, then --repeats alternating timed runs of `--images` images in
calls of 16 and of `--single_images` images one per call (a rate, so fewer suffice at one a call);
medians in images/s, their ratio, and whether the images made both ways are identical (they must be:
each image has its own generator, and each is decoded alone).

    python bench/janus_batching.py --json bench/results/cpu/janus_batching.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, peak_memory_mb, sync, write_json

import numpy as np
import torch

from uae.cli import setup_logging
from uae.random_weights.unified import TINY_JANUS, build_janus
from uae.unified.janus import JanusAdapter
from uae.unified.protocol import RunSettings

logger = logging.getLogger("uae.bench.janus_batching")

# Overrides of TINY_JANUS for the mid size: the aligners' and the generation head's widths follow the
# text model's hidden size; (image_size / patch_size)^2 image tokens, decoded at image_size pixels.
MID = {"text_config": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
                       "num_key_value_heads": 4},
       "vision_config": {"hidden_size": 64, "image_size": 192, "patch_size": 8, "projection_dim": 256,
                         "num_image_tokens": 576},
       "vq_config": {"num_embeddings": 4096, "projection_dim": 256, "image_token_embed_dim": 256},
       "image_processor": {"size": {"height": 192, "width": 192}}}
SIZES = {"tiny": {}, "mid": MID}
TEXTS = ["a red cube on a wooden table", "a mountain lake at dawn", "two cats asleep on a sofa",
         "a lighthouse on a rocky shore at dusk, waves breaking on dark stones"]


def spec(size: str) -> dict:
    out = copy.deepcopy(TINY_JANUS)
    for part, values in SIZES[size].items():
        out[part].update(values)
    return out


def timed(adapter: JanusAdapter, per_call: int, n: int) -> tuple[float, list]:
    adapter.images_per_call = per_call
    texts, seeds = [TEXTS[i % len(TEXTS)] for i in range(n)], list(range(n))
    sync()
    t0 = time.perf_counter()
    images = adapter.generate(texts, seeds)
    sync()
    return time.perf_counter() - t0, images


def measure(size: str, folder: Path, args) -> dict:
    logger.info("%s: building a random Janus", size)
    t0 = time.perf_counter()
    path = build_janus(folder / size, seed=0, spec=spec(size))
    built = time.perf_counter() - t0
    adapter = JanusAdapter(str(path), RunSettings(device=args.device, guidance_scale=args.guidance_scale))
    params = sum(p.numel() for p in adapter.model.parameters())
    batched = args.images_per_call
    logger.info("%s: warm-up", size)
    timed(adapter, batched, min(2, args.images))
    timed(adapter, 1, 1)
    rates: dict[str, list[float]] = {"batched": [], "single": []}
    same = True
    for r in range(args.repeats):
        logger.info("%s: repeat %d/%d", size, r + 1, args.repeats)
        s, many = timed(adapter, batched, args.images)
        rates["batched"].append(args.images / s)
        s, one = timed(adapter, 1, args.single_images)
        rates["single"].append(args.single_images / s)
        same &= all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(many, one))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"size": size, "parameters": params, "image_tokens": adapter.image_tokens, "image_size": adapter.image_size,
            "build_seconds": built, "images_per_s": med, "all_images_per_s": rates,
            "ratio_batched_over_single": med["batched"] / med["single"], "identical_images": same}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES), help="model sizes to measure")
    ap.add_argument("--images", type=int, default=16, help="images per timed run in calls of --images_per_call")
    ap.add_argument("--images_per_call", type=int, default=JanusAdapter.images_per_call,
                    help="the batched side's images per sampling call (JanusAdapter's default)")
    ap.add_argument("--single_images", type=int, default=4, help="images per timed run at one image per call")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each side (after a warm-up of each)")
    ap.add_argument("--guidance_scale", type=float, default=5.0, help="classifier-free guidance (DeepSeek's 5)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (on a shared 2-core machine 2 threads ran these small models slower than 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args(argv)
    # Read by huggingface_hub when it first loads (setup_logging, below): no module imported above loads it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging("INFO")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [measure(size, Path(tmp), args) for size in args.sizes]
        desc = machine()
    finally:
        torch.set_num_threads(threads)  # main() also runs inside the tests' process
    res = {"machine": desc, "settings": {k: getattr(args, k) for k in
                                              ("images", "images_per_call", "single_images", "repeats",
                                               "guidance_scale", "device", "threads")},
           "runs": runs, **peak_memory_mb()}
    print(f"Janus image generation, {args.images_per_call} images per call vs 1 ({res['machine']}); random weights, "
          f"guidance {args.guidance_scale}, medians of {args.repeats} run(s)")
    print(f"{'size':>6}{'params':>10}{'tokens':>8}{'px':>6}{'batched img/s':>15}{'single img/s':>14}{'ratio':>8}"
          f"{'same images':>13}")
    for r in runs:
        print(f"{r['size']:>6}{r['parameters'] / 1e6:>9.2f}M{r['image_tokens']:>8}{r['image_size'][0]:>6}"
              f"{r['images_per_s']['batched']:>15.3f}{r['images_per_s']['single']:>14.3f}"
              f"{r['ratio_batched_over_single']:>7.2f}x{str(r['identical_images']):>13}")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
