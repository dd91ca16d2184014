"""Benchmark: where the time of one Unified-GRPO step goes, for each stage.

Runs `train_grpo.py` for a few steps on random weights (a preset built here, or a checkpoint
folder) and the sample references, and splits each step's wall time as the stages log it:
  u4g / g4u    sampling (rollouts: captions or images, incl. prompt embedding and VAE decode),
               reward (the part not overlapped with sampling), train (forward/backward/optimizer),
               other (advantages, gathering, metrics: the step's wall time minus the three)
  cold_start   sampling = the differentiable reconstruction (conditioning, DiT schedule, VAE),
               reward = CLIP features and loss, train = backward + optimizer, other
The first step is a warm-up and is not counted. Also prints one DiT forward's time at the size,
and for g4u what its rollout saves by taking the old log-probs as the policy's own (one update per
rollout batch, TRL's shortcut) instead of computing them (side by side, in this process).

    python bench/bench_grpo.py --stage u4g --preset mid --iterations 3
    python bench/bench_grpo.py --stage all --preset tiny --resolution 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, peak_memory_mb, reset_peak_memory, sync, write_json

import torch
from accelerate.state import AcceleratorState

from uae.cli import setup_logging
from uae.methods.g4u import G4URecipe
from uae.random_weights import build_checkpoint
from uae.rl.iteration import iteration_share
from uae.runtime import resolve_device
from uae.train import grpo_main, parse
from uae.training.run import Run

STAGES = ("cold_start", "g4u", "u4g")
CONFIGS = {"u4g": "tiny_u4g.yaml", "g4u": "tiny_g4u.yaml", "cold_start": "tiny_cold_start.yaml"}
PHASES = ("sampling", "reward", "train", "other")


def sample_pairs(folder: Path) -> Path:
    """pairs.jsonl over the sample references (cold start reads image + reference caption)."""
    refs = sorted((ROOT / "Unified-Bench" / "UniBench" / "sample").glob("*.jpg"))
    lines = [json.dumps({"image": str(p), "caption": f"a photograph: {p.stem}"}) for p in refs]
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def dit_forward_seconds(ckpt: Path, resolution: int, batch: int, device, dtype) -> float:
    """One DiT forward over a CFG batch (2 x batch) at the benchmark's size, for scale."""
    from diffusers import SD3Transformer2DModel

    dit = SD3Transformer2DModel.from_pretrained(ckpt / "dit", torch_dtype=dtype).to(device).eval()
    side = resolution // 8
    kw = dict(hidden_states=torch.randn(2 * batch, dit.config.in_channels, side, side, device=device, dtype=dtype),
              timestep=torch.full((2 * batch,), 500.0, device=device),
              encoder_hidden_states=torch.randn(2 * batch, 60, dit.config.joint_attention_dim, device=device, dtype=dtype),
              pooled_projections=torch.randn(2 * batch, dit.config.pooled_projection_dim, device=device, dtype=dtype))
    with torch.no_grad():
        dit(**kw)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            dit(**kw)
        sync()
    del dit
    return (time.perf_counter() - t0) / 3


def run_stage(stage: str, ckpt: Path, work: Path, args) -> dict:
    out = work / f"run_{stage}"
    steps = args.iterations + 1
    flags = ["--config", str(ROOT / "configs" / "grpo" / CONFIGS[stage]), "--stage", stage, "--checkpoint", str(ckpt),
             "--output_dir", str(out), "--scorer_weights", args.scorer_weights, "--resolution", str(args.resolution),
             "--num_steps", str(args.num_steps), "--checkpointing_steps", "0", "--image_log_steps", "0",
             "--device", args.device, "--mixed_precision", args.mixed_precision, "--log_level", "WARNING",
             "--max_new_tokens", str(args.max_new_tokens)]
    if stage == "cold_start":
        flags += ["--data", str(sample_pairs(work)), "--max_steps", str(steps)]
    else:
        flags += ["--data", str(ROOT / "Unified-Bench" / "UniBench" / "sample"), "--group_size", str(args.group_size),
                  "--prompts_per_iteration", str(args.prompts), "--max_steps", str(steps)]
    if stage == "u4g":
        flags += ["--sample_batch_size", str(args.group_size * args.prompts)]
    if args.gradient_checkpointing:
        flags += ["--gradient_checkpointing"]
    AcceleratorState._reset_state(reset_partial_state=True)
    reset_peak_memory()
    code = grpo_main(flags)
    if code != 0:
        raise SystemExit(f"train_grpo.py --stage {stage} exited with {code}")
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    phases = {k: sum(r[f"time_{k}"] for r in rec) / len(rec) for k in PHASES}
    step = sum(phases.values())
    return {"seconds_per_step": step, "phase_seconds": phases, "phase_share": {k: v / step for k, v in phases.items()},
            "steps_timed": len(rec), **peak_memory_mb()}


