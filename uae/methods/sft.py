"""Decoder pre-training on image + long caption pairs (the SFT of the paper, never released).

The encoder is frozen and only embeds each caption through the "generate" template -> LLM ->
projector; the projector and the DiT (full or LoRA) learn SD3's rectified-flow objective:
x_t = (1 - sigma) x_0 + sigma * noise, the DiT predicts the velocity noise - x_0, and the loss is
the (optionally weighted) MSE, with sigma drawn by the density of `weighting_scheme` (SD3 paper,
arXiv 2403.03206, section 3.1; diffusers' training utilities).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from uae.apps.report import image_grid, loss_curve
from uae.config import field
from uae.data import (CaptionImageDataset, assign_buckets, buckets_for, center_crop_tensor, collate, item_key,
                      read_items, validate)
from uae.errors import UAEError
from uae.files import link_or_copy
from uae.hashing import content_key, fingerprint
from uae.models.decoder import save_dit, save_dit_lora
from uae.models.encoder import PROJECTOR_FILE, save_projector
from uae.models.layout import replace_projector_in_shards, shards_hold_projector
from uae.models.uae import UAE
from uae.runtime import stored_dtype
from uae.stream import ShardStream, is_shards, shard_files
from uae.training.cache import DiskCache
from uae.training.evaluation import uae_evaluated
from uae.training.parts import Parts, ensure_dit_lora, train_dit
from uae.training.precision import precision_policy
from uae.training.run import Prepared, Setup, TrainConfig
from uae.training.seeding import StepSampler, generator_for
from uae.training.setup import make_optimizer


@dataclass
class SFTConfig(TrainConfig):
    """Decoder pre-training (SFT) on image + long caption pairs."""

    data: str = field(None, help="a .jsonl of {image, caption}, a folder of images with .txt captions, a `datasets` "
                                 "save_to_disk folder (columns image, caption), or webdataset shards, streamed "
                                 "('shards/{000000..000123}.tar', a glob, a .tar or a folder of them)")
    output_dir: str = field("runs/sft", run_only=True,
                            help="checkpoints, logs, validation grids, loss plot and final/ (official layout)")
    validate_data: bool = field(False, help="only check the data, report counts, and exit", run_only=True)
    on_bad_data: str = field("error", choices=("error", "skip"),
                             help="jsonl, folders, datasets: error: stop when any item is missing / unreadable / "
                                  "caption-less; skip: train without them (shards: see --max_bad_fraction)")
    max_bad_fraction: float = field(0.01, min=0, max=1,
                                    help="webdataset shards: bad samples (undecodable image, empty caption, no image) "
                                         "are skipped and counted as they stream; a larger share stops the run")
    bad_check_after: int = field(1000, min=0, help="webdataset shards: samples a dataloader worker reads before "
                                                   "--max_bad_fraction is checked")
    shuffle_buffer: int = field(1000, min=1, help="webdataset shards: samples in each dataloader worker's shuffle "
                                                  "buffer (held as raw bytes; 1: shard order only)")
    bucketing: bool = field(False, help="aspect-ratio buckets instead of square centre crops; a batch holds one bucket")
    bucket_step: int = field(64, min=16, help="bucket sides are multiples of this (a multiple of 16)")
    max_aspect_ratio: float = field(2.0, min=1, help="most elongated bucket (height/width or width/height)")
    dit_mode: str = field("lora", choices=("lora", "full"), help="lora (train a new DiT LoRA) or full (every DiT weight)")
    cache_latents: bool = field(False, help="precompute each image's VAE posterior once (on disk); steps sample from it")
    cache_text: bool = field(False, help="precompute the frozen LLM's hidden states of each caption once (on disk); "
                                         "needs --text_padding max_length")
    text_padding: str = field("longest", choices=("longest", "max_length"),
                              help="longest (pad captions to the longest of the batch, as at inference) or "
                                   "max_length (to --max_caption_tokens, batch-independent)")
    max_caption_tokens: int = field(512, min=1, help="with text_padding max_length: tokens per templated caption "
                                                     "(longer captions are an error, never cut)")
    train_projector: bool = field(True, help="train the projector (LLM hidden states -> DiT conditioning)")
    caption_dropout: float = field(0.1, min=0, max=1, help="probability of replacing a caption with the empty prompt (for CFG)")
    weighting_scheme: str = field("logit_normal", choices=("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"),
                                  help="timestep density / loss weighting (SD3, diffusers' training utilities)")
    logit_mean: float = field(0.0, help="logit_normal mean")
    logit_std: float = field(1.0, min=0, help="logit_normal std")
    mode_scale: float = field(1.29, help="scale of the mode weighting scheme")
    latent_sampling: str = field("sample", choices=("sample", "mode"),
                                 help="VAE latents: sample (from the posterior, as diffusers' SD3 scripts) or mode")
    train_batch_size: int = field(1, min=1, help="batch size per process")
    lr_scheduler: str = field("constant_with_warmup", choices=("constant", "constant_with_warmup", "linear", "cosine",
                                                               "cosine_with_restarts", "polynomial"),
                              help="diffusers' learning-rate schedule (diffusers.optimization.get_scheduler)")
    lr_warmup_steps: int = field(0, min=0, help="warm-up steps")
    validation_prompts: list[str] = field(["a red cube on a wooden table", "a cat sitting on a window sill"],
                                          help="fixed prompts rendered every validation_steps (seeded)", run_only=True)
    validation_steps: int = field(250, min=0, help="render validation images every N steps (0: never)", run_only=True)
    validation_inference_steps: int = field(28, min=1, help="denoising steps of validation images", run_only=True)
    validation_guidance_scale: float = field(5.0, min=0, help="CFG of validation images", run_only=True)
    dataloader_num_workers: int = field(0, min=0, help="DataLoader workers", run_only=True)

    def extra_result_settings(self) -> list[str]:
        """Settings that change what this run trains only for some data: streamed shards' batches come
        from the parts of processes x dataloader workers in turn (uae.stream), so a resume with
        another worker count would read another order."""
        return ["dataloader_num_workers"] if is_shards(self.data) else []

    def __post_init__(self):
        super().__post_init__()
        if self.cache_text and self.text_padding != "max_length":
            raise UAEError("--cache_text needs --text_padding max_length (a cached caption's states must not depend "
                           "on the other captions of its batch)")
        if self.bucket_step % 16:
            raise UAEError(f"--bucket_step {self.bucket_step} must be a positive multiple of 16")


logger = logging.getLogger(__name__)


class SFTRecipe:
    """SFT: the projector and the DiT (a new LoRA, or every weight) learn the rectified-flow loss."""

    trained_by = "train_sft.py"

    def __init__(self, run):
        self.run, self.cfg, self.acc = run, run.cfg, run.acc
        self.out = run.out

    @staticmethod
    def fully_trained(cfg) -> set[str]:
        """The parts whose every weight trains (loaded in fp32 by the precision policy)."""
        return ({"projector"} if cfg.train_projector else set()) | ({"dit"} if cfg.dit_mode == "full" else set())

    @staticmethod
    def configure(model, cfg) -> Parts:
        """SFT trains the projector and the DiT (a new LoRA, or every weight); the LLM and VAE are frozen."""
        enc, dec = model.encoder, model.decoder
        enc.llm.requires_grad_(False)
        dec.pipe.vae.requires_grad_(False)
        dit = dec.pipe.transformer
        dit.requires_grad_(False)
        if cfg.dit_mode == "lora":
            ensure_dit_lora(dit, cfg)
        dit_params = train_dit(dit, lora_only=cfg.dit_mode == "lora")
        if cfg.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        enc.projector.requires_grad_(cfg.train_projector)
        return Parts({"projector": [p for p in enc.projector.parameters() if p.requires_grad], "dit": dit_params},
                     prepared={"projector": enc.projector, "dit": dit})

    # ------------------------------------------------------------------ set-up
    def _data(self):
        """The validated items of a map-style source; None for webdataset shards (streamed, see begin)."""
        cfg = self.cfg
        if is_shards(cfg.data):
            self.shards = shard_files(cfg.data)
            if cfg.cache_latents or cfg.cache_text:
                raise UAEError(f"--cache_latents and --cache_text need map-style data (every item known up front); "
                               f"data {cfg.data} is webdataset shards, streamed: drop those flags")
            logger.info("data %s: %d webdataset shard(s), streamed", cfg.data, len(self.shards))
            return None
        items = read_items(self.cfg.data)
        v = validate(items)
        logger.info("data %s: %s", self.cfg.data, v.report())
        if v.bad and self.cfg.on_bad_data == "error":
            raise UAEError(f"data {self.cfg.data} has bad items:\n{v.report()}\nFix them, or pass "
                           "--on_bad_data skip to train on the usable items only")
        if v.bad:
            logger.warning("skipping %d bad item(s) (--on_bad_data skip)", v.bad)
        if not v.ok:
            raise UAEError(f"data {self.cfg.data}: no usable item")
        return v

    def _models(self) -> Parts:
        cfg = self.cfg
        overrides = {"dit_lora": "none"}  # SFT trains the DiT (or a new LoRA) from the base weights
        self.precision = precision_policy(cfg.mixed_precision)
        model = UAE.from_pretrained(cfg.checkpoint, overrides=overrides, device=self.acc.device,
                                    dtype=self.precision.frozen,
                                    part_dtypes=self.precision.load_dtypes(self.fully_trained(cfg)))
        self.model, self.paths = model, model.components
        self.dit = model.decoder.pipe.transformer
        self.scheduler = copy.deepcopy(model.decoder.pipe.scheduler)
        parts = self.configure(model, cfg)
        self.trainable = parts.trainable
        logger.info("trainable parameters: %.3fM (projector %s, DiT %s)", sum(p.numel() for p in self.trainable) / 1e6,
                    "on" if cfg.train_projector else "off", cfg.dit_mode)
        return parts

    # ------------------------------------------------------------------ one step
    def _hidden(self, captions: list[str]) -> torch.Tensor:
        """Frozen LLM: last hidden states of the captions in the "generate" template, computed as
        at inference (the release's position ids and sdpa, `UAEEncoder.hidden_states`). Padding is
        to the longest caption of the batch, or to max_caption_tokens (needed for caching: an
        item's states must not depend on its batch)."""
        cfg, enc = self.cfg, self.model.encoder
        ids = enc.generate_ids(captions)
        length = None
        if cfg.text_padding == "max_length":
            i = max(range(len(ids)), key=lambda k: len(ids[k]))
            if len(ids[i]) > cfg.max_caption_tokens:
                raise UAEError(f"caption {captions[i][:60]!r}... has {len(ids[i])} tokens with its template, more than "
                               f"--max_caption_tokens {cfg.max_caption_tokens}: raise it (captions are never cut)")
            length = cfg.max_caption_tokens
        with torch.no_grad():  # the LLM is frozen: only the projector sees gradients
            return enc.hidden_states(*enc.pad_right(ids, length=length))

    def _embed(self, captions: list[str]) -> torch.Tensor:
        if self.text_cache is not None:
            hidden = torch.stack([self.text_cache.get(content_key(c.encode()))["hidden"] for c in captions])
            return self.projector(hidden.to(self.acc.device))
        return self.projector(self._hidden(captions))

    @torch.no_grad()
    def _precompute(self, items) -> None:
        """Fill the latent / text caches for the items missing from them (shared across processes)."""
        cfg, acc = self.cfg, self.acc
        root = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        self.latent_cache = self.text_cache = None
        shard = slice(acc.process_index, None, acc.num_processes)
        if cfg.cache_latents:
            vae_dir = Path(self.paths.SD3) / "vae"
            ns = "latents-" + fingerprint(str(vae_dir), str(self.precision.frozen), files=list(vae_dir.glob("*")))
            self.latent_cache = DiskCache(root, ns)
            ds = CaptionImageDataset(items, self.sizes)
            todo = [i for i in range(len(items))[shard] if not self.latent_cache.has(item_key(items[i], *self.sizes[i]))]
            vae = self.model.decoder.pipe.vae
            for i in tqdm(todo, desc="caching latents", disable=not todo or not acc.is_local_main_process):
                dist = vae.encode(ds.pixels(i)[None].to(acc.device)).latent_dist
                self.latent_cache.put(item_key(items[i], *self.sizes[i]), {"mean": dist.mean[0], "std": dist.std[0]})
        if cfg.cache_text:
            # "release-positions": states computed with the release's position ids (older caches were not).
            ns = "text-" + fingerprint(self.paths.llm, self.paths.llm_lora, self.paths.llm_processor,
                                       cfg.max_caption_tokens, "release-positions", str(self.precision.frozen),
                                       files=list(Path(self.paths.llm).glob("*.safetensors")))
            self.text_cache = DiskCache(root, ns)
            captions = sorted({it.caption.strip() for it in items} | {""})[shard]
            todo = [c for c in captions if not self.text_cache.has(content_key(c.encode()))]
            for c in tqdm(todo, desc="caching LLM states", disable=not todo or not acc.is_local_main_process):
                self.text_cache.put(content_key(c.encode()), {"hidden": self._hidden([c])[0]})
        acc.wait_for_everyone()

    def loss(self, batch: dict, gens: list[torch.Generator]) -> torch.Tensor:
        """The rectified-flow loss of a batch. Every random draw of a sample (caption dropout, the
        latent from its posterior, the noise, the timestep) comes from its own generator, a
        function of (seed, its global index in the run): a sample's loss does not depend on how
        the global batch is split across processes or micro-batches."""
        # diffusers takes seconds to import (the models have loaded it by now).
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        cfg, dev = self.cfg, self.acc.device
        captions = [c if torch.rand((), generator=g).item() >= cfg.caption_dropout else ""
                    for c, g in zip(batch["caption"], gens)]
        embeds = self._embed(captions)
        vae = self.model.decoder.pipe.vae
        with torch.no_grad():
            if "latent_mean" in batch:  # cached posterior
                mean, std = batch["latent_mean"].to(dev), batch["latent_std"].to(dev)
            else:
                dist = vae.encode(batch["pixels"].to(dev, vae.dtype)).latent_dist
                mean, std = dist.mean, dist.std
            if cfg.latent_sampling == "sample":  # DiagonalGaussianDistribution.sample, per sample
                eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(dev, mean.dtype)
                latents = mean + std * eps
            else:
                latents = mean
            latents = (latents.float() - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(dev)
        u = torch.cat([compute_density_for_timestep_sampling(cfg.weighting_scheme, 1, logit_mean=cfg.logit_mean,
                                                             logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                                             generator=g) for g in gens])
        idx = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)
        timesteps = self.scheduler.timesteps[idx].to(dev)
        sigmas = self.scheduler.sigmas[idx].to(dev, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pooled = self.model.decoder.pooled.to(dev).expand(latents.shape[0], -1)
        pred = self.dit_train(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                              pooled_projections=pooled, return_dict=False)[0]
        weight = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas)
        return (weight.float() * (pred.float() - (noise - latents).float()) ** 2).mean()

    # ------------------------------------------------------------------ the run
    def setup(self) -> Setup:
        from diffusers.optimization import get_scheduler  # diffusers takes seconds to import

        cfg = self.cfg
        self.data = self._data()
        if self.data is None:  # streamed: each sample's bucket is chosen as it arrives
            self.sizes = None
        elif cfg.bucketing:
            buckets = buckets_for(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)
            self.sizes = assign_buckets(self.data.ok, buckets)
            logger.info("aspect-ratio buckets in use (height x width: items): %s",
                        ", ".join(f"{h}x{w}: {self.sizes.count((h, w))}" for h, w in sorted(set(self.sizes))))
        else:
            self.sizes = [(cfg.resolution, cfg.resolution)] * len(self.data.ok)
        parts = self._models()  # new LoRA weights are drawn from the global RNG, seeded by the run
        opt = make_optimizer(cfg, self.trainable)
        sched = get_scheduler(cfg.lr_scheduler, optimizer=opt, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_steps)
        return Setup(parts, opt, lr_scheduler=sched, paths=self.paths,
                     # The LLM does not train: its captions of the held-out references are made once.
                     evaluated=uae_evaluated(self.model, cfg, encoder_trains=False),
                     linked_parts=("SD3", "llm_lora", "llm_processor") + (("dit",) if cfg.dit_mode == "lora" else ()),
                     manifest={} if cfg.dit_mode == "lora" else {"dit_lora": None})

    def attach(self, prepared: Prepared) -> None:
        self.projector, self.dit_train = prepared.modules["projector"], prepared.modules["dit"]
        self.optimizer, self.lr = prepared.optimizer, prepared.lr_scheduler

    def _stream(self, start: int) -> torch.utils.data.DataLoader:
        """Batches of the shards for micro-steps start, start + 1, ... of this process (ShardStream)."""
        cfg, acc = self.cfg, self.acc
        buckets = (buckets_for(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio) if cfg.bucketing
                   else [(cfg.resolution, cfg.resolution)])
        stream = ShardStream(self.shards, cfg.data, batch_size=cfg.train_batch_size, buckets=buckets,
                             pixels=center_crop_tensor, seed=cfg.seed, rank=acc.process_index, world=acc.num_processes,
                             skip=start, shuffle_buffer=cfg.shuffle_buffer, max_bad_fraction=cfg.max_bad_fraction,
                             bad_check_after=cfg.bad_check_after)
        stream.check_parts(cfg.dataloader_num_workers)
        if start:
            logger.info("resuming the stream: each worker reads and decodes again the %d batch(es) it gave before",
                        start)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.dataloader_num_workers)

    def next_batch(self) -> dict:
        batch = next(self.batches)
        if self.data is None:
            if "error" in batch:
                raise UAEError(batch["error"])
            self.bad[self.micro % max(self.cfg.dataloader_num_workers, 1)] = batch.pop("bad")
        return batch

    def begin(self, start: int) -> None:
        cfg, acc = self.cfg, self.acc
        accum = cfg.gradient_accumulation_steps
        self.micro = start * accum
        self.dit_train.train()
        if self.data is None:
            self.latent_cache = self.text_cache = None  # streamed data is never cached (_data)
            self.bad = {}  # per worker: [seen, bad] of its latest batch
            self.batches = iter(self._stream(self.micro))
        else:
            self._precompute(self.data.ok)  # all processes together (it ends at a barrier)
            sampler = StepSampler(len(self.data.ok), cfg.train_batch_size, acc.num_processes, acc.process_index,
                                  cfg.seed, start * accum, cfg.max_steps * accum,
                                  groups=self.sizes if cfg.bucketing else None)
            loader = torch.utils.data.DataLoader(CaptionImageDataset(self.data.ok, self.sizes, self.latent_cache),
                                                 batch_size=cfg.train_batch_size, sampler=sampler, collate_fn=collate,
                                                 num_workers=cfg.dataloader_num_workers)
            self.batches = iter(loader)
        if start == 0 and cfg.validation_steps and acc.is_main_process:
            self.validate(0)

    def step(self, step: int) -> dict:
        cfg, acc = self.cfg, self.acc
        t0 = time.perf_counter()
        world, rank = acc.num_processes, acc.process_index
        for _ in range(cfg.gradient_accumulation_steps):
            batch = self.next_batch()
            # Sample j of this process sits at global position rank + j * world of the global batch.
            base = self.micro * cfg.train_batch_size * world + rank
            gens = [generator_for(cfg.seed, base + j * world) for j in range(len(batch["caption"]))]
            with acc.accumulate(self.projector, self.dit_train):
                loss = self.loss(batch, gens)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                self.optimizer.step()
                self.lr.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.micro += 1
        loss_all = acc.gather(loss.detach()[None]).mean().item()
        if not math.isfinite(loss_all):
            raise UAEError(f"loss is {loss_all} at step {step + 1}: lower --learning_rate or check the data")
        if cfg.validation_steps and (step + 1) % cfg.validation_steps == 0 and acc.is_main_process:
            self.validate(step + 1)
        metrics = {"loss": loss_all, "lr": float(self.lr.get_last_lr()[0]), "seconds_per_step": time.perf_counter() - t0}
        if self.data is None:  # samples this process's workers have read, and the bad ones among them
            metrics["samples_read"], metrics["bad_samples"] = (sum(c[k] for c in self.bad.values()) for k in (0, 1))
        return metrics

    def plot(self, records: list[dict]) -> None:
        loss_curve(records, self.out / "loss.png", "SFT loss")

    def close(self) -> None:
        """Nothing held beyond the run."""

    # ------------------------------------------------------------------ seeing it work
    @torch.no_grad()
    def validate(self, step: int) -> None:
        if not self.cfg.validation_prompts:
            return
        self.dit.eval()
        images = self.model.generate(list(self.cfg.validation_prompts), height=self.cfg.resolution,
                                     width=self.cfg.resolution, num_inference_steps=self.cfg.validation_inference_steps,
                                     guidance_scale=self.cfg.validation_guidance_scale, seed=self.cfg.seed, progress=False)
        grid = image_grid(images, list(self.cfg.validation_prompts), self.out / "validation" / f"step_{step:06d}.png")
        self.run.log_image(step, "validation", grid)
        self.dit.train()

    # ------------------------------------------------------------------ output
    def write_trained(self, final: Path) -> None:
        """The trained projector (in llm/, whose other files are linked, and in llm_lora's shards if
        they hold one) and the DiT (its new LoRA, or all of it)."""
        acc, cfg, p = self.acc, self.cfg, self.paths
        projector = acc.unwrap_model(self.projector)
        # The loader applies a projector in the llm_lora shards after llm/ (as the release did): if
        # the source's shards hold one, they are rewritten with the trained projector, or it would
        # be overridden by the old one.
        if p.llm_lora and shards_hold_projector(Path(p.llm_lora)):
            if (final / "llm_lora").is_symlink():
                (final / "llm_lora").unlink()
            replace_projector_in_shards(Path(p.llm_lora), final / "llm_lora", projector)
        llm = final / "llm"
        if llm.is_symlink():
            llm.unlink()
        llm.mkdir(exist_ok=True)
        for f in Path(p.llm).iterdir():
            if f.name != PROJECTOR_FILE:
                link_or_copy(f, llm / f.name, cfg.link_unchanged)
        save_projector(projector, llm)
        dit = acc.unwrap_model(self.dit_train)
        if cfg.dit_mode == "lora":
            save_dit_lora(dit, final / "dit_lora")
        else:  # in the dtype of the source's files, not of training
            save_dit(dit, final / "dit", stored_dtype(p.dit))

