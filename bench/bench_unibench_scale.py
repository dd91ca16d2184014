"""Benchmark: the Unified-Bench runner at the paper's scaled size (2,000 references).

Two measurements, on the tiny random-weight model (32-pixel images, 1 step without the negative
branch, 4-token captions, 1 torch thread: the per-image work made small, not the number of
references) and the tiny random scorers, on synthetic reference images (PIL/numpy, written to a
temporary folder):

  memory  the runner (Unified-Bench/run_unibench.py) in a fresh process per size, by default on 200
          and on 2,000 references; its peak resident memory is the kernel's high-water mark of
          that process (os.wait4's ru_maxrss), cross-checked by polling its RSS with psutil.
          Target: peak(2,000) / peak(200) <= 1.10 (memory does not grow with the references).
  resume  the runner on the first size's references, killed with SIGKILL once it has written
          --kill_after reconstructions, then run again: the rerun's log says how many references
          it found done, the files written before the kill keep their modification times (not
          redone), results.json covers every reference, and its scores and captions equal those of
          the uninterrupted run of the memory measurement (every caption and image has its own seed).

    python bench/bench_unibench_scale.py                          # 200 and 2,000 references
    python bench/bench_unibench_scale.py --sizes 50 500 --json bench/results/unibench_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, write_json

from uae.random_weights import build_checkpoint

RUNNER = ROOT / "Unified-Bench" / "run_unibench.py"
SCORERS = ("clip", "dinov2", "dinov3", "longclip")


def make_references(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n synthetic JPEG references, size x size: a colour gradient, a disc and noise, each different."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for i in range(n):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (xx * rng.random() + yy * rng.random())[..., None] / 2
        arr = a * (1 - t) + b * t + rng.normal(0, 12, (size, size, 3))
        im = Image.fromarray(arr.clip(0, 255).astype("uint8"))
        r = rng.integers(size // 8, size // 3 + 1)
        cx, cy = rng.integers(r, size - r + 1, 2)
        ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _pngs(folder: Path) -> dict[str, int]:
    """{file name: mtime_ns} of the finished files (atomic writes rename into place; temporaries start with '.')."""
    if not folder.is_dir():
        return {}
    return {e.name: e.stat().st_mtime_ns for e in os.scandir(folder) if not e.name.startswith(".")}


def run_runner(args, ckpt: Path, refs: Path, out: Path, log: Path, kill_after: int | None = None) -> dict:
    """One runner process. Returns its exit code, wall time, peak RSS (kernel high-water mark and
    polled) and, with `kill_after`, whether it was SIGKILLed after that many reconstructions."""
    import psutil

    cmd = [sys.executable, str(RUNNER), "--checkpoint", str(ckpt), "--ref_path", str(refs), "--output_dir", str(out),
           "--scorer_weights", "tiny", "--steps", str(args.steps), "--height", str(args.image_size),
           "--width", str(args.image_size), "--max_new_tokens", str(args.caption_tokens),
           "--guidance_scale", str(args.guidance_scale), "--batch_size", str(args.batch_size), "--num_workers", "0",
           "--no_cache"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UAE_CACHE": str(out.parent / "cache"), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        watch, polled, killed = psutil.Process(proc.pid), 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                polled = max(polled, watch.memory_info().rss)
            except psutil.Error:
                pass
            if kill_after is not None and not killed and len(_pngs(out / "recon")) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(args.poll_s)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, with its own rusage
    res = {"exit_code": proc.returncode, "seconds": time.perf_counter() - t0,
           "peak_rss_mb": usage.ru_maxrss / 1024, "peak_rss_mb_polled": polled / 2**20}
    if kill_after is not None:
        res["killed"] = killed
    elif proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
    return res


def measure_size(args, ckpt: Path, tmp: Path, n: int) -> dict:
    refs = make_references(tmp / f"refs_{n}", n, args.ref_size)
    out = tmp / f"run_{n}"
    res = run_runner(args, ckpt, refs, out, tmp / f"run_{n}.log")
    summary = json.loads((out / "results.json").read_text())["summary"]
    return {"references": n, **res, "seconds_per_reference": res["seconds"] / n,
            "valid": summary["valid"], "failed": summary["failed"]}


def measure_resume(args, ckpt: Path, tmp: Path, n: int, kill_after: int) -> dict:
    """Kill a run after `kill_after` reconstructions, rerun it, and check what was redone."""
    refs, out = tmp / f"refs_{n}", tmp / "resumed"
    killed = run_runner(args, ckpt, refs, out, tmp / "killed.log", kill_after=kill_after)
    if not killed["killed"]:
        raise RuntimeError(f"the run finished before {kill_after} reconstructions were seen: use more references")
    recon_before, captions_before = _pngs(out / "recon"), _pngs(out / "captions")
    killed["results_json_written"] = (out / "results.json").exists()
    leftovers = sorted(p.name for p in (out / "recon").iterdir() if p.name.startswith("."))
    rerun = run_runner(args, ckpt, refs, out, tmp / "rerun.log")
    log = (tmp / "rerun.log").read_text()
    m = re.search(r"(\d+) reference\(s\); (\d+) already done, (\d+) to caption", log)
    recon_after, captions_after = _pngs(out / "recon"), _pngs(out / "captions")
    result = json.loads((out / "results.json").read_text())
    straight = json.loads((tmp / f"run_{n}" / "results.json").read_text())
    diff = max(abs(result[s][k] - straight[s][k]) for s in SCORERS for k in straight[s])
    return {
        "references": n, "kill_after": kill_after,
        "killed_run": killed,
        "at_kill": {"reconstructions": len(recon_before), "captions": len(captions_before),
                    "temporary_files_left": len(leftovers)},
        "rerun": {**rerun, "log_references": int(m[1]) if m else None, "log_already_done": int(m[2]) if m else None,
                  "log_to_do": int(m[3]) if m else None},
        "redone_reconstructions": sum(recon_after.get(k) != v for k, v in recon_before.items()),
        "rewritten_captions": sum(captions_after.get(k) != v for k, v in captions_before.items()),
        "new_reconstructions": len(set(recon_after) - set(recon_before)),
        "final": {"pairs": result["summary"]["pairs"], "valid": result["summary"]["valid"],
                  "failed": result["summary"]["failed"], "captions": sum(v is not None for v in result["captions"].values())},
        "max_abs_score_diff_vs_uninterrupted": diff,
        "captions_equal_uninterrupted": result["captions"] == straight["captions"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000], help="numbers of references, each in a fresh process")
    ap.add_argument("--ref_size", type=int, default=32, help="side of the synthetic references in pixels")
    ap.add_argument("--image_size", type=int, default=32, help="side of the reconstructions (a multiple of 16)")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps")
    ap.add_argument("--caption_tokens", type=int, default=4, help="caption length limit in tokens")
    ap.add_argument("--guidance_scale", type=float, default=1.0, help="the runner's --guidance_scale (1: no negative "
                                                                      "branch, half the DiT work)")
    ap.add_argument("--batch_size", type=int, default=16, help="the runner's --batch_size")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the runner (OMP_NUM_THREADS; on a shared 2-core machine 2 threads ran "
                         "several times slower than 1)")
    ap.add_argument("--kill_after", type=int, default=None,
                    help="SIGKILL the resume run after this many reconstructions (default: a third of the first size; "
                         "0: skip the resume check)")
    ap.add_argument("--poll_s", type=float, default=0.02, help="seconds between RSS polls")
    ap.add_argument("--max_ratio", type=float, default=1.10, help="target: peak RSS of the largest / the smallest size")
    ap.add_argument("--keep", default=None, help="keep references and run folders here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    sizes = sorted(set(args.sizes))
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        ckpt = tmp / "ckpt"
        if not ckpt.exists():
            build_checkpoint(ckpt, "tiny", seed=0)
        runs = [measure_size(args, ckpt, tmp, n) for n in sizes]
        kill_after = max(1, sizes[0] // 3) if args.kill_after is None else args.kill_after
        resume = measure_resume(args, ckpt, tmp, sizes[0], kill_after) if kill_after else None
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    res = {"machine": machine(), "settings": {k: getattr(args, k) for k in
                                              ("ref_size", "image_size", "steps", "caption_tokens", "guidance_scale",
                                               "batch_size", "threads")},
           "runs": runs, "peak_rss_ratio": ratio, "max_ratio": args.max_ratio, "within_target": ratio <= args.max_ratio,
           "resume": resume}
    print(f"Unified-Bench runner at scale ({res['machine']}); tiny model and scorers, {args.ref_size}px references, "
          f"{args.image_size}px reconstructions, {args.steps} step(s), guidance {args.guidance_scale}, "
          f"{args.caption_tokens} caption tokens, batch {args.batch_size}, {args.threads} torch thread(s); each size in "
          "a fresh process")
    print(f"{'references':>10}{'peak RSS MB':>13}{'(polled)':>10}{'seconds':>10}{'s/ref':>8}{'valid':>7}")
    for r in runs:
        print(f"{r['references']:>10}{r['peak_rss_mb']:>13.0f}{r['peak_rss_mb_polled']:>10.0f}{r['seconds']:>10.1f}"
              f"{r['seconds_per_reference']:>8.3f}{r['valid']:>7}")
    print(f"peak RSS {runs[-1]['references']} / {runs[0]['references']} references: {ratio:.3f}x "
          f"(target <= {args.max_ratio:.2f}x: {'met' if res['within_target'] else 'NOT met'})")
    if resume:
        r = resume
        print(f"resume: {r['references']} references, SIGKILL after {r['at_kill']['reconstructions']} reconstructions "
              f"({r['at_kill']['captions']} captions, {r['at_kill']['temporary_files_left']} temporary file(s) left); "
              f"rerun log: {r['rerun']['log_already_done']} already done, {r['rerun']['log_to_do']} to do; "
              f"redone {r['redone_reconstructions']} reconstruction(s), rewrote {r['rewritten_captions']} caption(s), "
              f"made {r['new_reconstructions']} new; results.json {r['final']['valid']}/{r['final']['pairs']} valid; "
              f"max |score - uninterrupted| {r['max_abs_score_diff_vs_uninterrupted']:.2e}, captions equal: "
              f"{r['captions_equal_uninterrupted']}")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