def old_logprob_forward(ckpt: Path, work: Path, args, repeats: int = 2) -> dict:
    """Stage 2's rollout with and without the old log-probs forward, side by side in one process:
    with one update per rollout batch (inner_epochs 1) the old log-probs are the policy's own,
    detached (TRL's shortcut), so the rollout skips that forward; with inner_epochs > 1 it runs."""
    seconds = {}
    for inner in (1, 2):
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = parse(["--config", str(ROOT / "configs" / "grpo" / CONFIGS["g4u"]), "--checkpoint", str(ckpt),
                     "--data", str(ROOT / "Unified-Bench" / "UniBench" / "sample"), "--output_dir",
                     str(work / f"logprobs_{inner}"), "--scorer_weights", args.scorer_weights, "--device", args.device,
                     "--mixed_precision", args.mixed_precision, "--max_new_tokens", str(args.max_new_tokens),
                     "--group_size", str(args.group_size), "--prompts_per_iteration", str(args.prompts),
                     "--inner_epochs", str(inner), "--report_to", "none", "--log_level", "WARNING"])[0]
        run = Run(cfg, "bench")
        recipe = G4URecipe(run, reward=lambda *a: [])
        run.set_up(recipe)
        share = iteration_share(cfg, 0, len(recipe.refs), 1, 0)
        with recipe.acc.autocast():
            recipe.rollout(0, share)  # warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                recipe.rollout(0, share)
            sync()
        seconds[inner] = (time.perf_counter() - t0) / repeats
        del recipe
    return {"rollout_seconds_shortcut": seconds[1], "rollout_seconds_with_old_logprobs": seconds[2],
            "old_logprob_forward_seconds": seconds[2] - seconds[1]}


def shortcut_line(g: dict) -> str:
    """What taking the old log-probs as the policy's own saves, and of what."""
    saved = g["old_logprob_forward_seconds"]
    return (f"g4u rollout: {g['rollout_seconds_shortcut']:.3f} s with the old log-probs taken as the policy's own "
            f"(inner_epochs 1), {g['rollout_seconds_with_old_logprobs']:.3f} s computing them (inner_epochs 2): "
            f"the shortcut saves {saved:.3f} s per step (the old log-probs' forward), "
            f"{saved / g['seconds_per_step']:.1%} of the {g['seconds_per_step']:.3f} s step"
            + (" (negative: the forward is below this machine's timing noise)" if saved < 0 else ""))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=[*STAGES, "all"])
    ap.add_argument("--preset", default="mid", help="model preset to build (tiny, mid, full, or a YAML path)")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead of building --preset")
    ap.add_argument("--iterations", type=int, default=3, help="timed steps per stage (plus one warm-up)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--num_steps", type=int, default=10)
    ap.add_argument("--group_size", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max_new_tokens", type=int, default=32, help="caption length (g4u actions, u4g prompts)")
    ap.add_argument("--scorer_weights", default="tiny", help="reward scorers: tiny (random, offline) or official")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mixed_precision", default="no", help="no, bf16 (GPU)")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    # Read by huggingface_hub when it first loads (setup_logging, below): no module imported above loads it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging("WARNING")
    stages = STAGES if args.stage == "all" else (args.stage,)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(tmp / "ckpt", args.preset)
        results = {s: run_stage(s, ckpt, tmp, args) for s in stages}
        if "g4u" in stages:
            results["g4u"].update(old_logprob_forward(ckpt, tmp, args))
        dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
        # For scale, next to the stage that samples with the DiT (a full-size DiT is not reloaded per stage).
        t_fwd = dit_forward_seconds(ckpt, args.resolution, args.group_size * args.prompts, device, dtype) \
            if "u4g" in stages else None
    res = {"machine": machine(), "preset": args.checkpoint or args.preset, "resolution": args.resolution,
           "num_steps": args.num_steps, "rollouts_per_step": args.group_size * args.prompts,
           "dit_forward_cfg_batch_seconds": t_fwd, "stages": results}
    fwd = "" if t_fwd is None else \
        f"; one DiT forward (CFG batch of {2 * res['rollouts_per_step']}): {t_fwd * 1000:.1f} ms"
    print(f"GRPO step phases ({res['machine']}); {res['preset']}, {args.resolution}px, {args.num_steps} steps, "
          f"{res['rollouts_per_step']} rollouts (cold start: 1 image){fwd}")
    print(f"{'stage':<12}{'step s':>9}" + "".join(f"{k:>16}" for k in PHASES))
    for s, r in results.items():
        print(f"{s:<12}{r['seconds_per_step']:>9.3f}" +
              "".join(f"{r['phase_seconds'][k]:>9.3f} ({r['phase_share'][k]:>4.0%})" for k in PHASES))
    if "g4u" in results:
        print(shortcut_line(results["g4u"]))
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
