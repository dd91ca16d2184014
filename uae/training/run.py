"""One training run, whatever the method: the accelerator, the resolved config beside the results,
resume, the JSONL logs, the trackers, EMA (counting the optimizer's steps itself), the progress
bar, the checkpoint cadence, `final/` in the official layout, the end-of-run plots and
`end_training`. A method provides only what is its own, the `Recipe` protocol below (composition,
not inheritance, as torchtune's recipe interface): its `setup` returns what trains (`Setup`), Run
prepares it and hands the prepared objects back (`attach`). `Run(cfg, name).train(recipe, total)`
does the rest; Run knows no method's fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from uae.apps.report import eval_curves, image_grid
from uae.config import check_fields, field, save_config, to_dict
from uae.errors import UAEError
from uae.models.decoder import DIT_LORA_TARGETS
from uae.models.layout import ComponentPaths
from uae.files import atomic_folder, writable_dir
from uae.random_weights import from_tiny, resolve_checkpoint
from uae.scoring.scorers import SCORERS, resolve_scorer_weights
from uae.training.checkpointing import Checkpoints, claim_output_dir, clear_run, final_dir, write_final
from uae.training.evaluation import Evaluated, HeldOut
from uae.training.parts import Parts
from uae.training.precision import precision_policy
from uae.training.setup import make_accelerator

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """What every trainer shares."""

    data: str = field(None, help="training data (see the script's page in docs/ for the accepted sources)")
    checkpoint: str = field("tiny", help="starting UAE checkpoint: folder in the official layout, hub id, or tiny")
    output_dir: str = field("runs/train", run_only=True,
                            help="checkpoints, metrics.jsonl, plots, grids and final/ (official layout)")
    resolution: int = field(512, min=16, help="training / rollout size in pixels (a multiple of 16)")
    max_steps: int = field(1000, min=1, aliases=["--max_train_steps", "--max_iterations"],
                           help="optimizer steps (SFT, cold start) or iterations (GRPO stages)", run_only=True)
    learning_rate: float = field(1e-4, min=0, help="AdamW learning rate")
    adam_beta1: float = field(0.9, min=0, max=1, help="AdamW beta1")
    adam_beta2: float = field(0.999, min=0, max=1, help="AdamW beta2")
    adam_epsilon: float = field(1e-8, min=0, help="AdamW epsilon")
    weight_decay: float = field(1e-4, min=0, help="AdamW weight decay")
    optimizer: str = field("adamw", choices=("adamw", "adamw8bit"),
                           help="adamw (torch), or adamw8bit (torchao's 8-bit AdamW: a quarter of the state; "
                                "pip install torchao)")
    max_grad_norm: float = field(1.0, min=0, help="gradient clipping (0: off)")
    lora_rank: int = field(32, min=1, help="rank of a new DiT LoRA")
    lora_alpha: float = field(64.0, min=0, help="alpha of a new DiT LoRA")
    lora_target_modules: list[str] = field(DIT_LORA_TARGETS, help="DiT modules a new LoRA wraps")
    use_ema: bool = field(False, help="keep an EMA of the trained weights; final/ uses it")
    ema_decay: float = field(0.999, min=0, max=1, help="EMA decay (warm-up min((1+s)/(10+s), decay), s = optimizer steps)")
    ema_every: int = field(1, min=1, help="EMA update every N optimizer steps")
    ema_device: str = field("same", choices=("same", "cpu"), run_only=True,
                            help="where the EMA weights live (cpu: none on the GPU)")
    mixed_precision: str = field("no", choices=("no", "bf16", "fp16"),
                                 help="no, bf16 or fp16: frozen weights in that dtype, trained weights and optimizer "
                                      "state in fp32, forward passes under autocast")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass, in every model "
                                                     "that trains (DiT, LLM)", run_only=True)
    gradient_accumulation_steps: int = field(1, min=1, help="micro-batches per optimizer step")
    checkpointing_steps: int = field(500, min=0, run_only=True,
                                     help="resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int | None = field(None, min=1, help="keep at most this many checkpoints", run_only=True)
    resume_from_checkpoint: str | None = field(None, help="'latest' or a checkpoint folder", run_only=True)
    overwrite_output_dir: bool = field(False, run_only=True,
                                       help="a fresh run into an --output_dir that holds a run deletes that run's "
                                            "files (all but cache/) first; without it, that is an error")
    cache_dir: str | None = field(None, run_only=True,
                                  help="cache of precomputed frozen-model outputs (default <output_dir>/cache)")
    link_unchanged: bool = field(True, help="final/: symlink the unchanged parts instead of copying", run_only=True)
    report_to: str = field("tensorboard", run_only=True,
                           help="accelerate trackers, comma-separated: tensorboard, wandb, none")
    seed: int = field(0, help="seed: data order, noise and sampling are functions of (seed, step)")
    device: str = field("auto", choices=("auto", "cpu"), run_only=True,
                        help="auto or cpu (force CPU); GPUs are chosen by accelerate launch")
    log_level: str = field("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level", run_only=True)
    scorer_weights: str = field("auto", choices=("auto", "official", "tiny"),
                                help="weights of the scorers (rewards, held-out evaluation): auto (tiny for the tiny "
                                     "model, else official), official, tiny")
    eval_steps: int = field(0, min=0, run_only=True,
                            help="held-out Unified-Bench every N steps, and at the start and the end (0: never)")
    eval_data: str | None = field(None, help="held-out references: a folder of images, a .jsonl or any --data source "
                                             "(sample: the six sample photos)", run_only=True)
    eval_scorers: list[str] = field(["clip", "longclip", "dinov2", "dinov3"], help="scorers of the held-out evaluation "
                                                                                   "(overall: their mean)",
                                                                                   run_only=True)
    eval_resolution: int | None = field(None, min=16, run_only=True,
                                        help="size of the held-out reconstructions (default --resolution)")
    eval_inference_steps: int = field(40, min=1, run_only=True,
                                      help="denoising steps of the held-out reconstructions (the benchmark's)")
    eval_guidance_scale: float = field(5.0, min=0, run_only=True,
                                       help="CFG of the held-out reconstructions (the benchmark's)")
    eval_max_new_tokens: int = field(512, min=1, run_only=True,
                                     help="caption length limit of the held-out captions (the benchmark's)")

    def __post_init__(self):
        if not self.data:
            raise UAEError("--data is required (see --help for the accepted sources)")
        check_fields(self)
        if self.resolution % 16:
            raise UAEError(f"--resolution {self.resolution} must be a multiple of 16")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise UAEError("--overwrite_output_dir starts a run again and --resume_from_checkpoint continues one: give "
                           "one of them")
        if self.eval_steps and not self.eval_data:
            raise UAEError(f"--eval_steps {self.eval_steps} needs --eval_data (a folder of held-out reference images, a "
                           ".jsonl, or sample for the six sample photos)")
        if self.eval_resolution is not None and self.eval_resolution % 16:
            raise UAEError(f"--eval_resolution {self.eval_resolution} must be a multiple of 16")
        unknown = [s for s in self.eval_scorers if s not in SCORERS]
        if unknown:
            raise UAEError(f"--eval_scorers {' '.join(unknown)}: choose from {', '.join(SCORERS)}")

    def resolved(self):
        """This config with its names resolved, once, at the run's start (and saved so in
        config.yaml): `scorer_weights: auto` to tiny or official (tiny for the tiny model, or a
        model trained from it), then `checkpoint: tiny` to the embedded random checkpoint's folder.
        A method whose models come from other settings overrides it (G4UConfig's --model)."""
        return dataclasses.replace(self, scorer_weights=resolve_scorer_weights(self.scorer_weights,
                                                                               from_tiny(self.checkpoint)),
                                   checkpoint=resolve_checkpoint(self.checkpoint))


@dataclass
class Setup:
    """What a recipe's `setup` returns: what trains, and what Run needs around it."""

    parts: Parts                                # trained parameter groups, modules accelerate wraps, freed
    optimizer: torch.optim.Optimizer            # over parts.trainable (Run prepares it and counts its steps)
    evaluated: Evaluated                        # the held-out evaluation's model and options (--eval_steps)
    paths: ComponentPaths | None                # the source checkpoint's parts (None: not a UAE checkpoint)
    linked_parts: tuple[str, ...] = ()          # the parts final/ links unchanged from the source
    manifest: dict = dataclasses.field(default_factory=dict)  # extra entries of final/'s manifest
    lr_scheduler: Any = None                    # prepared with the optimizer; the recipe steps it


@dataclass
class Prepared:
    """What Run hands back to the recipe (`Recipe.attach`) once accelerate has prepared its Setup."""

    modules: dict[str, torch.nn.Module]         # `parts.prepared`, wrapped (DDP / FSDP), by the same names
    optimizer: Any                              # the optimizer, wrapped (its steps are counted)
    lr_scheduler: Any = None                    # the lr scheduler, wrapped, when the Setup had one


@runtime_checkable
class Recipe(Protocol):
    """What a training method provides, built as `Recipe(run)` (`Recipe(run, reward=...)` for a
    method that takes a reward). Run calls, in order: `setup` (load and configure the models; returns
    the `Setup`), `attach` (the prepared objects, after the held-out evaluation has read the model:
    stage 3 frees its encoder there), `begin` (only when there are steps left), `step` for each step,
    `write_trained`, `plot` (main process), `close`. `configure` and `fully_trained` describe what
    trains without loading anything (bench/memory_plan.py runs them on meta-device models)."""

    trained_by: str  # the manifest's "trained_by": the command that trained it

    @staticmethod
    def configure(model, cfg) -> Parts:
        """Wrap the LoRAs, mark what trains (requires_grad) and return it as `Parts`."""

    @staticmethod
    def fully_trained(cfg) -> set[str]:
        """The parts whose every weight trains (the precision policy loads them in fp32)."""

    def setup(self) -> Setup:
        """Load the models, `configure` them, build the optimizer; return what Run needs."""

    def attach(self, prepared: Prepared) -> None:
        """Keep the prepared modules, optimizer and scheduler (the ones to train through)."""

    def begin(self, start: int) -> None:
        """Build what depends on the step the run starts or resumes at (data iterators)."""

    def step(self, i: int) -> dict:
        """One step (of one or more optimizer steps); returns its metrics."""

    def write_trained(self, final: Path) -> None:
        """Write what it trained into final/ (the official layout)."""

    def plot(self, records: list[dict]) -> None:
        """The end-of-run plots from the logged metrics."""

    def close(self) -> None:
        """Release what it holds (threads), on every process."""


RECIPE_MEMBERS = ("trained_by",) + tuple(n for n, v in vars(Recipe).items() if callable(v) and not n.startswith("_"))


class OptimizerSteps:
    """How many optimizer steps the run has taken (saved in every checkpoint): the EMA's warm-up
    and cadence count these, whatever the number of optimizer steps per recipe step."""

    def __init__(self):
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


class JsonlLog:
    """One JSON object per line, appended; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, accelerator, resume_step: int = 0):
        self.path, self.acc = Path(path), accelerator
        if accelerator.is_main_process and self.path.exists():
            # A fresh run (resume_step 0) keeps nothing, not even a crashed run's step-0 evaluation.
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and resume_step and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def append(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()] if self.path.exists() else []


class Run:
    def __init__(self, cfg, name: str):
        """`name`: the trackers' project name (e.g. uae_sft, uae_grpo_u4g)."""
        self.cfg, self.name = cfg.resolved(), name
        cfg = self.cfg
        self.out = writable_dir(cfg.output_dir, "--output_dir")
        self.config_dict = to_dict(cfg)
        # Before anything is written, on every process: whose folder it is, and what to resume.
        self.resume, clear = claim_output_dir(cfg, self.config_dict)
        self.resume_step = Checkpoints.state(self.resume)["step"] if self.resume is not None else 0
        self.acc = make_accelerator(cfg, self.out)
        self.acc.wait_for_everyone()  # every process has read the folder as it was
        if self.acc.is_main_process and not self.finished(cfg.max_steps):
            if clear:
                clear_run(self.out)
            save_config(cfg, self.out / "config.yaml")
        self.steps = OptimizerSteps()
        self.ema = None
        self._step_hook = None
        self.held_out = None           # the held-out evaluation (eval_steps > 0)
        self.recipe_setup: Setup | None = None  # what the recipe's setup returned (final/ reads it)
        self.trainable: list[torch.nn.Parameter] = []

    def finished(self, total: int) -> bool:
        """A resume at or past `total` steps whose final/ is written: nothing to train, nothing to
        change (not even config.yaml)."""
        return (self.resume is not None and self.resume_step >= total
                and final_dir(self.out).is_dir())

    # ------------------------------------------------------------------ logging
    def log(self, step: int, values: dict) -> None:
        self.metrics.append({"step": step, **values})
        self.acc.log(values, step=step)

    def log_sample(self, step: int, record: dict, text: str | None = None) -> None:
        """A sample record in samples.jsonl, and as text in the trackers."""
        self.samples.append({"step": step, **record})
        if self.acc.is_main_process and text:
            self.acc.log({"samples": text}, step=step)

    def log_image(self, step: int, tag: str, image) -> None:
        """A PIL image (a grid) to every tracker that takes images."""
        if not self.acc.is_main_process:
            return
        arr = np.asarray(image.convert("RGB"))
        for tracker in self.acc.trackers:
            if not hasattr(tracker, "log_images"):
                continue
            kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({tag: arr[None]}, step=step, **kwargs)

    # ------------------------------------------------------------------ what trains
    def set_up(self, recipe: Recipe) -> Setup:
        """The recipe's `setup`, and what Run does with what it returns: the trained parameters
        cast to the precision policy's dtype (fp32), the modules `parts.prepared`, the optimizer and
        the lr scheduler prepared by accelerate, the optimizer's steps counted by a hook on it
        (`optimizer_stepped`), the held-out evaluation given its model (before the recipe may free a
        part of it: stage 3 frees its encoder in `attach`), then the prepared objects handed back
        (`recipe.attach`). `train` calls it; a test that drives a recipe by hand may too."""
        if not isinstance(recipe, Recipe):
            missing = [m for m in RECIPE_MEMBERS if m not in dir(recipe)]
            raise UAEError(f"{type(recipe).__name__} does not implement the recipe contract (uae.training.run.Recipe): "
                           f"missing {', '.join(missing) or 'a member'}")
        if self.cfg.eval_steps:
            self.held_out = HeldOut(self.cfg, self.acc)
        setup = recipe.setup()
        precision_policy(self.cfg.mixed_precision).cast_trained(setup.parts.trainable)
        names = list(setup.parts.prepared)
        others = () if setup.lr_scheduler is None else (setup.lr_scheduler,)
        out = self.acc.prepare(*setup.parts.prepared.values(), setup.optimizer, *others)
        out = out if isinstance(out, tuple) else (out,)
        optimizer = out[len(names)]
        # accelerate's wrapper steps the torch optimizer: the hook sits on the latter.
        self._step_hook = optimizer.optimizer.register_step_post_hook(lambda *_: self.optimizer_stepped())
        self.recipe_setup, self.trainable = setup, setup.parts.trainable
        if self.held_out is not None:
            self.held_out.prepare(setup.evaluated)
        recipe.attach(Prepared(dict(zip(names, out[:len(names)])), optimizer, *out[len(names) + 1:]))
        return setup

    # ------------------------------------------------------------------ optimizer steps and EMA
    def optimizer_stepped(self) -> None:
        """After every step of the Setup's optimizer (a hook on it; a step skipped
        by the fp16 scaler does not count). With `use_ema`, the EMA is updated every `ema_every`
        optimizer steps, its warm-up counting optimizer steps (diffusers' EMAModel: decay =
        min((1 + s) / (10 + s), ema_decay), s = optimizer steps - 1), not EMA updates."""
        self.steps.count += 1
        if self.ema is not None and self.steps.count % self.cfg.ema_every == 0:
            self.ema.optimization_step = self.steps.count - 1  # EMAModel.step adds one
            self.ema.step(self._ema_view())

    def _ema_view(self) -> list[torch.Tensor]:
        """The trained weights as the EMA reads them: themselves, or (ema_device cpu) copies on the
        CPU, so that the averages take no accelerator memory (copy_to moves them back)."""
        if self.cfg.ema_device == "cpu":
            return [p.detach().to("cpu", copy=True).requires_grad_(p.requires_grad) for p in self.trainable]
        return self.trainable

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones for the block (none kept: unchanged)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            self.ema.restore(self.trainable)

    # ------------------------------------------------------------------ held-out evaluation
    def _eval_due(self, step: int, total: int) -> bool:
        return self.held_out is not None and self.held_out.due(step, total)

    def evaluate(self, step: int) -> dict:
        """Held-out Unified-Bench at `step`, with the EMA weights where kept; its metrics (eval/...,
        time_eval), a grid (reference | reconstruction) and the captions to the trackers."""
        t0 = time.perf_counter()
        with self.ema_weights(), self.acc.autocast():
            metrics, grid, captions = self.held_out(step)
        metrics["time_eval"] = time.perf_counter() - t0
        if self.acc.is_main_process:
            if grid:
                pics = [im for pair in grid for im in pair]
                labels = [label for _ in grid for label in ("reference", "reconstruction")]
                self.log_image(step, "eval/grid", image_grid(pics, labels, self.out / "eval" / f"step_{step:06d}.png",
                                                             columns=2))
            self.log_sample(step, {"eval_captions": captions},
                            text="\n\n".join(f"{key}: {c}" for key, c in captions.items()))
        logger.info("held-out Unified-Bench at step %d: overall %.4f (%s), %.1f words per caption", step,
                    metrics["eval/overall"], ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items()
                                                       if k.startswith("eval/") and k[5:] in self.cfg.eval_scorers),
                    metrics["eval/caption_words"])
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self, recipe: Recipe, total: int, desc: str, *, last: bool = True) -> Path:
        cfg, acc = self.cfg, self.acc
        if self.finished(total):
            logger.info("%s is at step %d, at or past --max_steps %d: nothing to train; %s is unchanged", self.resume,
                        self.resume_step, total, final_dir(self.out))
            self._end(last)
            return final_dir(self.out)
        set_seed(cfg.seed)
        # Every process sets up together (accelerate's prepare is collective); cached artefacts such
        # as the embedded tiny checkpoint are built once under a file lock (uae.files.build_once).
        self.set_up(recipe)
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel  # diffusers takes seconds to import: only with --use_ema

            self.ema = EMAModel(self._ema_view(), decay=cfg.ema_decay)
            acc.register_for_checkpointing(self.ema)
        acc.register_for_checkpointing(self.steps)
        self._checkpoint_trainable_only()
        ckpts = Checkpoints(self.out, cfg.checkpoints_total_limit)
        start = 0
        if self.resume is not None:
            start = Checkpoints.load(acc, self.resume)
            logger.info("resumed from %s at step %d", self.resume, start)
            if start >= total:  # a finished run whose final/ is missing (stopped while writing it)
                logger.info("step %d is at or past --max_steps %d: nothing to train; writing final/ from it", start,
                            total)
        self.metrics = JsonlLog(self.out / "metrics.jsonl", acc, start)
        self.samples = JsonlLog(self.out / "samples.jsonl", acc, start)
        if acc.is_main_process:
            acc.init_trackers(self.name, config={k: v for k, v in self.config_dict.items()
                                                 if isinstance(v, (int, float, str, bool))})
        if start < total:
            recipe.begin(start)
        if start == 0 and self._eval_due(0, total):
            self.log(0, self.evaluate(0))
        bar = tqdm(total=total, initial=start, desc=desc, disable=not acc.is_local_main_process)
        for i in range(start, total):
            with acc.autocast():  # mixed precision: frozen weights in bf16/fp16, trained ones in fp32
                values = recipe.step(i)
            # Before the step's checkpoint: a resumed run does not repeat an evaluation it logged.
            if self._eval_due(i + 1, total):
                values.update(self.evaluate(i + 1))
            self.log(i + 1, values)
            bar.update(1)
            shown = {k: f"{values[k]:.4f}" for k in ("reward_mean", "loss") if k in values}  # the RL stages: both
            if shown:
                bar.set_postfix({k.replace("_mean", ""): v for k, v in shown.items()})
            if cfg.checkpointing_steps and (i + 1) % cfg.checkpointing_steps == 0 and i + 1 < total:
                ckpts.save(acc, i + 1, self.config_dict)
        bar.close()
        if start < total:
            ckpts.save(acc, total, self.config_dict)
        final = self.write_final(recipe)
        if acc.is_main_process:
            records = self.metrics.read()
            recipe.plot(records)
            if self.held_out is not None:
                eval_curves(records, self.out / "eval.png", list(cfg.eval_scorers))
        recipe.close()
        self._step_hook.remove()
        self._end(last)
        return final

    def _end(self, last: bool) -> None:
        if last:
            self.acc.end_training()  # the trackers, then the process group
        else:  # another run follows in this process (--stage all): it joins the same process group
            for tracker in self.acc.trackers:
                tracker.finish()

    TRAINABLE_FILE = "trainable.safetensors"

    def _checkpoint_trainable_only(self) -> None:
        """Checkpoints hold the trained weights, not whole models (diffusers' LoRA scripts do the
        same with these hooks): a LoRA run's checkpoint is megabytes, not the frozen 8B DiT again.
        Trained weights of modules that accelerate does not wrap (the cold start's DiT LoRA) are
        included. Under FSDP / DeepSpeed, accelerate's own sharded saving is kept."""
        acc = self.acc
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return

        def save(models, weights, output_dir):
            if acc.is_main_process:
                state = {f"{i:05d}": p.detach().cpu().contiguous() for i, p in enumerate(self.trainable)}
                save_file(state, str(Path(output_dir) / self.TRAINABLE_FILE))
            weights.clear()

        def load(models, input_dir):
            state = load_file(str(Path(input_dir) / self.TRAINABLE_FILE))
            if len(state) != len(self.trainable):
                raise UAEError(f"checkpoint {input_dir} holds {len(state)} trained tensors, this run trains "
                               f"{len(self.trainable)}: it was written by another configuration")
            with torch.no_grad():
                for i, p in enumerate(self.trainable):
                    p.copy_(state[f"{i:05d}"].to(p.device, p.dtype))
            models.clear()

        acc.register_save_state_pre_hook(save)
        acc.register_load_state_pre_hook(load)

    def write_final(self, recipe) -> Path:
        """final/: the parts the recipe trained (the EMA weights when kept), the rest of the source
        checkpoint linked (or copied: the Setup's `paths` and `linked_parts`), and the manifest;
        written by the main process, complete when any process returns (`--stage all` starts every
        process's next stage from it)."""
        acc = self.acc
        acc.wait_for_everyone()
        final = final_dir(self.out)
        if acc.is_main_process:
            with self.ema_weights(), atomic_folder(final) as tmp:  # whole, and nothing of an earlier final/
                setup = self.recipe_setup
                manifest = {**setup.manifest, "trained_by": recipe.trained_by, "config": self.config_dict}
                write_final(tmp, setup.paths, self.cfg.link_unchanged, setup.linked_parts, manifest)
                recipe.write_trained(tmp)
            if setup.paths is not None:
                logger.info("wrote %s (official layout: demo.py --checkpoint %s)", final, final)
            else:  # not a UAE checkpoint: the manifest says how to load what trained
                logger.info("wrote %s (load with: %s)", final,
                            str(setup.manifest.get("load_with", "see its uae_checkpoint.json")).replace(
                                "<this folder>", str(final)))
        acc.wait_for_everyone()
        return final
