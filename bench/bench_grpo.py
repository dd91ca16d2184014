"""Benchmark: where the time of one Unified-GRPO stage-3 (u4g) iteration goes.

Builds a random checkpoint of the given preset (tiny, or mid: a DiT whose forward takes tens of
milliseconds on a 2-core CPU), runs a few iterations on the sample references, and splits each
iteration's wall time into sampling (rollouts incl. prompt embedding and VAE decode), reward (the
part not overlapped with sampling), training forward/backward + optimizer, and everything else
(advantages, gathering, metrics, logging: measured as wall time minus the three phases). The first
iteration is a warm-up and is not counted. Also prints one DiT forward's time at the same size.

    python bench/bench_grpo.py --preset mid --iterations 4
    python bench/bench_grpo.py --preset tiny --iterations 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid", help="model preset (tiny, mid, or a YAML path)")
    ap.add_argument("--iterations", type=int, default=4, help="timed iterations (plus one warm-up)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--num_steps", type=int, default=10)
    ap.add_argument("--group_size", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from accelerate.state import AcceleratorState

    import train_grpo
    from bench_score_i2i import machine
    from uae.rl import stages
    from uae.tiny import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_checkpoint(tmp / "ckpt", args.preset)
        wall: list[float] = []
        real_iteration = stages.U4GRecipe.iteration

        def timed(self, *a, **k):
            t0 = time.perf_counter()
            out = real_iteration(self, *a, **k)
            wall.append(time.perf_counter() - t0)
            return out

        stages.U4GRecipe.iteration = timed
        t_loop = time.perf_counter()
        try:
            AcceleratorState._reset_state(reset_partial_state=True)
            code = train_grpo.main(["--config", str(ROOT / "configs/grpo/tiny.yaml"), "--checkpoint", str(ckpt),
                                    "--data", str(ROOT / "Unified-Bench/UniBench/sample"), "--output_dir", str(tmp / "run"),
                                    "--scorer_weights", "tiny", "--resolution", str(args.resolution),
                                    "--num_steps", str(args.num_steps), "--group_size", str(args.group_size),
                                    "--prompts_per_iteration", str(args.prompts),
                                    "--sample_batch_size", str(args.group_size * args.prompts),
                                    "--max_iterations", str(args.iterations + 1), "--checkpointing_steps", "0",
                                    "--image_log_steps", "0", "--log_level", "WARNING"])
        finally:
            stages.U4GRecipe.iteration = real_iteration
        t_loop = time.perf_counter() - t_loop
        if code != 0:
            raise SystemExit(code)
        rec = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()][1:]
        # One DiT forward (CFG batch) at the benchmark's size, for scale.
        from diffusers import SD3Transformer2DModel

        dit = SD3Transformer2DModel.from_pretrained(ckpt / "dit").eval()
        side = args.resolution // 8
        b = args.group_size * args.prompts
        x = torch.randn(2 * b, dit.config.in_channels, side, side)
        emb = torch.randn(2 * b, 60, dit.config.joint_attention_dim)
        pooled = torch.randn(2 * b, dit.config.pooled_projection_dim)
        with torch.no_grad():
            dit(hidden_states=x, timestep=torch.full((2 * b,), 500.0), encoder_hidden_states=emb, pooled_projections=pooled)
            t0 = time.perf_counter()
            for _ in range(3):
                dit(hidden_states=x, timestep=torch.full((2 * b,), 500.0), encoder_hidden_states=emb,
                    pooled_projections=pooled)
            t_fwd = (time.perf_counter() - t0) / 3
    walls = wall[1:]
    phases = {k: sum(r[f"time_{k}"] for r in rec) / len(rec) for k in ("sampling", "reward", "train")}
    step = sum(walls) / len(walls)
    phases["other"] = step - sum(phases.values())
    res = {"machine": machine(), "preset": args.preset, "resolution": args.resolution, "num_steps": args.num_steps,
           "samples_per_iteration": args.group_size * args.prompts, "seconds_per_iteration": step,
           "phase_seconds": phases, "phase_share": {k: v / step for k, v in phases.items()},
           "dit_forward_cfg_batch_seconds": t_fwd}
    print(f"GRPO u4g iteration ({res['machine']}); preset {args.preset}, {args.resolution}px, {args.num_steps} steps, "
          f"{res['samples_per_iteration']} rollouts; one DiT forward (CFG batch of {2 * b}): {t_fwd * 1000:.1f} ms")
    print(f"{'phase':<10}{'seconds':>10}{'share':>8}")
    for k, v in phases.items():
        print(f"{k:<10}{v:>10.3f}{v / step:>8.1%}")
    print(f"{'iteration':<10}{step:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
