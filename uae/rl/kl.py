"""The KL reference `start`: the trained weights as the stage began, kept on the side (a LoRA's
worth of memory, saved in the checkpoints) and swapped in for the reference's forward pass; and,
for a fully fine-tuned language model, a frozen copy of it swapped in as a module."""

from __future__ import annotations

import contextlib
import copy

import torch


def k3_kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
          old_log_prob: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) by the k3 estimator, exp(ref - lp) - (ref - lp) - 1, from the
    log-probabilities of the sampled tokens. With `old_log_prob` (the sampling policy's), multiplied
    by the importance ratio rho = exp(lp - old), which stays differentiable: TRL's
    `use_bias_correction_kl` (its default from 1.16 on; DeepSeek-V3.2, arXiv 2512.02556), which
    turns the on-policy gradient of the term from 1 - exp(ref - lp) into lp - ref, the unbiased
    gradient of the reverse KL (the tokens were sampled from pi_old, not pi_theta). Its value is the
    same on-policy (rho = 1); only the gradient changes, and only when beta > 0."""
    d = ref_log_prob - log_prob
    kl = torch.exp(d) - d - 1
    return kl if old_log_prob is None else kl * torch.exp(log_prob - old_log_prob)


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
