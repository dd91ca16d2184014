"""Run one training stage in a (possibly multi-process) torchrun job and dump, per rank, the trained
parameters and the advantages of every iteration. Used by tests/training/test_multiprocess.py:

    torchrun --nproc_per_node 2 tests/ddp_worker.py STAGE OUT_DIR CHECKPOINT DATA [extra flags]
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from uae.config import parse_config  # noqa: E402


def main() -> None:
    stage, out, ckpt, data, *extra = sys.argv[1:]
    rank = int(os.environ.get("RANK", 0))
    advantages, captioned = [], []
    if stage == "sft":
        from uae.methods.sft import SFTConfig
        from uae.training.run import Run
        from uae.methods.sft import SFTRecipe

        cfg = parse_config(SFTConfig, ["--config", str(ROOT / "configs/sft/tiny.yaml"), "--checkpoint", ckpt,
                                       "--data", data, "--output_dir", out, "--validation_steps", "0", *extra])
        run = Run(cfg, "test")
        recipe = SFTRecipe(run)
        run.train(recipe, cfg.max_steps, "sft")
    else:
        import uae.methods.g4u
        import uae.rl.iteration
        import uae.methods.u4g
        from uae.methods.cold_start import ColdStartRecipe
        from uae.methods import METHODS
        from uae.training.run import Run

        real = uae.rl.iteration.group_advantages

        def record(*a, **k):  # every iteration's advantages, as both RL stages compute them
            res = real(*a, **k)
            advantages.append(res.values.cpu())
            return res

        uae.rl.iteration.group_advantages = record
        preset = {"u4g": "tiny_u4g.yaml", "g4u": "tiny_g4u.yaml", "cold_start": "tiny_cold_start.yaml"}[stage]
        cfg = parse_config(METHODS[stage].config, ["--config", str(ROOT / "configs/grpo" / preset), "--stage", stage,
                                                  "--checkpoint", ckpt, "--data", data, "--output_dir", out,
                                                  "--scorer_weights", "tiny", "--image_log_steps", "0", *extra])
        run = Run(cfg, "test")
        if os.environ.get("UAE_TEST_CAPTION_SKEW"):
            # Rank 1 samples other captions than rank 0 would (as another GPU's kernels may), and
            # every rank counts the images it captions.
            from uae.models.encoder import UAEEncoder

            real_caption = UAEEncoder.caption

            def caption(self, images, **kw):
                captioned.extend([1] * len(images))
                out = real_caption(self, images, **kw)
                return [c + " (sampled on rank 1)" for c in out] if rank == 1 else out

            UAEEncoder.caption = caption
        reward = None
        if os.environ.get("UAE_TEST_REWARD") == "one_flat_image":
            # A caption-length reward, except for one reference whose reward is flat: a process whose
            # share holds only that reference's group has no signal at all.
            def reward(images, keys, references, prompts):
                return [1.0 if k == "astronaut.jpg" else float(len(p.split())) for k, p in zip(keys, prompts)]
        elif os.environ.get("UAE_TEST_REWARD") == "caption_words":
            # Whole numbers: equal on any number of processes, so advantages carry no float noise (the
            # tiny models' image rewards differ by ~1e-5 within a group, their rounding by ~1e-7).
            def reward(images, keys, references, prompts):
                return [float(len(p.split())) for p in prompts]
        recipe = ColdStartRecipe(run) if stage == "cold_start" else \
            {"u4g": uae.methods.u4g.U4GRecipe, "g4u": uae.methods.g4u.G4URecipe}[stage](run, reward=reward)
        run.train(recipe, cfg.max_steps, stage)
    torch.save({"params": [p.detach().cpu().clone() for p in recipe.trainable], "advantages": advantages,
                "captioned": len(captioned)},
               Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
