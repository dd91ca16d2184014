"""Every benchmark, one command, one table of side-by-side ratios.

Each benchmark runs in its own process (so its peak memory is its own) and writes JSON; this
script prints one table and writes everything to --out (results.json + results.md with the
machine's description).

Profiles (sizes are data, in PROFILES below):
  small  tiny random models: the whole suite in about a minute on a CPU (what the tests run)
  cpu    this project's 2-core CPU: xs scorers (forward ~4 ms), mid-size UAE (a DiT forward of
         tens of milliseconds), 256 px
  gpu    one GPU, full-size random models built from configs/models/full.yaml and the scorers'
         full architectures (SD3.5-Large DiT, SD3 VAE, Qwen2.5-VL-3B, four ViT-L scorers),
         1024x1024 at 40 steps, bf16; nothing is downloaded (bench/gpu_check.sh)

    python bench/run_all.py --profile cpu --out bench/results/cpu
    bash bench/gpu_check.sh            # = --profile gpu;  bash bench/gpu_check.sh --small
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine

from uae.cli import setup_logging
from uae.files import atomic_write_json, atomic_write_text
from uae.random_weights import build_checkpoint

logger = logging.getLogger("uae.bench")
BENCH = ROOT / "bench"

PROFILES: dict[str, dict[str, list]] = {
    "small": {
        "score_i2i": ["--size", "tiny", "--pairs", 4, "--image_size", 128, "--workers", 0, "--floor_batch_sizes", 4],
        "demo": ["--preset", "tiny", "--size", 64, "--steps", 3, "--repeats", 1, "--caption_tokens", 8],
        "grpo": ["--preset", "tiny", "--iterations", 1, "--resolution", 64, "--num_steps", 3,
                 "--group_size", 2, "--prompts", 1, "--max_new_tokens", 8],
        "sft": ["--preset", "tiny", "--steps", 1, "--resolution", 64, "--batch_size", 1],
        "memory_plan": ["--preset", "tiny", "--settings", "u4g", "--act_preset", "", "--measure", "u4g",
                        "--measure_checkpoint", "{ckpt}", "--measure_resolution", 64],
    },
    "cpu": {
        "score_i2i": ["--size", "xs", "--pairs", 100],
        "demo": ["--preset", "mid", "--size", 256, "--steps", 10, "--repeats", 3, "--caption_tokens", 32],
        "grpo": ["--preset", "mid", "--iterations", 2, "--resolution", 256, "--num_steps", 10],
        "sft": ["--preset", "mid", "--steps", 3, "--resolution", 256, "--batch_size", 2],
        "memory_plan": ["--act_preset", "mid"],
    },
    "gpu": {  # "{ckpt}": the full-size random checkpoint built once at the start and shared by all
        "memory_plan": ["--act_preset", "", "--settings", "u4g", "--measure", "u4g", "--measure_checkpoint", "{ckpt}"],
        "demo": ["--checkpoint", "{ckpt}", "--size", 1024, "--steps", 40, "--repeats", 1, "--caption_tokens", 64],
        "grpo": ["--checkpoint", "{ckpt}", "--iterations", 1, "--resolution", 512, "--num_steps", 10,
                 "--group_size", 4, "--prompts", 1, "--max_new_tokens", 64, "--mixed_precision", "bf16",
                 "--gradient_checkpointing"],
        "sft": ["--checkpoint", "{ckpt}", "--steps", 2, "--resolution", 1024, "--batch_size", 1,
                "--mixed_precision", "bf16", "--gradient_checkpointing"],
        "score_i2i": ["--size", "full", "--pairs", 50, "--workers", 8, "--batch_size", 32, "--floor_batch_sizes", 32],
    },
}
SCRIPTS = {"score_i2i": "bench_score_i2i.py", "demo": "bench_demo.py", "grpo": "bench_grpo.py", "sft": "bench_sft.py",
           "memory_plan": "memory_plan.py"}
# Seconds a benchmark is expected to take on one H100 (the budget skips what would not fit, and says so).
GPU_SECONDS = {"memory_plan": 90, "demo": 60, "grpo_cold_start": 60, "grpo_g4u": 60, "grpo_u4g": 60, "sft": 60,
               "score_i2i": 45}
TARGETS = {"cold_vs_loop": ">= 2x (forward ~8 ms)", "warm_vs_cold": ">= 1.8x (ViT-B)", "cold_vs_floor": "<= 1.2x (ViT-B)",
           "decode": "<= 1.05x", "other": "other <= 15% (mid)"}


def run_one(name: str, flags: list, work: Path, key: str) -> tuple[dict | None, float, str]:
    out = work / f"{key}.json"
    cmd = [sys.executable, str(BENCH / SCRIPTS[name]), *map(str, flags), "--json", str(out)]
    logger.info("running %s", " ".join(cmd[1:]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        logger.error("%s failed (exit %d):\n%s", name, proc.returncode, tail)
        return None, wall, tail
    sys.stdout.write(proc.stdout)
    return json.loads(out.read_text()), wall, ""


def memory(r: dict) -> str:
    if "peak_gpu_mb" in r:
        return f"{r['peak_gpu_mb']:.0f} MB GPU"
    return f"{r['peak_rss_mb']:.0f} MB RSS"


def rows(results: dict) -> list[list[str]]:
    """One table: benchmark | measured | ours | reference | ratio (ours / reference) | target | peak memory."""
    out = []
    s = results.get("score_i2i")
    if s:
        p, mem = s["pairs_per_s"], memory(s["peak_memory"])
        size = f"Score_i2i, {s['size']} scorers, {s['pairs']} pairs"
        out += [[size, "pairs/s: cold vs per-pair loop", f"{p['cold']:.2f}", f"{p['loop']:.2f}",
                 f"{p['cold'] / p['loop']:.2f}x", TARGETS["cold_vs_loop"], mem],
                [size, "pairs/s: warm (cached references) vs cold", f"{p['warm']:.2f}", f"{p['cold']:.2f}",
                 f"{p['warm'] / p['cold']:.2f}x", TARGETS["warm_vs_cold"], mem],
                [size, "seconds: cold vs compute floor", f"{s['seconds']['cold']:.2f}", f"{s['seconds']['floor']:.2f}",
                 f"{s['ratios']['cold_vs_floor_time']:.2f}x", TARGETS["cold_vs_floor"], mem]]
    d = results.get("demo")
    if d:
        sec = d["seconds"]
        where = f"demo t2i, {d['preset']}, {d['size']}px, {d['steps']} steps"
        out += [[where, f"seconds: ours vs bare diffusers (prompt embedding {sec['prompt_embedding']:.3f} s apart)",
                 f"{sec['ours_decode']:.3f}", f"{sec['bare_pipeline']:.3f}", f"{d['ratio_ours_over_bare']:.3f}x",
                 TARGETS["decode"], memory(d)],
                [f"demo captioning, {d['preset']}", f"tokens/s ({d['caption_tokens']} tokens)",
                 f"{d['caption_tokens_per_second']:.1f}", "", "", "", memory(d)]]
    g = results.get("grpo")
    if g:
        for stage, r in g["stages"].items():
            sh = r["phase_share"]
            split = " / ".join(f"{k} {sh[k]:.0%}" for k in ("sampling", "reward", "train", "other"))
            out.append([f"GRPO {stage} step, {g['preset']}, {g['resolution']}px", f"seconds ({split})",
                        f"{r['seconds_per_step']:.3f}", "", f"other {sh['other']:.1%}", TARGETS["other"], memory(r)])
    f = results.get("sft")
    if f:
        out.append([f"SFT step, {f['preset']}, {f['resolution']}px, batch {f['batch_size']}", "seconds per step",
                    f"{f['seconds_per_step']:.3f}", "", "", "", memory(f)])
    m = (results.get("memory_plan") or {}).get("measured")
    if m:
        # On a GPU the peak is torch's allocator; on a CPU it is the process's resident memory, the
        # runtime (~0.9 GB) included, so that at tiny size the ratio is hundreds and says nothing.
        where = "torch's GPU allocator" if m["memory"] == "gpu" else "the whole process's RSS, runtime included"
        out.append([f"stage-3 step, {m['preset']} size",
                    f"GiB: measured peak ({where}) vs planned weights + gradients + optimizer",
                    f"{m['measured_peak_gib']:.2f}", f"{m['planned_without_activations_gib']:.2f}",
                    f"{m['measured_peak_gib'] / max(m['planned_without_activations_gib'], 1e-9):.2f}x",
                    "above 1x by the activations", m["memory"]])
    return out


def markdown(table: list[list[str]], header: str) -> str:
    cols = ["benchmark", "measured", "ours", "reference", "ratio (ours / reference)", "target", "peak memory"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, profile: str, total: float, walls: dict, results: dict, failures: dict,
                  skipped: dict) -> dict:
    """results.json as it stands (after every benchmark: an interrupted run keeps what it measured)."""
    summary = {"machine": machine(), "profile": profile, "seconds_total": total, "seconds_per_benchmark": walls,
               "results": results, "failed": failures, "skipped": skipped}
    atomic_write_json(out / "results.json", summary)
    return summary


def build_full_checkpoint(work: Path) -> Path:
    """The full-size random UAE, built on the GPU in bf16 (no download)."""
    cmd = [sys.executable, "-m", "uae.random_weights", "--preset", "full", "--out", str(work / "uae-full"),
           "--dtype", "bfloat16", "--device", "cuda"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    logger.info("built the full-size random checkpoint in %.0f s", time.perf_counter() - t0)
    return work / "uae-full"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", choices=list(PROFILES))
    ap.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="a subset of the benchmarks")
    ap.add_argument("--out", default=None, help="folder for results.json and results.md (default bench/results/PROFILE)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--budget_s", type=float, default=None,
                    help="wall-clock budget: a benchmark that would not finish within it (GPU_SECONDS) is skipped and "
                         "reported as such; what was measured is kept (results are written after each benchmark)")
    args = ap.parse_args(argv)
    setup_logging("INFO")
    out = Path(args.out or BENCH / "results" / args.profile)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        t_start = time.perf_counter()
        ckpt = build_full_checkpoint(work) if args.profile == "gpu" else None
        if ckpt is None and any("{ckpt}" in map(str, PROFILES[args.profile][n]) for n in args.only):
            # the small profile's stand-in for the shared checkpoint
            ckpt = build_checkpoint(work / "uae-tiny", "tiny", seed=0)
        results, walls, failures, skipped = {}, {}, {}, {}
        for name in [n for n in PROFILES[args.profile] if n in args.only]:
            flags = [str(ckpt) if f == "{ckpt}" else f for f in PROFILES[args.profile][name]]
            # GRPO: one process per stage, so each stage's peak memory is its own.
            runs = [(f"grpo_{st}", flags + ["--stage", st]) for st in ("cold_start", "g4u", "u4g")] \
                if name == "grpo" else [(name, flags)]
            for key, fl in runs:
                left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - t_start)
                if left is not None and left < GPU_SECONDS.get(key, 60):
                    skipped[key] = f"budget: {left:.0f} s left, about {GPU_SECONDS.get(key, 60)} s needed"
                    logger.warning("skipping %s (%s)", key, skipped[key])
                    continue
                res, walls[key], err = run_one(name, fl, work, key)
                if res is None:
                    failures[key] = err
                elif name == "grpo":
                    results.setdefault("grpo", {**res, "stages": {}})["stages"].update(res["stages"])
                else:
                    results[name] = res
                write_summary(out, args.profile, time.perf_counter() - t_start, walls, results, failures, skipped)
        total = time.perf_counter() - t_start
    header = (f"Benchmarks, profile `{args.profile}`, on {machine()}; {time.strftime('%Y-%m-%d')}; "
              f"whole suite {total:.0f} s")
    table = markdown(rows(results), header)
    print(table)
    summary = write_summary(out, args.profile, total, walls, results, failures, skipped)
    atomic_write_text(out / "results.md", table)
    logger.info("wrote %s and %s", out / "results.json", out / "results.md")
    if failures:
        logger.error("failed: %s", ", ".join(failures))
    summary["exit_code"] = 1 if failures else 0
    return summary


if __name__ == "__main__":
    raise SystemExit(main()["exit_code"])
