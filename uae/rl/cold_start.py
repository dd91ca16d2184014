"""Unified-GRPO stage 1, cold start: the encoder reads image + caption instruction + a reference
caption (teacher forcing); the hidden states at the caption tokens, projected, condition the DiT,
which samples a reconstruction with gradients kept through the last `truncate_steps` steps of a
short schedule; the VAE decodes it and the loss is 1 - cos(CLIP image features of the
reconstruction, of the original). Trained: the encoder's LoRA and the projector.

Preprocessing note: the official code scales an image that is already in [0, 1] by 1/255 a second
time before CLIP; here the reconstruction (in [0, 1]) goes through the CLIP scorer's own
preprocessing once (resize, crop, mean/std), differentiably.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch

from uae.errors import UAEError
from uae.rl.rewards import to_uint8
from uae.rl.stages import decode
from uae.training.common import Checkpoints, MetricsLog, StepSampler, generator_for, make_accelerator, write_final

logger = logging.getLogger(__name__)


class ColdStartRecipe:
    def __init__(self, cfg):
        from uae.config import to_dict

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.acc = make_accelerator(cfg, self.out)
        self.config_dict = to_dict(cfg)

    def _setup(self):
        from uae.data import read_items, validate
        from uae.models.uae import UAE
        from uae.scoring.scorers import load_scorer

        cfg = self.cfg
        v = validate(read_items(cfg.data))
        if not v.ok:
            raise UAEError(f"--data {cfg.data}: stage cold_start needs images with reference captions "
                           f"(a .jsonl, a folder with .txt captions, ...): {v.report()}")
        if v.bad:
            logger.warning("skipping %d item(s) without a readable image or a caption", v.bad)
        self.items = v.ok
        self.model = UAE.from_pretrained(cfg.checkpoint, device=self.acc.device, dtype=torch.float32)
        self.paths = self.model.components
        enc, pipe = self.model.encoder, self.model.decoder.pipe
        if not hasattr(enc.llm, "disable_adapter"):
            raise UAEError("stage cold_start trains the LLM LoRA: the checkpoint needs an llm_lora/")
        pipe.transformer.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        for n, p in enc.llm.named_parameters():
            p.requires_grad_("lora_" in n)
        enc.projector.requires_grad_(True)
        self.trainable = [p for p in list(enc.llm.parameters()) + list(enc.projector.parameters()) if p.requires_grad]
        wmode = cfg.scorer_weights if cfg.scorer_weights != "auto" else ("tiny" if cfg.checkpoint == "tiny" else "official")
        self.clip = load_scorer("clip", weights=wmode, device=self.acc.device)
        self.sched = copy.deepcopy(pipe.scheduler)
        self.sched.set_timesteps(cfg.num_steps)

    def conditioning(self, image, caption: str) -> torch.Tensor:
        """Projected hidden states at the caption tokens of [instruction + image -> caption]."""
        enc = self.model.encoder
        prompt = enc.processor.apply_chat_template(enc.caption_messages(image), tokenize=False, add_generation_prompt=True)
        full = enc.processor(text=[prompt + caption], images=[image], return_tensors="pt").to(self.acc.device)
        n_prompt = enc.processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        # Through the prepared (DDP-wrapped) modules, so that gradients are synchronised across
        # processes; hidden_states[-1] is the post-norm last hidden state (as at inference).
        out = self.llm_train(input_ids=full["input_ids"], attention_mask=full["attention_mask"],
                             pixel_values=full["pixel_values"], image_grid_thw=full["image_grid_thw"],
                             output_hidden_states=True)
        hidden = out.hidden_states[-1]
        if hidden.shape[1] <= n_prompt:
            raise UAEError(f"caption {caption[:40]!r} has no tokens")
        return self.proj_train(hidden[:, n_prompt:])

    def reconstruct(self, pos: torch.Tensor, neg: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Euler sampling from noise; gradients kept through the last `truncate_steps` steps."""
        cfg = self.cfg
        pipe = self.model.decoder.pipe
        dit, vae = pipe.transformer, pipe.vae
        side = cfg.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        x = torch.randn((1, dit.config.in_channels, side, side), generator=gen).to(self.acc.device)
        pooled = self.model.decoder.pooled.to(self.acc.device)
        sig, steps = self.sched.sigmas, self.sched.timesteps
        first_grad = len(steps) - cfg.truncate_steps
        for i, t in enumerate(steps):
            with torch.set_grad_enabled(i >= first_grad):
                tt = t.expand(1).to(x.device)
                cond = dit(hidden_states=x, timestep=tt, encoder_hidden_states=pos, pooled_projections=pooled,
                           return_dict=False)[0]
                if cfg.guidance_scale > 1:  # branches of different lengths: two forwards
                    uncond = dit(hidden_states=x, timestep=tt, encoder_hidden_states=neg, pooled_projections=pooled,
                                 return_dict=False)[0]
                    cond = uncond + cfg.guidance_scale * (cond - uncond)
                x = x + (sig[i + 1] - sig[i]) * cond
        return decode(vae, x)

    def train(self) -> Path | None:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        set_seed(cfg.seed)
        with acc.main_process_first():  # cached artefacts (embedded checkpoints) are built by rank 0 only
            self._setup()
        enc = self.model.encoder
        opt = torch.optim.AdamW(self.trainable, lr=cfg.cold_start_learning_rate, weight_decay=cfg.weight_decay)
        self.llm_train, self.proj_train, opt = acc.prepare(enc.llm, enc.projector, opt)
        ckpts = Checkpoints(self.out, cfg.checkpoints_total_limit)
        start = 0
        resume = ckpts.resolve(cfg.resume_from_checkpoint)
        if resume is not None:
            start = Checkpoints.load(acc, resume)
        metrics = MetricsLog(self.out / "metrics.jsonl", acc, start)
        sampler = StepSampler(len(self.items), cfg.cold_start_batch_size, acc.num_processes, acc.process_index, cfg.seed,
                              start, cfg.cold_start_max_steps)
        order = iter(sampler)
        targets: dict[int, torch.Tensor] = {}
        bar = tqdm(total=cfg.cold_start_max_steps, initial=start, desc="cold start", disable=not acc.is_local_main_process)
        for step in range(start, cfg.cold_start_max_steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            idx = [next(order) for _ in range(cfg.cold_start_batch_size)]
            losses = []
            # Phases, as in the RL stages: sampling = the differentiable reconstruction
            # (conditioning, DiT schedule, VAE), reward = CLIP features and loss, train = backward
            # and optimizer step; other = the rest of the step.
            t_sample = t_reward = t_train = 0.0
            t1 = time.perf_counter()
            with torch.no_grad():  # the negative branch: same weights for the whole step
                neg, _ = enc.get_projected_embeddings([enc.prompts.negative_prompt])
            for k, i in enumerate(idx):
                item = self.items[i]
                image = item.open()
                # Fresh noise per step, or (cold_start_fixed_noise) one noise per image: the loss is then
                # a deterministic function of the weights, which shows optimisation without sampling noise.
                gen = generator_for(cfg.seed, i if cfg.cold_start_fixed_noise else
                                    (step * acc.num_processes + acc.process_index) * 1024 + k)
                pos = self.conditioning(image, item.caption.strip())
                recon = self.reconstruct(pos, neg, gen)
                t_sample += time.perf_counter() - t1
                t1 = time.perf_counter()
                if i not in targets:  # CLIP is frozen: each original's features are computed once
                    with torch.no_grad():
                        targets[i] = self.clip.encode_images(to_uint8([image]))
                loss = 1 - (self.clip(self.clip.pixel_values(recon)) * targets[i]).sum(-1).mean()
                t_reward += time.perf_counter() - t1
                t1 = time.perf_counter()
                acc.backward(loss / len(idx))
                losses.append(loss.item())
                t_train += time.perf_counter() - t1
                t1 = time.perf_counter()
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            opt.step()
            t_train += time.perf_counter() - t1
            value = sum(losses) / len(losses)
            if not math.isfinite(value):
                raise UAEError(f"cold-start loss is {value} at step {step + 1}: lower --cold_start_learning_rate")
            total = time.perf_counter() - t0
            metrics.log(step + 1, {"loss": value, "seconds_per_step": total, "time_sampling": t_sample,
                                   "time_reward": t_reward, "time_train": t_train,
                                   "time_other": total - t_sample - t_reward - t_train})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if cfg.checkpointing_steps and (step + 1) % cfg.checkpointing_steps == 0 and step + 1 < cfg.cold_start_max_steps:
                ckpts.save(acc, step + 1, self.config_dict)
        bar.close()
        ckpts.save(acc, cfg.cold_start_max_steps, self.config_dict)
        final = self.save_output()
        if acc.is_main_process:
            from uae.report import loss_curve

            loss_curve(metrics.read(), self.out / "curves.png", "Unified-GRPO cold start: 1 - cos(CLIP)")
        acc.end_training()
        return final

    def save_output(self) -> Path | None:
        """final/: the LLM LoRA and the trained projector in the release's three LoRA shards."""
        from uae.checkpoints import save_official_llm_lora

        acc = self.acc
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        final = write_final(self.out, self.paths, self.cfg.link_unchanged, ("SD3", "dit", "dit_lora", "llm", "llm_processor"),
                            {"trained_by": "train_grpo.py --stage cold_start", "config": self.config_dict})
        save_official_llm_lora(self.model.encoder, final / "llm_lora")
        logger.info("wrote %s (official layout: demo.py --checkpoint %s)", final, final)
        return final
