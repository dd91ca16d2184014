"""How far a learning rate moves Janus's language model in stage 2's steps: a new LoRA (rank 16, alpha
32, the language model's attention and MLP: G4UConfig's defaults) against full fine-tuning of the
language model (--captioner_finetune full), measured on random Janus checkpoints (tiny, and mid:
bench/janus_batching.py's sizes) on the CPU.

The signal is GRPO's: each step a policy-gradient loss, -mean(advantage x log p(token)), over a fresh
batch of random text tokens (8 sequences of 64) with fresh advantages of +-1, so that, as in GRPO, the
gradient's direction changes from step to step; AdamW as the toolkit builds it (betas 0.9 / 0.999,
eps 1e-8, weight decay 1e-4, gradients clipped to norm 1), fp32. After `--steps` steps (250:
configs/grpo/g4u_janus.yaml's max_steps) it reports, over the weight matrices the LoRA targets,

    relative change = ||W_after - W_before||_F / ||W_before||_F

(for the LoRA, W_after - W_before is its merged delta, alpha / r x B A), and the LoRA's ||B||_F, which
starts at 0. A random checkpoint's weights have the scale of a trained one's (std 0.02), but its
gradients are not those of a real reward: read the table for orders of magnitude.

    python bench/janus_lora_lr.py                 # tiny and mid, four learning rates (minutes)
    python bench/janus_lora_lr.py --sizes tiny --steps 20 --learning_rates 1e-4   # quick
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from common import machine, write_json

import torch

from uae.cli import setup_logging
from uae.random_weights.unified import build_janus

logger = logging.getLogger("uae.bench.janus_lora_lr")

TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
RANK, ALPHA = 16, 32.0


def _model(folder: Path, size: str):
    from janus_batching import spec
    from transformers import JanusForConditionalGeneration

    path = build_janus(folder / size, seed=0, spec=spec(size))
    return JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def _targets(model) -> dict[str, torch.nn.Linear]:
    import re

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(TARGETS, n)}


def run(base, mode: str, lr: float, steps: int, batch: int, length: int, seed: int) -> dict:
    """`steps` AdamW steps of the policy-gradient signal on a copy of `base`; the relative change."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    before = {n: m.weight.detach().clone() for n, m in _targets(model).items()}
    model.requires_grad_(False)
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
    else:
        model.model.language_model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    vocab = base.config.text_config.vocab_size
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        adv = torch.randint(0, 2, (batch, 1), generator=gen).float() * 2 - 1
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        loss = -(adv * logp).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        if mode == "lora":
            delta, b_norm = {}, 0.0
            for n, m in model.named_modules():
                if hasattr(m, "lora_B") and "default" in m.lora_B:
                    b = m.lora_B["default"].weight
                    delta[n.removeprefix("base_model.model.")] = m.scaling["default"] * b @ m.lora_A["default"].weight
                    b_norm += float(b.pow(2).sum())
            b_norm **= 0.5
        else:
            delta = {n: m.weight - before[n] for n, m in _targets(model).items()}
            b_norm = None
        num = sum(float(d.pow(2).sum()) for d in delta.values()) ** 0.5
        den = sum(float(w.pow(2).sum()) for w in before.values()) ** 0.5
    return {"mode": mode, "learning_rate": lr, "relative_change": num / den, "lora_B_norm": b_norm,
            "seconds": seconds}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=("tiny", "mid"))
    ap.add_argument("--learning_rates", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3])
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps (g4u_janus.yaml's max_steps)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    setup_logging("INFO")
    torch.manual_seed(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            base = _model(Path(d), size)
            for mode in ("full", "lora"):
                for lr in args.learning_rates:
                    logger.info("%s %s lr %g: %d steps", size, mode, lr, args.steps)
                    rows.append({"size": size, **run(base, mode, lr, args.steps, args.batch, args.length, args.seed)})
    res = {"machine": machine(), "steps": args.steps, "batch": args.batch, "length": args.length,
           "lora": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS}, "rows": rows}
    print(f"relative change of the targeted weights after {args.steps} AdamW steps ({res['machine']})")
    print(f"{'size':<5} {'mode':<5} {'lr':>8} {'rel. change':>12} {'||B||':>9} {'s':>6}")
    for r in rows:
        b = "" if r["lora_B_norm"] is None else f"{r['lora_B_norm']:9.2e}"
        print(f"{r['size']:<5} {r['mode']:<5} {r['learning_rate']:8.0e} {r['relative_change']:12.2e} {b:>9} "
              f"{r['seconds']:6.1f}")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
