"""What a trainer trains, as data: each recipe's `configure(model, cfg)` (a static method of the
recipe class) wraps its LoRAs, marks what trains and returns its `Parts`, which its `setup` returns
inside the run's `Setup` (Run then casts and wraps them). The recipe runs it on the loaded model;
bench/memory_plan.py runs the very same method on full-size models built on the meta device, to
count bytes without a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uae.models.decoder import add_dit_lora, unreachable_modules


@dataclass
class Parts:
    groups: dict[str, list[torch.nn.Parameter]]    # trained parameters, by optimizer group
    prepared: dict[str, torch.nn.Module]            # modules accelerate wraps (DDP / FSDP), by name: llm, projector, dit
    freed: tuple[str, ...] = ()                     # modules released once set-up is done ("encoder")

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups.values() for p in g]


def train_lora_only(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze `module` but its LoRA weights; returns them."""
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)
    return [p for p in module.parameters() if p.requires_grad]


def train_dit(dit, lora_only: bool = True) -> list[torch.nn.Parameter]:
    """Freeze the DiT but its LoRA weights (or, `lora_only` False, but every weight), leaving out the
    modules whose output never reaches the image (uae.models.decoder.unreachable_modules: a
    checkpoint's dit_lora may hold a LoRA there, which then stays as it was); returns what trains."""
    unreachable = tuple(name + "." for name in unreachable_modules(dit))
    for n, p in dit.named_parameters():
        p.requires_grad_(("lora_" in n or not lora_only) and not n.startswith(unreachable))
    return [p for p in dit.parameters() if p.requires_grad]


def ensure_dit_lora(dit, cfg, targets=None) -> None:
    """The DiT's LoRA: the checkpoint's dit_lora when it has one, else a new one of the config's
    rank and alpha on `targets` (default the config's lora_target_modules), none on the modules
    whose output never reaches the image."""
    from peft import LoraConfig  # peft takes seconds to import: only where a LoRA is made

    if not getattr(dit, "peft_config", None):
        add_dit_lora(dit, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                     target_modules=list(targets or cfg.lora_target_modules),
                                     exclude_modules=unreachable_modules(dit)))
