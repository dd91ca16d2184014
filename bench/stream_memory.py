"""Benchmark: memory of reading webdataset shards, flat in the number of samples when streamed.

Writes N tiny synthetic samples (an 8x8 jpg or png and a caption, mixed within each shard) for
each N of `--samples` (default 10K and 100K) into shards of `--shard_size`, then, in a fresh
process per measurement (so each peak RSS is its own):
- streamed: one epoch of uae.stream.ShardStream as train_sft.py reads shards (seeded shard order,
  a shuffle buffer of `--shuffle_buffer` samples, decoding, bad-sample counting, batches of
  `--batch_size` at `--resolution` px), in the process itself (`dataloader_num_workers` 0);
- held: uae.data.read_items of the same shards (the map-style path of the cold start and
  --validate_data: every sample's bytes held in memory), for contrast.
Reports the RSS after the imports, the peak RSS, their difference, and the time, side by side.

    python bench/stream_memory.py                          # 10K and 100K, about 2 min on 2 cores
    python bench/stream_memory.py --samples 1000 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, write_json

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from uae.cli import setup_logging
from uae.data import center_crop_tensor, read_items
from uae.stream import ShardStream, shard_files

logger = logging.getLogger("uae.bench.stream_memory")
VARIANTS = 16  # distinct encoded images, reused (the bytes' content does not matter here)


def write(folder: Path, n: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    images = []
    for k in range(VARIANTS):
        buf = io.BytesIO()
        fmt = ("JPEG", "PNG")[k % 2]
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format=fmt)
        images.append(({"JPEG": "jpg", "PNG": "png"}[fmt], buf.getvalue()))
    folder.mkdir(parents=True, exist_ok=True)
    for s in tqdm(range(0, n, shard_size), desc=f"writing {n} samples", unit="shard"):
        with wds.TarWriter(str(folder / f"{s // shard_size:06d}.tar")) as tar:
            for i in range(s, min(s + shard_size, n)):
                ext, data = images[i % VARIANTS]
                tar.write({"__key__": f"{i:09d}", ext: data, "txt": f"a tiny synthetic sample, number {i}".encode()})


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(folder: Path, n: int, mode: str, args) -> dict:
    """One measurement, in this (fresh) process."""
    files = shard_files(folder)
    center_crop_tensor(Image.new("RGB", (8, 8)), 4, 4)  # its lazy torchvision import, before the baseline
    base, t0 = rss_mb(), time.perf_counter()
    if mode == "streamed":
        stream = ShardStream(files, str(folder), batch_size=args.batch_size,
                             buckets=[(args.resolution, args.resolution)], pixels=center_crop_tensor, seed=0,
                             shuffle_buffer=args.shuffle_buffer)
        batches, trace = 0, []  # the RSS each tenth of the way: flat, or growing with the samples read
        for batch in stream:
            if "error" in batch:
                raise SystemExit(batch["error"])
            batches += 1
            if batch["bad"][0] * 10 >= n * (len(trace) + 1):
                trace.append(round(rss_mb() - base, 1))
            if batch["bad"][0] >= n:  # one epoch read (the stream itself goes on)
                break
        count = batches * args.batch_size
    else:
        count, trace = len(read_items(str(folder))), []
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"samples": n, "mode": mode, "yielded": count, "rss_after_imports_mb": round(base, 1),
            "peak_rss_mb": round(peak, 1), "growth_mb": round(peak - base, 1), "seconds": round(seconds, 1),
            "rss_growth_each_tenth_mb": trace}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shuffle_buffer", type=int, default=1000, help="SFTConfig's default")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["streamed", "held"], choices=["streamed", "held"])
    p.add_argument("--dir", help="where the shards go (default: a temporary folder, removed)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--measure", nargs=3, metavar=("FOLDER", "N", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_logging("INFO")
    if args.measure:
        folder, n, mode = args.measure
        sys.stdout.write(json.dumps(measure(Path(folder), int(n), mode, args)) + "\n")  # read by the parent
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = []
        for n in args.samples:
            folder = Path(tmp) / f"n{n}"
            write(folder, n, args.shard_size)
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--measure", str(folder), str(n), mode,
                       "--shuffle_buffer", str(args.shuffle_buffer), "--batch_size", str(args.batch_size),
                       "--resolution", str(args.resolution)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                logger.info("%s", rows[-1])
    result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k not in ("measure", "json")},
              "rows": rows}
    lines = [f"machine: {result['machine']}",
             "| samples | mode | RSS after imports | peak RSS | growth | time | RSS growth each tenth (MB) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['samples']:,} | {r['mode']} | {r['rss_after_imports_mb']} MB | {r['peak_rss_mb']} MB | "
              f"{r['growth_mb']} MB | {r['seconds']} s | {' '.join(map(str, r['rss_growth_each_tenth_mb'])) or '-'} |"
              for r in rows]
    logger.info("\n%s", "\n".join(lines))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
