"""The KL reference `start`: the trained weights as the stage began, kept on the side (a LoRA's
worth of memory, saved in the checkpoints) and swapped in for the reference's forward pass; and,
for a fully fine-tuned language model, a frozen copy of it swapped in as a module."""

from __future__ import annotations

import contextlib
import copy

import torch


def kl_reference(cfg, trainable, accelerator) -> "ReferenceWeights | None":
    """The KL's reference weights when the stage has a KL to the LoRA it started from (kept in the
    checkpoints: a resumed run keeps the same reference); None for no KL or the base model."""
    if not (cfg.beta and cfg.kl_reference == "start"):
        return None
    ref = ReferenceWeights(trainable)
    accelerator.register_for_checkpointing(ref)
    return ref


class ReferenceWeights:
    """The KL reference "start": the trained weights as they were when the stage began, kept on
    the side (a LoRA's worth of memory) and swapped in for the reference's forward pass."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.start = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def active(self):
        current = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.start):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self.params, current):
                    p.copy_(c)

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.start = [t.to(p.device) for t, p in zip(state["start"], self.params)]


class FrozenLanguageModel:
    """The KL reference of a full fine-tune of a captioner's language model (stage 2,
    --captioner_finetune full): a frozen copy of `model.model.language_model` as the stage began,
    in the dtype it was loaded in (bf16 with mixed precision: half the trained fp32 weights), put in
    the trained one's place for the reference's forward pass. The stage starts from the source
    checkpoint, so the reference `start` and `base` are both these weights, and a resumed run
    rebuilds the copy from the source (nothing to checkpoint). Built before the trained weights are
    cast to fp32 (Run casts them after the recipe's setup)."""

    def __init__(self, model):
        self.owner = model.model
        self.copy = copy.deepcopy(self.owner.language_model).requires_grad_(False).eval()

    @contextlib.contextmanager
    def active(self):
        trained = self.owner.language_model
        self.owner.language_model = self.copy
        try:
            yield
        finally:
            self.owner.language_model = trained
