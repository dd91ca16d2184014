"""Benchmark: one SFT optimizer step (decoder LoRA + projector, flow-matching loss) on random
weights: seconds per step after a warm-up step, and peak memory.

    python bench/bench_sft.py --preset mid --steps 3 --resolution 256
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench_grpo import sample_pairs
from common import ROOT, machine, peak_memory_mb, reset_peak_memory, write_json

from accelerate.state import AcceleratorState

from uae.cli import setup_logging
from uae.random_weights import build_checkpoint
from uae.train import sft_main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid", help="model preset to build (tiny, mid, full, or a YAML path)")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead of building --preset")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (plus one warm-up)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mixed_precision", default="no")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    # Read by huggingface_hub when it first loads (setup_logging, below): no module imported above loads it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "ckpt", args.preset)
        flags = ["--config", str(ROOT / "configs" / "sft" / "tiny.yaml"), "--checkpoint", str(ckpt),
                 "--data", str(sample_pairs(tmp)), "--output_dir", str(tmp / "run"),
                 "--max_steps", str(args.steps + 1), "--train_batch_size", str(args.batch_size),
                 "--resolution", str(args.resolution), "--validation_steps", "0", "--checkpointing_steps", "0",
                 "--device", args.device, "--mixed_precision", args.mixed_precision, "--log_level", "WARNING"]
        if args.gradient_checkpointing:
            flags.append("--gradient_checkpointing")
        AcceleratorState._reset_state(reset_partial_state=True)
        reset_peak_memory()
        if sft_main(flags) != 0:
            raise SystemExit("train_sft.py failed")
        rec = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    step = sum(r["seconds_per_step"] for r in rec) / len(rec)
    res = {"machine": machine(), "preset": args.checkpoint or args.preset, "resolution": args.resolution,
           "batch_size": args.batch_size, "seconds_per_step": step, "steps_timed": len(rec), **peak_memory_mb()}
    print(f"SFT step ({res['machine']}); {res['preset']}, {args.resolution}px, batch {args.batch_size}: "
          f"{step:.3f} s per step, peak RSS {res['peak_rss_mb']:.0f} MB"
          + (f", peak GPU {res['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in res else ""))
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
