"""What every trainer is built with: its accelerator (mixed precision, trackers, project folder)
and its optimizer."""

from __future__ import annotations

from pathlib import Path

import torch

from uae.errors import UAEError


def make_accelerator(cfg, project_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       log_with=trackers or None,
                       project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs")),
                       cpu=cfg.device == "cpu")


def make_optimizer(cfg, params):
    """The optimizer every trainer uses: AdamW with the config's betas, epsilon and weight decay
    (`params`: parameters, or param groups with their own `lr`); `optimizer: adamw8bit` is
    torchao's 8-bit AdamW, whose two moments take a quarter of fp32 AdamW's memory."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise UAEError("--optimizer adamw8bit needs torchao: pip install torchao (or use --optimizer adamw)") from None
        return AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
