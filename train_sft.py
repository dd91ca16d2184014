"""Decoder pre-training (SFT) on image + long caption pairs: projector + DiT (full or LoRA),
encoder frozen, SD3 rectified-flow loss. The settings: SFTConfig in uae/methods/sft.py
(`--help`); its recipe below it.

    python train_sft.py --config configs/sft/tiny.yaml                       # CPU, seconds, sample data
    accelerate launch --config_file configs/accelerate/... train_sft.py --config configs/sft/paper.yaml
    python train_sft.py --config configs/sft/tiny.yaml --resume_from_checkpoint latest
    python train_sft.py --data data.jsonl --validate_data                    # only check the data
"""

from uae.train import sft_main as main

if __name__ == "__main__":
    raise SystemExit(main(description=__doc__))
