"""The precision policy of every trainer, decided here once.

With `mixed_precision` bf16 (or fp16), frozen weights (a DiT or an LLM whose LoRA alone trains,
the VAE, the text encoders, the scorers) are loaded in that dtype: half the memory of fp32. What
trains (LoRAs, the projector, a fully fine-tuned DiT) and the optimizer state stay fp32, and the
forward passes run under autocast (diffusers' training scripts: `cast_training_params`). A part
that trains fully is loaded in fp32 from the start, never rounded through bf16. With "no",
everything is fp32. Saved weights keep the dtypes of the files they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    frozen: torch.dtype                  # dtype of weights that do not train
    trained: torch.dtype = torch.float32  # dtype of weights that train, and of their optimizer state

    def load_dtypes(self, fully_trained: Iterable[str] = ()) -> dict[str, torch.dtype]:
        """The dtype each part is loaded in: the frozen dtype, fp32 for the parts in
        `fully_trained` ("dit", "projector": every weight of them trains)."""
        return {part: self.trained if part in set(fully_trained) else self.frozen
                for part in ("llm", "projector", "dit", "vae")}

    def cast_trained(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Trained parameters in fp32 (a LoRA wrapped around a bf16 layer is already: PEFT's
        autocast_adapter_dtype); optimizer state follows the parameters' dtype."""
        for p in params:
            if p.dtype != self.trained:
                p.data = p.data.to(self.trained)


def precision_policy(mixed_precision: str) -> Precision:
    return Precision(frozen=DTYPES[mixed_precision])
