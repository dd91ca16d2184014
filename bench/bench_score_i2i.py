"""Benchmark: Score_i2i's folder scoring vs the official-style per-pair loop, side by side.

On the same pairs (1024x1024 PNG reconstructions against JPEG references) and the same random
weights of one size (small = ViT-S, base = ViT-B, xs = a forward of ~4-5 ms on a 2-core CPU, tiny),
it times:
  loop   the official style: for every scorer and pair, open both files, preprocess with the
         model's own processor, encode at batch 1
  cold   ours, empty reference-feature cache
  warm   ours again, references from the cache
  floor  the scorers' forward passes alone over the unique images (pre-decoded, pre-processed,
         no file I/O): in the loop's process after the loop at a few batch sizes, and again in
         ours' process right after warm at the best of them; cold / floor uses the second
         (neighbouring measurements: this shared machine's speed drifts by 10-30% between
         runs), loop / floor the first
and prints pairs/s, the ratios, the largest score difference to the loop, and the peak RSS of a
fresh Score_i2i process on a quarter of the pairs and on all of them (memory must not grow with
the number of pairs).

    python bench/bench_score_i2i.py --size base --pairs 100
    python bench/bench_score_i2i.py --size small --pairs 100 --json bench/score_small.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from common import machine, peak_memory_mb, sync, write_json

import torch

from uae.images import load_image
from uae.random_weights import build_scorer_checkpoints
from uae.runtime import resolve_device
from uae.scoring.folder import match_folders, score_folders
from uae.scoring.scorers import SCORERS, load_scorer

logger = logging.getLogger("uae.bench")


def make_pairs(folder: Path, n: int, size: int) -> tuple[Path, Path]:
    """n JPEG references (photos, varied crops) and n PNG reconstructions (size x size)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), np.stack([data.camera()] * 3, -1)]
    ref, rec = folder / "ref", folder / "rec"
    ref.mkdir(parents=True), rec.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
        crop = arr[y:y + 3 * h // 4, x:x + 3 * w // 4]
        Image.fromarray(crop).save(ref / f"{i:04d}.jpg", quality=90)
        noisy = np.clip(crop.astype(np.int16) + rng.integers(-20, 20, crop.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).resize((size, size), Image.BICUBIC).save(rec / f"{i:04d}.png")
    return rec, ref


def peak_rss_mb(rec: Path, ref: Path, folders: Path, workers: int, batch_size: int, device: str) -> float:
    """Peak resident memory (MB) of a fresh `eval/Score_i2i.py` process scoring these folders
    (main process; DataLoader workers hold at most their prefetched batches). A fresh process per
    measurement, so one run's allocations cannot hide in another's baseline."""
    import subprocess

    import psutil

    script = Path(__file__).resolve().parent.parent / "eval" / "Score_i2i.py"
    cmd = [sys.executable, str(script), "--image_path", str(rec), "--ref_path", str(ref), "--no_cache",
           "--output_file", str(rec.parent / "mem.json"), "--num_workers", str(workers),
           "--batch_size", str(batch_size), "--device", device, "--log_level", "WARNING"]
    cmd += [a for n in SCORERS for a in (f"--{n}_checkpoint", str(folders / n))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    watch, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watch.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.02)
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return peak / 2**20


def run_loop(pairs, folders, device) -> dict:
    from PIL import Image

    from reference_scorers import ReferenceEncoder

    scores = {}
    for name in SCORERS:
        enc = ReferenceEncoder(name, folders / name, device)
        scores[name] = {}
        for key, rec, ref in pairs:
            with Image.open(rec) as a, Image.open(ref) as b:
                scores[name][key] = enc.similarity(a.convert("RGB"), b.convert("RGB"))
    return scores


def run_ours(rec, ref, scorers, cache, batch_size, workers) -> dict:
    return score_folders(rec, ref, scorers, batch_size=batch_size, num_workers=workers, cache_dir=cache,
                         progress=False)


def run_floor(paths, scorers, batch_sizes) -> tuple[float, int]:
    """Forward passes alone over pre-decoded, pre-processed images already on the device."""
    import numpy as np

    images = [torch.from_numpy(np.array(load_image(p))).permute(2, 0, 1) for p in paths]
    pixels = {n: torch.stack([s.preprocess(im) for im in images]).to(s.device, s.dtype) for n, s in scorers.items()}
    best = (float("inf"), 0)
    for bs in batch_sizes:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for n, s in scorers.items():
                for i in range(0, len(paths), bs):
                    s(pixels[n][i:i + bs])
        sync()
        best = min(best, (time.perf_counter() - t0, bs))
    return best


def measure(args) -> dict:
    """One method in this (fresh) process, `loop` or `ours` (cold + warm), then the compute floor."""
    device = resolve_device(args.device)
    data, folders = Path(args.data), Path(args.scorers)
    rec, ref = data / "rec", data / "ref"
    pairs = match_folders(rec, ref).pairs
    scorers = {n: load_scorer(n, str(folders / n), device=device) for n in SCORERS}
    out: dict = {"seconds": {}, "scores": {}}
    if args.method == "loop":
        t0 = time.perf_counter()
        out["scores"]["loop"] = run_loop(pairs, folders, device)
        out["seconds"]["loop"] = time.perf_counter() - t0
    else:
        with tempfile.TemporaryDirectory() as cache:
            for k in ("cold", "warm"):
                t0 = time.perf_counter()
                res = run_ours(rec, ref, scorers, Path(cache), args.batch_size, args.workers)
                out["seconds"][k] = time.perf_counter() - t0
                out["scores"][k] = {n: res[n] for n in SCORERS}
    out["peak_memory"] = peak_memory_mb()  # the method's own work, before the floor's decoded images
    # The compute floor in the same process, minutes after the method: this machine's speed drifts
    # by 10-30% between runs, so each method is compared with a neighbouring floor.
    unique = sorted({p for _, a, b in pairs for p in (a, b)})
    out["seconds"]["floor"], out["floor_batch_size"] = run_floor(unique, scorers, args.floor_batch_sizes)
    out["unique_images"] = len(unique)
    return out


def spawn(args, method: str, data: Path, folders: Path, floor_batch_sizes: list[int]) -> dict:
    """Run `measure` for one method in a fresh process (so neither inherits the other's
    allocator or thread-pool state)."""
    import json
    import subprocess

    out = data / f"{method}.json"
    cmd = [sys.executable, __file__, "--method", method, "--data", str(data), "--scorers", str(folders),
           "--device", args.device, "--batch_size", str(args.batch_size), "--workers", str(args.workers),
           "--floor_batch_sizes", *map(str, floor_batch_sizes),
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "xs", "small", "base", "full"])
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--image_size", type=int, default=1024, help="reconstruction side in pixels")
    ap.add_argument("--batch_size", type=int, default=16, help="ours' batch size (Score_i2i's default)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--floor_batch_sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    ap.add_argument("--method", choices=["loop", "ours"], help=argparse.SUPPRESS)  # internal: one measurement
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--scorers", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.method:
        res = measure(args)
        write_json(args.json, res)
        return res

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rec, ref = make_pairs(tmp / "data", args.pairs, args.image_size)
        folders = build_scorer_checkpoints(tmp / "scorers", args.size)
        loop = spawn(args, "loop", tmp / "data", folders, args.floor_batch_sizes)
        ours = spawn(args, "ours", tmp / "data", folders, [loop["floor_batch_size"]])
        pairs = match_folders(rec, ref).pairs
        quarter = args.pairs // 4
        sub = tmp / "quarter"
        (sub / "rec").mkdir(parents=True), (sub / "ref").mkdir()
        for key, r, f in pairs[:quarter]:
            os.link(r, sub / "rec" / r.name), os.link(f, sub / "ref" / f.name)
        mem = {f"{quarter}_pairs": peak_rss_mb(sub / "rec", sub / "ref", folders, args.workers, args.batch_size, str(device)),
               f"{len(pairs)}_pairs": peak_rss_mb(rec, ref, folders, args.workers, args.batch_size, str(device))}
    ref_scores = loop["scores"]["loop"]
    diff = {k: max(abs(ours["scores"][k][n][key] - ref_scores[n][key]) for n in SCORERS for key in ref_scores[n])
            for k in ("cold", "warm")}
    sec = {"loop": loop["seconds"]["loop"], "cold": ours["seconds"]["cold"], "warm": ours["seconds"]["warm"],
           "floor": ours["seconds"]["floor"], "floor_in_loop_process": loop["seconds"]["floor"]}
    n = len(pairs)
    res = {
        "machine": machine(),
        "size": args.size, "pairs": n, "image_size": args.image_size,
        "pairs_per_s": {k: n / v for k, v in sec.items()},
        "seconds": sec,
        "floor_batch_size": loop["floor_batch_size"], "ours_batch_size": args.batch_size,
        "forward_ms_per_image_per_scorer": 1000 * sec["floor"] / (loop["unique_images"] * len(SCORERS)),
        "ratios": {"cold_vs_floor_time": sec["cold"] / sec["floor"], "warm_speedup_over_cold": sec["cold"] / sec["warm"],
                   "cold_speedup_over_loop": sec["loop"] / sec["cold"],
                   "loop_vs_floor_time": sec["loop"] / sec["floor_in_loop_process"]},
        "max_abs_score_diff_vs_loop": diff,
        "peak_rss_mb_score_i2i_process": mem,
        "peak_memory": ours["peak_memory"],  # the process that ran ours, cold and warm
    }
    print(f"Score_i2i benchmark ({res['machine']}); {args.size} random weights, {n} pairs, "
          f"{args.image_size}px PNG vs JPEG; each method in a fresh process")
    print(f"{'method':<8}{'seconds':>10}{'pairs/s':>10}")
    for k in ("loop", "cold", "warm", "floor"):
        print(f"{k:<8}{sec[k]:>10.2f}{res['pairs_per_s'][k]:>10.2f}")
    r = res["ratios"]
    print(f"cold / floor time {r['cold_vs_floor_time']:.2f}x | warm speed-up over cold {r['warm_speedup_over_cold']:.2f}x"
          f" | cold speed-up over loop {r['cold_speedup_over_loop']:.2f}x"
          f" | loop / floor (loop's process, {sec['floor_in_loop_process']:.2f} s) {r['loop_vs_floor_time']:.2f}x"
          f" | batch: floor {res['floor_batch_size']}, ours {args.batch_size} ({res['forward_ms_per_image_per_scorer']:.1f} ms per image per scorer)")
    print(f"max |score - loop score|: cold {diff['cold']:.2e}, warm {diff['warm']:.2e}")
    print("peak RSS of a fresh Score_i2i process: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} MB" for k, v in mem.items()))
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
