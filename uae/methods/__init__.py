"""The training methods, one module each: its config at the top (a `TrainConfig` subclass, the
command line of its script), its recipe below (what `uae.training.run.Run` runs: the `Recipe`
protocol). This registry is the one list of them: `train_sft.py`, `train_grpo.py` (`--stage NAME`
and `--stage all`), `bench/memory_plan.py` and the README's table read it.

A new method is one new module here plus one line in `METHODS` (or, from your own code,
`register(Method(...))` before calling `uae.train.grpo_main`).
"""

from __future__ import annotations

from dataclasses import dataclass

from uae.errors import UAEError
from uae.methods.cold_start import ColdStartConfig, ColdStartRecipe
from uae.methods.g4u import G4UConfig, G4URecipe
from uae.methods.sft import SFTConfig, SFTRecipe
from uae.methods.u4g import U4GConfig, U4GRecipe
from uae.training.run import TrainConfig


@dataclass(frozen=True)
class Method:
    """A training method: its name (`--stage NAME` of its command), its config and recipe classes,
    the script that runs it, whether it takes a reward (`train_grpo.py`'s `reward=` callable) and a
    one-line summary (the README's table)."""

    name: str
    config: type[TrainConfig]
    recipe: type
    command: str  # "train_sft.py" or "train_grpo.py"
    summary: str
    takes_reward: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", SFTConfig, SFTRecipe, "train_sft.py",
           "decoder pre-training on image + long caption pairs: projector + DiT (LoRA or full), encoder frozen"),
    Method("cold_start", ColdStartConfig, ColdStartRecipe, "train_grpo.py",
           "Unified-GRPO stage 1: the reconstruction loss through the decoder's sampling into the encoder's LoRA, "
           "the projector and the decoder's LoRA"),
    Method("g4u", G4UConfig, G4URecipe, "train_grpo.py",
           "Unified-GRPO stage 2: GRPO on the captioner's LoRA, captions as actions, reconstruction as reward",
           takes_reward=True),
    Method("u4g", U4GConfig, U4GRecipe, "train_grpo.py",
           "Unified-GRPO stage 3: Flow-GRPO on the decoder's LoRA, the encoder's captions as prompts",
           takes_reward=True),
)}

# `train_grpo.py --stage all`: the paper's three stages in order, each from the previous one's final/.
SEQUENCE = ("cold_start", "g4u", "u4g")


def register(method: Method) -> Method:
    """Add a method (a user's, or a test's) to the registry; its name must be new."""
    if method.name in METHODS or method.name == "all":
        raise UAEError(f"a training method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def methods_of(command: str) -> dict[str, Method]:
    """The methods `command` (train_sft.py or train_grpo.py) runs."""
    return {name: m for name, m in METHODS.items() if m.command == command}


def method(name: str, command: str = "train_grpo.py") -> Method:
    """The method `name` of `command`, or a one-line error listing the choices."""
    choices = methods_of(command)
    if name not in choices:
        extra = ", all" if command == "train_grpo.py" else ""
        raise UAEError(f"{command} --stage {name}: choose from {', '.join(choices)}{extra}")
    return choices[name]
