"""Run one training stage in a (possibly multi-process) torchrun job and dump, per rank, the trained
parameters and the advantages of every iteration. Used by tests/test_multiprocess.py:

    torchrun --nproc_per_node 2 tests/ddp_worker.py STAGE OUT_DIR CHECKPOINT DATA [extra flags]
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from uae.config import parse_config  # noqa: E402


def main() -> None:
    stage, out, ckpt, data, *extra = sys.argv[1:]
    rank = int(os.environ.get("RANK", 0))
    advantages = []
    if stage == "sft":
        import train_sft
        from uae.training.sft import SFTRecipe

        cfg = parse_config(train_sft.SFTConfig, ["--config", str(ROOT / "configs/sft/tiny.yaml"), "--checkpoint", ckpt,
                                                 "--data", data, "--output_dir", out, "--validation_steps", "0", *extra])
        recipe = SFTRecipe(cfg)
    else:
        import train_grpo
        import uae.rl.stages as stages
        from uae.rl.cold_start import ColdStartRecipe

        real = stages.group_advantages

        def record(*a, **k):
            res = real(*a, **k)
            advantages.append(res.values.cpu())
            return res

        stages.group_advantages = record
        preset = {"u4g": "tiny.yaml", "g4u": "tiny_g4u.yaml", "cold_start": "tiny_cold_start.yaml"}[stage]
        cfg = parse_config(train_grpo.GRPOConfig, ["--config", str(ROOT / "configs/grpo" / preset), "--stage", stage,
                                                   "--checkpoint", ckpt, "--data", data, "--output_dir", out,
                                                   "--scorer_weights", "tiny", "--image_log_steps", "0", *extra])
        recipe = ColdStartRecipe(cfg) if stage == "cold_start" else \
            {"u4g": stages.U4GRecipe, "g4u": stages.G4URecipe}[stage](cfg)
    recipe.train()
    torch.save({"params": [p.detach().cpu().clone() for p in recipe.trainable], "advantages": advantages},
               Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
