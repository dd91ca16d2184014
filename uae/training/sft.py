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
from pathlib import Path

import torch

from uae.errors import UAEError
from uae.training.common import Checkpoints, MetricsLog, StepSampler, generator_for, link_or_copy, make_accelerator

logger = logging.getLogger(__name__)


class SFTRecipe:
    def __init__(self, cfg):
        from uae.config import to_dict

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.acc = make_accelerator(cfg, self.out)
        self.config_dict = to_dict(cfg)

    # ------------------------------------------------------------------ set-up
    def _data(self):
        from uae.data import read_items, validate

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

    def _models(self):
        from peft import LoraConfig

        from uae.models.uae import UAE

        cfg = self.cfg
        overrides = {"dit_lora": "none"}  # SFT trains the DiT (or a new LoRA) from the base weights
        model = UAE.from_pretrained(cfg.checkpoint, overrides=overrides, device=self.acc.device, dtype=torch.float32)
        self.model, self.paths = model, model.components
        enc, dec = model.encoder, model.decoder
        enc.llm.requires_grad_(False)
        dec.pipe.vae.requires_grad_(False)
        self.dit = dec.pipe.transformer
        self.dit.requires_grad_(False)
        if cfg.dit_mode == "lora":
            self.dit.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                            target_modules=list(cfg.lora_target_modules)))
            for n, p in self.dit.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            self.dit.requires_grad_(True)
        if cfg.gradient_checkpointing:
            self.dit.enable_gradient_checkpointing()
        enc.projector.requires_grad_(cfg.train_projector)
        self.scheduler = copy.deepcopy(dec.pipe.scheduler)
        self.trainable = [p for p in list(enc.projector.parameters()) + list(self.dit.parameters()) if p.requires_grad]
        logger.info("trainable parameters: %.3fM (projector %s, DiT %s)", sum(p.numel() for p in self.trainable) / 1e6,
                    "on" if cfg.train_projector else "off", cfg.dit_mode)

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
            from uae.io import content_key

            hidden = torch.stack([self.text_cache.get(content_key(c.encode()))["hidden"] for c in captions])
            return self.projector(hidden.to(self.acc.device))
        return self.projector(self._hidden(captions))

    @torch.no_grad()
    def _precompute(self, items) -> None:
        """Fill the latent / text caches for the items missing from them (shared across processes)."""
        from tqdm.auto import tqdm

        from uae.data import CaptionImageDataset, item_key
        from uae.io import content_key, fingerprint
        from uae.training.cache import DiskCache

        cfg, acc = self.cfg, self.acc
        root = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        self.latent_cache = self.text_cache = None
        shard = slice(acc.process_index, None, acc.num_processes)
        if cfg.cache_latents:
            vae_dir = Path(self.paths.SD3) / "vae"
            ns = "latents-" + fingerprint(str(vae_dir), files=list(vae_dir.glob("*")))
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
                                       cfg.max_caption_tokens, "release-positions",
                                       files=list(Path(self.paths.llm).glob("*.safetensors")))
            self.text_cache = DiskCache(root, ns)
            captions = sorted({it.caption.strip() for it in items} | {""})[shard]
            todo = [c for c in captions if not self.text_cache.has(content_key(c.encode()))]
            for c in tqdm(todo, desc="caching LLM states", disable=not todo or not acc.is_local_main_process):
                self.text_cache.put(content_key(c.encode()), {"hidden": self._hidden([c])[0]})
        acc.wait_for_everyone()

    def loss(self, batch: dict, gen: torch.Generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        cfg, dev = self.cfg, self.acc.device
        captions = [c if torch.rand((), generator=gen).item() >= cfg.caption_dropout else "" for c in batch["caption"]]
        embeds = self._embed(captions)
        vae = self.model.decoder.pipe.vae
        with torch.no_grad():
            if "latent_mean" in batch:  # cached posterior: the same draw as DiagonalGaussianDistribution.sample
                mean, std = batch["latent_mean"].to(dev), batch["latent_std"].to(dev)
                eps = torch.randn(mean.shape, generator=gen, dtype=mean.dtype).to(dev)
                latents = mean + std * eps if cfg.latent_sampling == "sample" else mean
            else:
                dist = vae.encode(batch["pixels"].to(dev)).latent_dist
                latents = dist.sample(generator=gen) if cfg.latent_sampling == "sample" else dist.mode()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen, dtype=latents.dtype).to(dev)
        u = compute_density_for_timestep_sampling(cfg.weighting_scheme, latents.shape[0], logit_mean=cfg.logit_mean,
                                                  logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, generator=gen)
        idx = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)
        timesteps = self.scheduler.timesteps[idx].to(dev)
        sigmas = self.scheduler.sigmas[idx].to(dev, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pooled = self.model.decoder.pooled.to(dev).expand(latents.shape[0], -1)
        pred = self.dit_train(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                              pooled_projections=pooled, return_dict=False)[0]
        weight = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas)
        return (weight.float() * (pred.float() - (noise - latents).float()) ** 2).mean()

    # ------------------------------------------------------------------ loop
    def train(self) -> Path:
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel
        from tqdm.auto import tqdm

        from uae.data import CaptionImageDataset, assign_buckets, buckets_for, collate

        cfg, acc = self.cfg, self.acc
        data = self._data()
        if cfg.bucketing:
            buckets = buckets_for(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)
            self.sizes = assign_buckets(data.ok, buckets)
            logger.info("aspect-ratio buckets in use (height x width: items): %s",
                        ", ".join(f"{h}x{w}: {self.sizes.count((h, w))}" for h, w in sorted(set(self.sizes))))
        else:
            self.sizes = [(cfg.resolution, cfg.resolution)] * len(data.ok)
        set_seed(cfg.seed)  # new LoRA weights are drawn from the global RNG
        with acc.main_process_first():  # cached artefacts (embedded checkpoints) are built by rank 0 only
            self._models()
        self._precompute(data.ok)
        opt = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        sched = get_scheduler(cfg.lr_scheduler, optimizer=opt, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_train_steps)
        self.projector, self.dit_train, opt, sched = acc.prepare(self.model.encoder.projector, self.dit, opt, sched)
        ema = None
        if cfg.use_ema:
            ema = EMAModel(self.trainable, decay=cfg.ema_decay)
            acc.register_for_checkpointing(ema)
        ckpts = Checkpoints(self.out, cfg.checkpoints_total_limit)
        start = 0
        resume = ckpts.resolve(cfg.resume_from_checkpoint)
        if resume is not None:
            start = Checkpoints.load(acc, resume)
            logger.info("resumed from %s at step %d", resume, start)
        metrics = MetricsLog(self.out / "metrics.jsonl", acc, start)
        if acc.is_main_process:
            acc.init_trackers("uae_sft", config={k: v for k, v in self.config_dict.items()
                                                  if isinstance(v, (int, float, str, bool))})
        accum = cfg.gradient_accumulation_steps
        sampler = StepSampler(len(data.ok), cfg.train_batch_size, acc.num_processes, acc.process_index, cfg.seed,
                              start * accum, cfg.max_train_steps * accum, groups=self.sizes if cfg.bucketing else None)
        loader = torch.utils.data.DataLoader(CaptionImageDataset(data.ok, self.sizes, self.latent_cache),
                                             batch_size=cfg.train_batch_size, sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.dataloader_num_workers)
        self.dit_train.train()
        bar = tqdm(total=cfg.max_train_steps, initial=start, desc="sft", disable=not acc.is_local_main_process)
        step, micro, t0 = start, start * accum, time.perf_counter()
        if start == 0 and cfg.validation_steps and acc.is_main_process:
            self.validate(0)
        for batch in loader:
            gen = generator_for(cfg.seed, micro * acc.num_processes + acc.process_index)
            with acc.accumulate(self.projector, self.dit_train):
                loss = self.loss(batch, gen)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            micro += 1
            if not acc.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.step(self.trainable)
            loss_all = acc.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(loss_all):
                raise UAEError(f"loss is {loss_all} at step {step}: lower --learning_rate or check the data")
            metrics.log(step, {"loss": loss_all, "lr": sched.get_last_lr()[0],
                               "seconds_per_step": (time.perf_counter() - t0)})
            t0 = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_all:.4f}")
            if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and step < cfg.max_train_steps:
                ckpts.save(acc, step, self.config_dict)
            if cfg.validation_steps and step % cfg.validation_steps == 0 and acc.is_main_process:
                self.validate(step)
            if step >= cfg.max_train_steps:
                break
        bar.close()
        ckpts.save(acc, step, self.config_dict)
        final = self.save_output(ema)
        if acc.is_main_process:
            from uae.report import loss_curve

            loss_curve(metrics.read(), self.out / "loss.png", "SFT loss")
        acc.end_training()
        return final

    # ------------------------------------------------------------------ seeing it work
    @torch.no_grad()
    def validate(self, step: int) -> None:
        from uae.report import image_grid

        if not self.cfg.validation_prompts:
            return
        self.dit.eval()
        images = self.model.generate(list(self.cfg.validation_prompts), height=self.cfg.resolution,
                                     width=self.cfg.resolution, num_inference_steps=self.cfg.validation_inference_steps,
                                     guidance_scale=self.cfg.validation_guidance_scale, seed=self.cfg.seed, progress=False)
        image_grid(images, list(self.cfg.validation_prompts), self.out / "validation" / f"step_{step:06d}.png")
        self.dit.train()

    # ------------------------------------------------------------------ output
    def save_output(self, ema) -> Path | None:
        """The trained weights in the official layout: `demo.py --checkpoint <output_dir>/final`."""
        from uae.checkpoints import MANIFEST, replace_projector_in_shards, shards_hold_projector
        from uae.io import atomic_write_json
        from uae.models.decoder import save_dit_lora
        from uae.models.encoder import save_projector

        acc, cfg = self.acc, self.cfg
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        if ema is not None:
            ema.store(self.trainable)
            ema.copy_to(self.trainable)
        final = self.out / "final"
        final.mkdir(exist_ok=True)
        p = self.paths
        projector = acc.unwrap_model(self.projector)
        for part in ("SD3", "llm_lora", "llm_processor"):
            if getattr(p, part):
                link_or_copy(getattr(p, part), final / part, cfg.link_unchanged)
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
            if f.name != "projector.safetensors":
                link_or_copy(f, llm / f.name, cfg.link_unchanged)
        save_projector(projector, llm)
        dit = acc.unwrap_model(self.dit_train)
        if cfg.dit_mode == "lora":
            link_or_copy(p.dit, final / "dit", cfg.link_unchanged)
            save_dit_lora(dit, final / "dit_lora")
            manifest = {}
        else:
            dit.save_pretrained(final / "dit")
            manifest = {"dit_lora": None}
        atomic_write_json(final / MANIFEST, {**manifest, "trained_by": "train_sft.py", "config": self.config_dict})
        if ema is not None:
            ema.restore(self.trainable)
        logger.info("wrote %s (official layout: demo.py --checkpoint %s)", final, final)
        return final
