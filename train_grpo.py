"""Unified-GRPO (the paper's RL, never released): stage 1 cold start, stage 2 Generation for
Understanding (GRPO on the encoder's LoRA), stage 3 Understanding for Generation (Flow-GRPO on the
decoder's LoRA), or all three in sequence. Each stage is a method in uae/methods/ (its config, then
its recipe; `--help` with `--stage`).

    python train_grpo.py --stage u4g --config configs/grpo/tiny_u4g.yaml          # CPU, tiny, sample data
    python train_grpo.py --stage g4u --config configs/grpo/tiny_g4u.yaml
    python train_grpo.py --stage cold_start --config configs/grpo/tiny_cold_start.yaml
    python train_grpo.py --stage all --config configs/grpo/tiny_all.yaml
    accelerate launch --multi_gpu --num_processes 8 train_grpo.py --config configs/grpo/u4g.yaml \\
        --checkpoint zhiyuanyan1/UAE --data /data/images
"""

from uae.train import grpo_main as main

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
