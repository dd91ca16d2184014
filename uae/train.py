"""The training command lines: `train_sft.py` (`sft_main`) and `train_grpo.py` (`grpo_main`), over
the registry of methods (uae.methods.METHODS).

`train_grpo.py --stage NAME` parses that method's config and runs its recipe;
`--stage all` runs the three in sequence, each from the previous stage's final/, into
<output_dir>/<stage>/: a flag or a top-level YAML key goes to every stage that has the setting, a
YAML section named after a stage (`u4g: {learning_rate: ...}`) to that stage only.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from uae.cli import script_main, setup_logging, with_named_config
from uae.config import parse_config, parse_configs, read_yaml
from uae.data import read_items, validate
from uae.errors import UAEError
from uae.methods import METHODS, SEQUENCE, method
from uae.random_weights import from_tiny
from uae.scoring.scorers import resolve_scorer_weights
from uae.training.run import Run

logger = logging.getLogger("uae.grpo")


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` (`--flag X` or `--flag=X`) on the command line, the last one as argparse
    reads it; None when absent."""
    argv, value = list(argv), None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def requested_stage(argv: Sequence[str]) -> str:
    """`--stage` from the command line, else from the --config YAML, else u4g."""
    stage, path = flag_value(argv, "--stage"), flag_value(argv, "--config")
    if stage is not None:
        return stage
    return str(read_yaml(path).get("stage", "u4g")) if path else "u4g"


def parse(argv: Sequence[str] | None = None, description: str | None = None) -> list:
    """The config of each stage to run, in order."""
    argv = with_named_config(sys.argv[1:] if argv is None else argv, "grpo")
    stage = requested_stage(argv)
    if stage != "all":
        return [parse_config(method(stage).config, argv, description)]
    refuse_one_stage_config(argv)
    configs = parse_configs({s: METHODS[s].config for s in SEQUENCE}, argv, description, drop=("stage",))
    return [configs[s] for s in SEQUENCE]


def refuse_one_stage_config(argv: Sequence[str]) -> None:
    """`--stage all` with a config written for one stage (`stage: u4g`) is refused: its top-level keys
    would reach every stage, giving stages 1 and 2 stage 3's learning rate, group size, clip range
    and KL weight. A config for all stages says `stage: all` (or nothing) and holds a section per
    stage (configs/grpo/all.yaml)."""
    path = flag_value(argv, "--config")
    stage = read_yaml(path).get("stage", "all") if path else "all"
    if stage != "all":
        raise UAEError(f"--stage all --config {path}: a one-stage config (stage: {stage}) would give every stage "
                       f"its settings; use a config with a section per stage (configs/grpo/all.yaml, "
                       f"configs/grpo/tiny_all.yaml), or --stage {stage}")


SAFE_LAUNCH_CONFIGS = "configs/accelerate/single_gpu.yaml, multi_gpu_ddp.yaml or multi_node.yaml (DDP)"


def refuse_sharded_launch(stage: str) -> None:
    """Unified-GRPO runs data-parallel (DDP) only; an FSDP or DeepSpeed launch is refused before
    anything loads. Each stage trains a LoRA (and the cold start the projector) that fits every GPU
    whole (bench/memory_plan.py), and none is correct sharded: under DeepSpeed,
    `accelerator.backward` outside `accelerator.accumulate()` steps the engine at every backward
    (each micro-batch x timestep would become its own optimizer step, with a loss normalised for
    the whole share), and the cold start averages its DiT LoRA's gradients itself; under FSDP,
    stage 3's rollouts and KL reference run on the unwrapped DiT, whose parameters the prepared
    module has sharded. Read from the launch's environment (accelerate launch sets
    ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED from the config file), so that the refusal also
    holds where accelerate would fall back to DDP (on CPU) or fail later (DeepSpeed not installed)."""
    from accelerate.utils import parse_flag_from_env

    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if parse_flag_from_env(env):
            raise UAEError(f"train_grpo.py --stage {stage}: {name} launches are not supported by Unified-GRPO "
                           f"({env} is set, e.g. by --config_file configs/accelerate/{name.lower()}*.yaml); every "
                           f"stage trains a LoRA that fits each GPU under DDP: launch with {SAFE_LAUNCH_CONFIGS}, "
                           "or accelerate launch --multi_gpu")


def run_stage(cfg, reward=None, last: bool = True):
    """One stage's run (the registered method `cfg.stage`); returns its final/ (on every process, once
    written). `reward` goes to a method that takes one. `last`: no stage follows in this process
    (which then leaves the process group)."""
    refuse_sharded_launch(cfg.stage)
    chosen = METHODS[cfg.stage]
    run = Run(cfg, f"uae_grpo_{cfg.stage}")
    recipe = chosen.recipe(run, reward=reward) if chosen.takes_reward else chosen.recipe(run)
    try:
        return run.train(recipe, cfg.max_steps, cfg.stage.replace("_", " "), last=last)
    finally:
        # A finished stage's models go before the next stage loads its own (`--stage all`; at full
        # size two UAEs are about 2 x 33 GB). The run, its Accelerator (which lists the prepared
        # models and optimizer), the optimizer's step hook and the recipe refer to one another:
        # reference cycles that only the collector frees, at a time of its choosing.
        run.acc.free_memory()
        del run, recipe
        free_memory()


def free_memory() -> None:
    """Collect what reference cycles hold now, and return the accelerator's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@script_main
def grpo_main(argv=None, reward=None, description: str | None = None) -> int:
    """`reward`: a reward callable (or uae.rl.rewards.Rewards) for the RL stages instead of the
    configured reward functions."""
    configs = parse(argv, description)
    setup_logging(configs[0].log_level)
    refuse_sharded_launch(configs[0].stage if len(configs) == 1 else "all")
    if len(configs) == 1:
        run_stage(configs[0], reward)
        return 0
    from accelerate.state import AcceleratorState

    checkpoint = configs[0].checkpoint
    weights = resolve_scorer_weights(configs[0].scorer_weights, from_tiny(checkpoint))  # tiny stays tiny after stage 1
    for n, cfg in enumerate(configs, 1):
        logger.info("stage %s from %s", cfg.stage, checkpoint)
        cfg = dataclasses.replace(cfg, checkpoint=checkpoint, output_dir=str(Path(cfg.output_dir) / cfg.stage),
                                  scorer_weights=weights)
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator per stage
        checkpoint = str(run_stage(cfg, reward, last=n == len(configs)))
    logger.info("all stages done: %s", checkpoint)
    return 0


@script_main
def sft_main(argv=None, description: str | None = None) -> int:
    """train_sft.py: parse SFTConfig (flags over --config YAML), check the data or train."""
    argv = with_named_config(sys.argv[1:] if argv is None else argv, "sft")
    cfg = parse_config(METHODS["sft"].config, argv, description=description)
    setup_logging(cfg.log_level)
    if cfg.validate_data:
        v = validate(read_items(cfg.data))
        logger.info("data %s: %s", cfg.data, v.report())
        return 1 if v.bad else 0
    run = Run(cfg, "uae_sft")
    run.train(METHODS["sft"].recipe(run), cfg.max_steps, "sft")
    return 0
