"""Unified-GRPO stage 3, Understanding for Generation: Flow-GRPO on the decoder's LoRA.

Each iteration: the iteration's prompts (the encoder's captions of reference images, drawn without
replacement), each repeated G times; reconstructions sampled with the SDE sampler (CFG with both
branches in one batch) while every stochastic transition and its log-probability are recorded;
rewards; group-relative advantages (std over the whole batch by default, as Flow-GRPO's SD3.5
configs); then, for each inner epoch, the rollouts dealt anew into `updates_per_iteration`
shares (each a random part of every group, the same count on every process), one optimizer step each, of PPO-clip on the recorded transitions
with Flow-GRPO's KL to the reference policy (the LoRA the stage started from, or the DiT without
it: no second DiT in memory). As in Flow-GRPO's training forward, the unconditional CFG branch is
detached (`detach_uncond`).

Each prompt keeps the conditioning it has at inference (its own [negative, positive] pair):
rollouts and training forwards only batch prompts whose conditioning has the same length.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from uae.apps.report import image_grid, loss_curve
from uae.config import field
from uae.data import load_references
from uae.errors import UAEError
from uae.files import atomic_write_json, atomic_write_text
from uae.hashing import content_key, fingerprint
from uae.models.decoder import disable_lora_dropout, save_dit_lora
from uae.models.uae import UAE
from uae.rl.grpo import GroupConfig, flow_kl, ppo_clip_loss
from uae.rl.iteration import (Phases, check_share, gathered_advantages, iteration_metrics, iteration_share,
                              sde_window_for)
from uae.models.decoder import DIT_LORA_TARGETS
from uae.random_weights.unified import resolve as resolve_model
from uae.rl.flow_backends import UAEBackend, backend_for, sample_trajectory
from uae.rl.kl import kl_reference
from uae.rl.rewards import default_reward, score
from uae.rl.sde import sde_step
from uae.training.cache import DiskCache
from uae.scoring.scorers import resolve_scorer_weights
from uae.training.evaluation import Evaluated, evaluation_settings, uae_evaluated
from uae.training.parts import Parts, ensure_dit_lora, train_dit
from uae.training.precision import precision_policy
from uae.training.run import Prepared, Setup
from uae.training.seeding import generator_for
from uae.training.setup import make_optimizer
from uae.unified.common import caption_images, caption_sampling
from uae.unified.loading import all_tiny
from uae.unified.pipeline import PipelineAdapter

MODELS = ("uae", "pipeline")


def weight_files(folder, pattern: str = "*.safetensors") -> list[Path]:
    """The files of `folder` matching `pattern` (none where it is no local folder: a hub id)."""
    folder = Path(folder)
    return [f for f in folder.glob(pattern) if f.is_file()] if folder.is_dir() else []


@dataclass
class U4GConfig(GroupConfig):
    """Unified-GRPO stage 3, Understanding for Generation: Flow-GRPO's SD3.5 settings."""

    stage: str = field("u4g", choices=("u4g",), help="this stage")
    max_steps: int = field(300, min=1, aliases=["--max_train_steps", "--max_iterations"], run_only=True,
                           help="GRPO iterations")
    learning_rate: float = field(3e-4, min=0, help="AdamW learning rate of the decoder's LoRA")
    guidance_scale: float = field(4.5, min=0, help="CFG during rollouts and training (both branches in one batch)")
    prompts_per_iteration: int = field(48, min=1, help="prompts per iteration over all processes, drawn without "
                                                       "replacement (Flow-GRPO's SD3.5 configs: 48, whatever the GPU count)")
    scale_rewards: str = field("batch", choices=("group", "batch", "none"), aliases=["--adv_std_scope"],
                               help="advantages (r - group mean) divided by the std of the whole batch (Flow-GRPO's "
                                    "global_std), of the group, or by nothing")
    detach_uncond: bool = field(True, help="the unconditional CFG branch of the training forward is a constant for the "
                                           "gradient (Flow-GRPO); false: the gradient of the guided velocity flows "
                                           "through both branches")
    sample_batch_size: int = field(8, min=1, help="rollouts sampled together; rewards of a chunk overlap the sampling "
                                                  "of the next")
    train_batch_size: int | None = field(None, min=1, help="samples per training forward (default sample_batch_size)")
    updates_per_iteration: int = field(2, min=1, help="optimizer steps per batch of rollouts, each on a share drawn "
                                                      "from every group (Flow-GRPO: 2, so that the clip range acts)")
    sde_kind: str = field("sde", choices=("sde", "cps"), help="sde (Flow-GRPO) or cps (coefficients-preserving)")
    noise_level: float = field(0.7, min=0, help="SDE noise level a (0.8 is usual for cps)")
    sde_window_mode: str = field("fixed", choices=("fixed", "random", "sliding"),
                                 help="fixed (--sde_window), random (a window of --sde_window_size steps drawn anew each "
                                      "iteration within --sde_window_range: Flow-GRPO-Fast) or sliding (moves by "
                                      "--sde_window_shift every --sde_window_shift_every iterations: MixGRPO)")
    sde_window: list[int] | None = field(None, min=0, help="fixed mode: two ints [lo, hi), SDE (and training) only on "
                                                           "steps lo..hi-1, ODE elsewhere; default: all but the last")
    sde_window_size: int = field(3, min=1, help="random / sliding mode: SDE steps per window (Flow-GRPO-Fast: 3)")
    sde_window_range: list[int] | None = field(None, min=0, help="random / sliding mode: [lo, hi) the window stays in; "
                                                                 "default the first half of the schedule")
    sde_window_shift_every: int = field(25, min=1, help="sliding mode: iterations between moves (MixGRPO: 25)")
    sde_window_shift: int = field(1, min=1, help="sliding mode: steps per move (MixGRPO: 1)")
    model: str = field("uae", choices=MODELS,
                       help="whose decoder trains: uae (--checkpoint's DiT LoRA; prompts are its encoder's captions) "
                            "or pipeline (a new LoRA on --generator's transformer, any diffusers SD3 / SD3.5 or FLUX "
                            "pipeline; prompts are --captioner's captions, any transformers image-text-to-text model; "
                            "final/generator_lora in diffusers' format: pipe.load_lora_weights)")
    captioner: str | None = field(None, help="--model pipeline: the frozen captioner whose captions are the prompts "
                                             "(hub id, folder or tiny; not needed with --use_data_captions when every "
                                             "reference has one)")
    generator: str | None = field(None, help="--model pipeline: the diffusers flow-matching pipeline whose transformer "
                                             "trains (hub id, folder, tiny: SD3, tiny-flux: FLUX)")
    negative_prompt: str = field("", help="--model pipeline, SD3: the negative prompt of the guidance (its own pooled "
                                          "vector; the pipeline's default, empty). FLUX guides by its guidance "
                                          "embedding and takes none")
    max_sequence_length: int | None = field(None, min=1, help="--model pipeline: T5's prompt tokens (default the "
                                                              "pipeline's: SD3 256, FLUX 512)")
    fresh_dit_lora: bool = field(False, help="train a new DiT LoRA instead of the checkpoint's dit_lora")
    use_data_captions: bool = field(False, help="use the captions that come with the data instead of the encoder's")
    ema_decay: float = field(0.9, min=0, max=1, help="EMA decay (Flow-GRPO: 0.9)")
    ema_every: int = field(8, min=1, help="EMA update every N optimizer steps (Flow-GRPO: 8)")

    bias_correction_kl_refused = ("Flow-GRPO's KL is the closed form between the policy's and the reference's "
                                  "Gaussian steps, not an estimate from a sampled action: there is nothing to correct")

    def __post_init__(self):
        super().__post_init__()
        if self.model == "pipeline":
            if not self.generator:
                raise UAEError("--model pipeline trains --generator's transformer: give --generator (a diffusers SD3 "
                               "or FLUX pipeline: hub id, folder, tiny or tiny-flux)")
            if not (self.captioner or self.use_data_captions):
                raise UAEError("--model pipeline: give --captioner (whose captions are the prompts) or "
                               "--use_data_captions (the data's own captions)")
            if self.eval_steps and not self.captioner:
                raise UAEError("--eval_steps with --model pipeline captions the held-out references: give --captioner")
        elif self.captioner or self.generator or self.negative_prompt or self.max_sequence_length:
            given = [f"--{k}" for k in ("captioner", "generator", "negative_prompt", "max_sequence_length")
                     if getattr(self, k)]
            raise UAEError(f"{' / '.join(given)}: --model pipeline's settings; --model uae trains --checkpoint's decoder "
                           "on its own encoder's captions")
        if self.sde_window is not None and (len(self.sde_window) != 2 or
                                            not 0 <= self.sde_window[0] < self.sde_window[1] <= self.num_steps):
            raise UAEError(f"--sde_window {self.sde_window}: give lo hi with 0 <= lo < hi <= num_steps ({self.num_steps})")
        if self.sde_window_mode != "fixed":
            lo, hi = self.sde_window_range or (0, self.num_steps // 2)
            if not (0 <= lo < hi <= self.num_steps and self.sde_window_size <= hi - lo):
                raise UAEError(f"--sde_window_range {[lo, hi]} / --sde_window_size {self.sde_window_size}: need "
                               f"0 <= lo < hi <= num_steps ({self.num_steps}) and size <= hi - lo")
        # CPS's last step has noise scale sigma_next sin(a pi / 2) = 0: its "sample" is its mean, its
        # log-probability carries no signal and Flow-GRPO's KL divides by 2 s^2 = 0.
        if self.sde_kind == "cps":
            if self.sde_window_mode == "fixed":
                hi, setting = (self.sde_window[1] if self.sde_window else self.num_steps - 1), "--sde_window"
            else:
                hi, setting = (self.sde_window_range or (0, self.num_steps // 2))[1], "--sde_window_range"
            if hi >= self.num_steps:
                raise UAEError(f"{setting} reaches the last step ({self.num_steps - 1}), where the cps step has no "
                               f"noise (sigma_next = 0): end the window at {self.num_steps - 1} or earlier, or use "
                               "--sde_kind sde")


    def resolved(self) -> "U4GConfig":
        """As TrainConfig's for --model uae; for a pipeline, `tiny` / `tiny-flux` resolve to the
        embedded random models and `scorer_weights: auto` is tiny when every model is one."""
        if self.model == "uae":
            return super().resolved()
        weights = resolve_scorer_weights(self.scorer_weights, all_tiny("pipeline", None, self.captioner, self.generator))
        return replace(self, scorer_weights=weights, captioner=resolve_model(self.captioner, "captioner"),
                       generator=resolve_model(self.generator, "generator"))


logger = logging.getLogger(__name__)


def same_length_batches(samples: list[int], length, size: int) -> list[list[int]]:
    """Consecutive runs of at most `size` of `samples` whose `length(sample)` is the same."""
    out: list[list[int]] = []
    for s in samples:
        if out and len(out[-1]) < size and length(out[-1][0]) == length(s):
            out[-1].append(s)
        else:
            out.append([s])
    return out


@dataclass
class Transitions:
    """This process's rollouts of an iteration, in its sample order: for each recorded (trained)
    step, the latents before and after it and the log-probability of that move at sampling time;
    each sample's conditioning, advantage and whether it is kept (its group has reward variance)."""

    steps: list[int]                       # schedule indices of the recorded steps
    latents: list[torch.Tensor]            # per recorded step: (N, C, H, W), x_i
    next_latents: list[torch.Tensor]       # per recorded step: (N, C, H, W), x_{i+1}
    log_probs: list[torch.Tensor]          # per recorded step: (N,)
    conditioning: list[dict]               # per sample: the backend's conditioning (batch dimension 1)
    advantages: torch.Tensor               # (N,)
    keep: torch.Tensor                     # (N,) bool

    @classmethod
    def of(cls, chunks, conditioning, advantages, keep) -> "Transitions":
        """From the sampled chunks [(local sample indices, [(i, x_i, x_{i+1}, log p)], images)]."""
        steps = [i for i, *_ in chunks[0][1]]
        inverse = torch.argsort(torch.tensor([j for local, _, _ in chunks for j in local]))

        def per_step(f: int) -> list[torch.Tensor]:
            return [torch.cat([rec[k][f] for _, rec, _ in chunks])[inverse] for k in range(len(steps))]

        return cls(steps, per_step(1), per_step(2), per_step(3), conditioning, advantages, keep)

    def __len__(self) -> int:
        return len(self.conditioning)

    def length(self, j: int) -> int:
        """Sample j's conditioning length (only samples of one length are batched together)."""
        return self.conditioning[j]["pos"].shape[1]


def update_shares(n: int, updates: int, seed: int, it: int, epoch: int = 0) -> list[list[int]]:
    """The global samples of each optimizer step of an inner epoch. The `n` samples (in global
    order: groups in order, processes holding contiguous ranges) are dealt in blocks of `updates`
    consecutive ones, each block's samples one to each share in an order drawn anew for every
    (seed, iteration, inner epoch) block by block, as Flow-GRPO reshuffles its samples for each
    inner epoch: every share holds a random 1/`updates` of every group (a mix of groups), and a
    process whose samples are whole blocks (`updates` divides its count) holds exactly its count /
    `updates` of every share, so no process waits for another at an optimizer step (a shuffle of
    all processes' samples together gave each process a varying count: bench/u4g_shares.py).
    Flow-GRPO permutes each GPU's samples; a block is the smallest such unit that does not depend
    on the number of processes, so one process draws the shares of N (the union of theirs).
    A function of its arguments only: a resumed run draws the same shares. Each share is sorted."""
    keys = torch.rand(n, generator=generator_for(seed + 3 + 7919 * epoch, it))
    full = n - n % updates
    order = (keys[:full].view(-1, updates).argsort(dim=1) + torch.arange(0, full, updates)[:, None]).T
    shares = [row.tolist() for row in order]
    rest = (torch.argsort(keys[full:]) + full).tolist()  # n % updates samples: one each to the first shares
    for u, j in enumerate(rest):
        shares[u].append(j)
    return [sorted(s) for s in shares]


class U4GRecipe:
    """Stage 3 (u4g): the decoder's LoRA learns from the reconstruction reward; all else frozen.
    The decoder is UAE's (`--model uae`) or a diffusers pipeline's transformer (`--model pipeline`),
    behind a generator backend (uae.rl.flow_backends): its conditioning, latents, schedule,
    velocity and decoding."""

    trained_by = "train_grpo.py --stage u4g"

    def __init__(self, run, reward=None):
        self.run, self.cfg, self.acc = run, run.cfg, run.acc
        self.reward = reward
        self.pool = ThreadPoolExecutor(max_workers=1)  # rewards overlap the next sampling batch

    @staticmethod
    def fully_trained(cfg) -> set[str]:
        """Parts whose every weight trains: none (a LoRA is fp32 whatever its base)."""
        return set()

    @staticmethod
    def configure(model, cfg) -> Parts:
        """Stage 3 trains the DiT's LoRA (the checkpoint's, or a new one); everything else is frozen,
        and the encoder is freed once the captions' conditioning is cached (`attach`)."""
        model.encoder.requires_grad_(False)
        model.decoder.pipe.vae.requires_grad_(False)
        parts = U4GRecipe.configure_transformer(model.decoder.pipe.transformer, cfg)
        return Parts(parts.groups, parts.prepared, freed=("encoder",))

    @staticmethod
    def configure_transformer(dit, cfg, targets=None) -> Parts:
        """The transformer's LoRA trains (its own, or a new one on `targets`, by default the
        config's), with dropout 0; the rest of it is frozen."""
        dit.requires_grad_(False)
        ensure_dit_lora(dit, cfg, targets)
        dropout = disable_lora_dropout(dit)
        if dropout:
            logger.warning("the DiT LoRA's lora_dropout %g is set to 0 for stage 3: in training mode it would make "
                           "the training forward differ from the rollout's (the first ratio would not be 1)", dropout)
        if cfg.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        return Parts({"decoder": train_dit(dit)}, prepared={"dit": dit})

    # ------------------------------------------------------------------ set-up
    def setup(self) -> Setup:
        cfg, acc = self.cfg, self.acc
        self.refs = load_references(cfg.data)
        check_share(cfg, len(self.refs), acc.num_processes)  # before anything loads
        if cfg.model == "pipeline" and cfg.use_data_captions and not cfg.captioner:
            missing = [r.key for r in self.refs if not r.caption]
            if missing:
                raise UAEError(f"--use_data_captions: {len(missing)} reference(s) of --data {cfg.data} have no caption "
                               f"(e.g. {missing[0]}): give --captioner to caption them")
        precision = precision_policy(cfg.mixed_precision)
        parts, around = self._setup_pipeline(precision) if cfg.model == "pipeline" else self._setup_uae(precision)
        self.dit = self.backend.transformer
        self.trainable = parts.trainable
        self.reference = kl_reference(cfg, self.trainable, acc)
        self.sched = self.backend.schedule(cfg.num_steps)
        if self.reward is None:
            self.reward = default_reward(cfg, acc.device, precision.frozen)
        self.captions = self._captions()
        self.prompt_cache = self._embed_captions(precision.frozen)
        return Setup(parts, make_optimizer(cfg, self.trainable), **around)

    def _setup_uae(self, precision) -> tuple[Parts, dict]:
        """UAE: the checkpoint's DiT LoRA (or a new one) trains; prompts are its encoder's captions,
        conditioned as the release generates (uae.rl.flow_backends.UAEBackend)."""
        cfg = self.cfg
        # The checkpoint's dit_lora (e.g. the cold start's) is trained further; fresh_dit_lora starts a new one.
        overrides = {"dit_lora": "none"} if cfg.fresh_dit_lora else None
        self.model = UAE.from_pretrained(cfg.checkpoint, overrides=overrides, device=self.acc.device,
                                         dtype=precision.frozen)
        if getattr(self.model.decoder.pipe.transformer, "peft_config", None):
            logger.info("training the checkpoint's dit_lora further (fresh_dit_lora for a new one)")
        parts = self.configure(self.model, cfg)
        self.backend = UAEBackend(self.model, cfg.resolution, cfg.resolution)
        self.paths = self.model.components
        # The encoder does not train: the held-out references' captions are made once, and their
        # conditioning kept at set-up, while the encoder is here (it is freed in `attach`).
        return parts, dict(evaluated=uae_evaluated(self.model, cfg, encoder_trains=False, keep_conditioning=True),
                           paths=self.paths, linked_parts=("SD3", "dit", "llm", "llm_lora", "llm_processor"))

    def _setup_pipeline(self, precision) -> tuple[Parts, dict]:
        """A diffusers SD3 / FLUX pipeline (--generator): a new LoRA on its transformer trains
        (targets: the backend's, unless --lora_target_modules says otherwise); prompts are the
        frozen --captioner's captions, conditioned by the pipeline's own text encoders (freed once
        cached). Loaded through the runner's adapter (uae.unified.pipeline.PipelineAdapter) at the
        held-out evaluation's settings, which evaluates the same transformer."""
        cfg, acc = self.cfg, self.acc
        self.adapter = PipelineAdapter(cfg.captioner, cfg.generator, evaluation_settings(cfg, acc.device,
                                                                                         precision.frozen))
        pipe = self.adapter.generator.pipe
        self.backend = backend_for(pipe, cfg.resolution, cfg.resolution, f"--generator {cfg.generator}",
                                   max_sequence_length=cfg.max_sequence_length)
        if cfg.negative_prompt and self.backend.kind == "flux":
            raise UAEError(f"--negative_prompt: {type(pipe).__name__} guides by its guidance embedding and takes no "
                           "negative prompt; leave it unset")
        pipe.vae.requires_grad_(False)
        for encoder in self.backend.text_encoders().values():
            encoder.requires_grad_(False)
        default = list(cfg.lora_target_modules) == list(DIT_LORA_TARGETS)
        targets = self.backend.lora_targets if default else cfg.lora_target_modules
        parts = self.configure_transformer(pipe.transformer, cfg, targets)
        self.paths = None
        cap = self.adapter.captioner
        if cap is not None:
            self.caption_kwargs = caption_sampling(replace(cap.settings, max_new_tokens=cfg.max_new_tokens,
                                                           temperature=cfg.temperature),
                                                   cap.model.generation_config)[0]
        manifest = {"model": "pipeline", "generator": cfg.generator, "captioner": cfg.captioner,
                    "generator_lora": "generator_lora", "backend": self.backend.settings(),
                    "negative_prompt": cfg.negative_prompt,
                    "load_with": f"pipe.load_lora_weights('<this folder>/generator_lora'), or run_unibench.py --model "
                                 f"pipeline --generator {cfg.generator} --generator_lora <this folder>/generator_lora"}
        evaluated = Evaluated(self.adapter, cap.processor.tokenizer if cap else None, encoder_trains=False,
                              keep_conditioning=lambda texts: self.adapter.generator.keep_conditioning(
                                  texts, lambda t: self.backend.call_kwargs(self.backend.encode([t], cfg.negative_prompt)[0])))
        return parts, dict(evaluated=evaluated, paths=None, manifest=manifest)

    def attach(self, prepared: Prepared) -> None:
        self.policy, self.optimizer = prepared.modules["dit"], prepared.optimizer
        # The captioner / encoder and the text encoders are frozen and their work is done (the
        # held-out evaluation has its conditioning too): the conditioning comes from the cache.
        if self.cfg.model == "pipeline":
            self.adapter.captioner = None
            self.backend.free_text_encoders()
        else:
            self.model.encoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    CAPTION_SETTINGS = "captions.settings.json"

    def _captioner_fingerprint(self) -> str:
        """What the captions' model is: UAE's encoder files (path, size, mtime: a stage 2 that
        trained further rewrites them), or the captioner's files (a folder's weights, or the hub
        revision it was loaded at) and its instruction."""
        if self.cfg.model == "pipeline":
            cap = self.adapter.captioner
            if cap is None:
                return "none: the data's captions"
            return fingerprint(cap.source, getattr(cap.model.config, "_commit_hash", None),
                               cap.settings.caption_instruction, self.caption_kwargs, files=weight_files(cap.source))
        paths = self.paths
        return fingerprint(paths.llm, paths.llm_lora, paths.llm_processor, files=self._encoder_files())

    def _encoder_files(self) -> list[Path]:
        """UAE's LLM and LLM LoRA weight files (path, size, mtime go into the fingerprints)."""
        paths = self.paths
        return weight_files(paths.llm) + (weight_files(paths.llm_lora) if paths.llm_lora else [])

    def _caption_settings(self) -> dict:
        """What the stage's prompts depend on: the captioning model (`_captioner_fingerprint`), the
        sampling settings, the references and, with `use_data_captions`, the data's captions. Not
        the number of processes: each reference is captioned alone with the seed, whichever process
        does it."""
        cfg = self.cfg
        given = [r.caption or "" for r in self.refs] if cfg.use_data_captions else []
        return {"encoder": self._captioner_fingerprint(),
                "seed": cfg.seed, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
                "use_data_captions": cfg.use_data_captions, "data": str(cfg.data),
                "references": content_key("\n".join(r.key for r in self.refs).encode()),
                "data_captions": content_key(json.dumps(given).encode())}

    def _stored_captions(self, path: Path, settings: dict) -> tuple[list[str] | None, str | None]:
        """captions.jsonl's captions when they were made with `settings` (and cover every
        reference), else None and why not. A fresh run captions again when they differ; a resumed
        run, which trained on them, is refused (its prompts would change mid-run)."""
        record = path.with_name(self.CAPTION_SETTINGS)
        if not path.exists():
            return None, None
        found = {r["key"]: r["caption"] for r in map(json.loads, path.read_text().splitlines())}
        before = json.loads(record.read_text()) if record.is_file() else None
        covered = set(found) >= {r.key for r in self.refs}
        if before is None and covered and self.run.resume is not None:
            return [found[r.key] for r in self.refs], None  # a run made before the record existed: its own
        why = ("no record of the settings they were made with" if before is None else
               "; ".join(f"{k} {before.get(k)!r} then, {v!r} now" for k, v in settings.items() if before.get(k) != v))
        if not why and not covered:
            why = "not every reference has a caption there"
        if why:
            if self.run.resume is not None:
                return None, (f"--resume_from_checkpoint: {path} holds the prompts this run trained on, made with "
                              f"other settings ({why}): resume on the same checkpoint and settings, or start stage 3 "
                              "afresh (--overwrite_output_dir or another --output_dir)")
            logger.info("%s was made with other settings (%s): captioning the references again", path, why)
            return None, None
        return [found[r.key] for r in self.refs], None

    def _captions(self) -> list[str]:
        """The encoder's captions of the references (prompts of stage 3), kept in captions.jsonl
        with the settings they depend on beside it (`_caption_settings`, in captions.settings.json):
        a fresh run reuses them only when those are the same, and captions again (saying why)
        otherwise; a resumed run reads them back, and is refused if they were made with other
        settings. With `use_data_captions`, captions that come with the data are used instead.
        Each reference is captioned once, by one process (the references dealt out by rank, then
        gathered), and every process gets the same list: a caption depends only on its image and
        the seed, but sampling on another GPU (other kernels) may give another text, and each
        prompt's conditioning must be cached under the caption every process asks for."""
        refs, cfg, acc = self.refs, self.cfg, self.acc
        path = self.run.out / "captions.jsonl"
        settings = self._caption_settings()
        stored, refused = self._stored_captions(path, settings) if acc.is_main_process else (None, None)
        stored, refused = broadcast_object_list([stored, refused])
        if refused:
            raise UAEError(refused)
        if stored is not None:
            return stored
        todo = [i for i, r in enumerate(refs) if not (cfg.use_data_captions and r.caption)]
        mine = todo[acc.process_index::acc.num_processes]
        generated = {}
        show = bool(mine) and acc.is_local_main_process
        # One image a call (each is captioned alone with the seed either way): the bar moves per image,
        # and the token bar below it within each caption.
        for i in tqdm(mine, desc="captioning references", unit="image", disable=not show):
            generated[i] = self._caption(refs[i].image, show)
        for part in gather_object([generated]):  # every process gets every process's captions
            generated.update(part)
        caps = [r.caption if (cfg.use_data_captions and r.caption) else generated[i] for i, r in enumerate(refs)]
        if acc.is_main_process:
            # The record after the captions: a run stopped between the two has no record, and captions again.
            path.with_name(self.CAPTION_SETTINGS).unlink(missing_ok=True)
            atomic_write_text(path, "".join(json.dumps({"key": r.key, "caption": c}) + "\n" for r, c in zip(refs, caps)))
            atomic_write_json(path.with_name(self.CAPTION_SETTINGS), settings)
        return caps

    def _caption(self, image, progress: bool) -> str:
        """One reference's caption, alone, after the seed: by UAE's encoder or the pipeline's captioner."""
        cfg = self.cfg
        if cfg.model == "pipeline":
            cap = self.adapter.captioner
            return caption_images(cap.model, cap.processor, cap.inputs, [image], [cfg.seed], False, progress,
                                  **self.caption_kwargs)[0]
        return self.model.encoder.caption([image], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          seed=cfg.seed, progress=progress)[0]

    def _conditioning_namespace(self, dtype) -> str:
        """What a caption's conditioning depends on besides the caption: UAE's LLM files (its
        `embed_pair`), or the pipeline's text encoders and tokenizers (a folder's files, or the hub
        revision), its prompt length and the negative prompt."""
        cfg = self.cfg
        if cfg.model == "pipeline":
            pipe, backend = self.adapter.generator.pipe, self.backend
            files = [f for name in backend.TEXT_ENCODERS for part in (name, name.replace("text_encoder", "tokenizer"))
                     for f in weight_files(Path(cfg.generator) / part, "*")]
            revision = [getattr(getattr(getattr(pipe, n, None), "config", None), "_commit_hash", None)
                        for n in backend.TEXT_ENCODERS]
            return "prompts-" + fingerprint(cfg.generator, revision, backend.kind, backend.max_sequence_length,
                                            cfg.negative_prompt, str(dtype), files=files)
        paths = self.paths
        return "prompts-" + fingerprint(paths.llm, paths.llm_lora, paths.llm_processor, str(dtype), "backend.encode",
                                        files=self._encoder_files())

    def _embed_captions(self, dtype):
        """Every caption's conditioning (the backend's `encode`), computed once into a disk cache
        keyed by what it depends on (`_conditioning_namespace`) and by the caption itself: a rerun
        or a resume reads it back, and the encoder / text encoders can be freed for the run."""
        cfg, acc = self.cfg, self.acc
        root = Path(cfg.cache_dir) if cfg.cache_dir else self.run.out / "cache"
        cache = DiskCache(root, self._conditioning_namespace(dtype))
        mine = sorted(set(self.captions))[acc.process_index::acc.num_processes]
        todo = [c for c in mine if not cache.has(content_key(c.encode()))]
        with torch.no_grad():
            for c in tqdm(todo, desc="caching prompt embeddings", disable=not todo or not acc.is_local_main_process):
                [cond] = self.backend.encode([c], cfg.negative_prompt)
                cache.put(content_key(c.encode()), cond)
        acc.wait_for_everyone()
        return cache

    def _conditioning(self, caption: str) -> dict:
        """A caption's cached conditioning (batch dimension 1), on the device."""
        return {k: v.to(self.acc.device) for k, v in self.prompt_cache.get(content_key(caption.encode())).items()}

    def begin(self, start: int) -> None:
        """Nothing to build: an iteration's prompts and randomness are functions of (seed, iteration)."""

    # ------------------------------------------------------------------ one iteration
    def step(self, it: int) -> dict:
        cfg, acc = self.cfg, self.acc
        phase = Phases()
        share = iteration_share(cfg, it, len(self.refs), acc.num_processes, acc.process_index)
        mine = share.samples
        window = sde_window_for(cfg, it)
        dev = acc.device
        with phase("sampling"):
            # Each prompt's conditioning as at inference, from the cache (the encoder is frozen).
            conds = {p: self._conditioning(self.captions[p]) for p in dict.fromkeys(mine)}
        length = lambda j: self.backend.length(conds[mine[j]])  # noqa: E731  (local sample -> conditioning length)
        # Rollouts in chunks of sample_batch_size samples of one conditioning length; each chunk's
        # reward runs in a worker thread while the next chunk samples. Each rollout's noise is a
        # function of (seed, iteration, global sample index): the same whatever the chunking or the
        # number of processes.
        gens = [generator_for(cfg.seed, it * len(share.prompts) * cfg.group_size + share.offset + j)
                for j in range(share.size)]
        chunks, futures = [], []
        self.policy.eval()
        for local in same_length_batches(list(range(share.size)), length, cfg.sample_batch_size):
            idx = [mine[j] for j in local]
            with phase("sampling"):
                cond = self.backend.batch([conds[p] for p in idx])
                chunk_gens = [gens[j] for j in local]
                latents = self.backend.initial_latents(chunk_gens)  # each sample's own generator, in fp32
                final, record = sample_trajectory(self.backend, self.dit, latents, self.sched, cond,
                                                  guidance=cfg.guidance_scale, noise_level=cfg.noise_level,
                                                  kind=cfg.sde_kind, window=window, generator=chunk_gens)
                with torch.no_grad():
                    images = self.backend.decode(final)
            chunks.append((local, record, images))
            futures.append(self.pool.submit(score, self.reward, images, [self.refs[p].key for p in idx],
                                            [self.refs[p].image for p in idx], [self.captions[p] for p in idx]))
        with phase("reward"):
            parts = [f.result() for f in futures]  # waits only for what did not overlap the sampling
        # Back to this process's sample order.
        order = [j for local, _, _ in chunks for j in local]
        scores = {k: [0.0] * share.size for k in parts[0]}
        for (local, _, _), part in zip(chunks, parts):
            for key, vals in part.items():
                for j, v in zip(local, vals):
                    scores[key][j] = v
        # Flow-GRPO's statistics: np.std (no Bessel correction), advantages clipped at adv_clip.
        all_rewards, adv = gathered_advantages(acc, scores["total"], share, cfg, unbiased=False)
        mys = slice(share.offset, share.offset + share.size)
        with phase("train"):
            tr = Transitions.of(chunks, [conds[p] for p in mine], adv.values[mys], adv.keep[mys])
            stats = self.train_on(it, tr, adv.keep, share.offset)
        values = iteration_metrics(acc, all_rewards, scores, adv, phase)
        values.update(sde_window_start=window[0] if window else 0, **stats)
        if cfg.image_log_steps and (it + 1) % cfg.image_log_steps == 0 and acc.is_main_process:
            images = torch.cat([c[2] for c in chunks])[torch.argsort(torch.tensor(order))]
            self._grid(it + 1, mine, images, scores["total"])
        return values

    def train_on(self, it: int, tr: "Transitions", keep_all: torch.Tensor, offset: int) -> dict:
        """PPO-clip on the recorded transitions. For each inner epoch, the iteration's samples are
        dealt anew into `updates_per_iteration` shares (`update_shares`: each a random part of every
        group, the same count on every process), one optimizer step each (Flow-GRPO takes 2 per
        batch of rollouts, so its clip range acts from the second on); each process trains on its
        own samples of a share, gradients
        accumulated over micro-batches of one conditioning length and over the trained steps. The
        loss is the mean over the whole share's kept samples and steps, whatever the number of
        processes: the same optimizer steps as one process (tested)."""
        cfg, acc = self.cfg, self.acc
        n, n_steps = len(tr), len(tr.steps)
        self.policy.train()
        agg: dict[str, float] = {}
        dev_first, dev_later, count, loss_total = 0.0, 0.0, 0, 0.0
        forwards = []  # this process's training forward calls (of the policy) per optimizer step
        for inner in range(cfg.inner_epochs):
            for u, share in enumerate(update_shares(len(keep_all), cfg.updates_per_iteration, cfg.seed, it, inner)):
                self.optimizer.zero_grad(set_to_none=True)
                local = [g - offset for g in share if offset <= g < offset + n]
                batches = same_length_batches(sorted(local, key=tr.length), tr.length,
                                              cfg.train_batch_size or cfg.sample_batch_size)
                # Mean over the share's kept samples on all processes (DDP averages the processes'
                # gradients: each sums its own and scales by the number of processes).
                norm = max(int(keep_all[share].sum()), 1) * n_steps / acc.num_processes
                mask, dummy = tr.keep, not batches
                if dummy:  # none of the share here: a zero loss still joins the all-reduce
                    batches, mask = [[0]], torch.zeros_like(tr.keep)
                calls = [(b, k) for b in batches for k in range(n_steps)]
                forwards.append(len(calls))
                for c, (b, k) in enumerate(calls):
                    # One gradient all-reduce per optimizer step: the last backward of the share.
                    sync = acc.no_sync(self.policy) if c < len(calls) - 1 else contextlib.nullcontext()
                    with sync:
                        loss, stats = self._loss(tr, b, k, mask, norm)
                        acc.backward(loss)
                    if dummy:
                        continue
                    dev = max(abs(stats["ratio_max"] - 1), abs(stats["ratio_min"] - 1))
                    if inner == 0 and u == 0:
                        dev_first = max(dev_first, dev)
                        if c == 0:
                            agg.update({f"first_{key}": v for key, v in stats.items()})
                    else:
                        dev_later = max(dev_later, dev)
                    for key, val in stats.items():
                        agg[key] = agg.get(key, 0.0) + val
                    count += 1
                    loss_total += loss.item()
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / max(count, 1) for k, v in agg.items() if not k.startswith("first_")}
        out.update({k: v for k, v in agg.items() if k.startswith("first_")})
        updates = cfg.inner_epochs * cfg.updates_per_iteration
        # Each optimizer step waits for the process with the most forward calls: the sum over the
        # steps of the slowest process's calls against the mean process's (equal when balanced).
        per_rank = acc.gather(torch.tensor(forwards, dtype=torch.float32, device=acc.device)).view(-1, len(forwards))
        out.update(loss=loss_total / updates, ratio_dev_first_update=dev_first, ratio_dev_later_updates=dev_later,
                   optimizer_steps=updates, train_forwards_slowest=float(per_rank.max(0).values.sum()),
                   train_forwards_mean=float(per_rank.mean(0).sum()))
        return out

    def _loss(self, tr: "Transitions", b: list[int], k: int, keep: torch.Tensor, norm: float):
        """PPO-clip (+ beta x Flow-GRPO's KL) of samples `b` at their k-th recorded step."""
        cfg = self.cfg
        sigmas, i = self.sched.sigmas, tr.steps[k]
        cond = self.backend.batch([tr.conditioning[j] for j in b])
        x, x_next, old = tr.latents[k][b], tr.next_latents[k][b], tr.log_probs[k][b]
        t = self.sched.timesteps[i].to(x.device)
        velocity = self.backend.velocity
        sde = dict(kind=cfg.sde_kind, sigma_max=self.sched.sigma_max, prev_sample=x_next)
        ref = None
        if cfg.beta:  # before the policy's forward: swapping weights in place would corrupt its saved tensors
            with torch.no_grad():
                if self.reference is not None:  # the LoRA the stage started from
                    with self.reference.active():
                        v_ref = velocity(self.dit, x, t, cond, cfg.guidance_scale)
                else:  # the DiT without its LoRA
                    self.dit.disable_adapters()
                    v_ref = velocity(self.dit, x, t, cond, cfg.guidance_scale)
                    self.dit.enable_adapters()
                ref = sde_step(v_ref, x, sigmas[i], sigmas[i + 1], cfg.noise_level, **sde)
        v = velocity(self.policy, x, t, cond, cfg.guidance_scale, detach_uncond=cfg.detach_uncond)
        step = sde_step(v, x, sigmas[i], sigmas[i + 1], cfg.noise_level, **sde)
        kl = None if ref is None else flow_kl(step.mean, ref.mean, step.noise_scale)
        return ppo_clip_loss(step.log_prob, old, tr.advantages[b], cfg.clip_range, kl, cfg.beta, keep[b],
                             normalizer=norm)

    # ------------------------------------------------------------------ seeing it work
    def _grid(self, step, mine, images, rewards) -> None:
        from torchvision.transforms.v2.functional import to_pil_image  # torchvision takes seconds: only for grids

        g = self.cfg.group_size
        ref = self.refs[mine[0]].image.resize((images.shape[-1], images.shape[-2]))
        pics = [ref] + [to_pil_image(im) for im in images[:g]]
        labels = ["reference"] + [f"r={r:.3f}" for r in rewards[:g]]
        grid = image_grid(pics, labels, self.run.out / "grids" / f"iter_{step:06d}.png", columns=min(g + 1, 9))
        self.run.log_image(step, "grids/group", grid)

    def plot(self, records: list[dict]) -> None:
        loss_curve(records, self.run.out / "curves.png", f"Unified-GRPO {self.cfg.stage}", keys=("reward_mean", "kl"))

    def write_trained(self, final) -> None:
        """UAE: final/dit_lora in the release's PEFT format; a pipeline: final/generator_lora in
        diffusers' format (`pipe.load_lora_weights`)."""
        dit = self.acc.unwrap_model(self.policy)
        if self.cfg.model == "pipeline":
            self.backend.save_lora(dit, final / "generator_lora")
        else:
            save_dit_lora(dit, final / "dit_lora")

    def close(self) -> None:
        self.pool.shutdown()
