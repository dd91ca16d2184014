"""Unified-GRPO stage 3, Understanding for Generation: Flow-GRPO on the decoder's LoRA.

Each iteration: pick prompts (the encoder's captions of reference images), repeat each G times,
sample reconstructions with the SDE sampler (CFG with both branches in one batch) while recording
every stochastic transition and its log-probability, score them with the reward, turn rewards into
group-relative advantages, then take PPO-clip steps on the recorded transitions with a KL term to
the reference policy (the same DiT with its adapter disabled: no second copy in memory).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from uae.errors import UAEError
from uae.rl.grpo import flow_kl, group_advantages, ppo_clip_loss
from uae.rl.sde import sde_step, sde_window
from uae.training.common import Checkpoints, MetricsLog, generator_for, make_accelerator, write_final

logger = logging.getLogger(__name__)


def velocity(dit, x, t, pos, neg, pooled, guidance: float):
    """The DiT's velocity with classifier-free guidance, both branches in one batched forward."""
    b = x.shape[0]
    tt = t.expand(b) if t.ndim == 0 else t
    if guidance > 1:
        out = dit(hidden_states=torch.cat([x, x]), timestep=torch.cat([tt, tt]),
                  encoder_hidden_states=torch.cat([neg, pos]), pooled_projections=torch.cat([pooled, pooled]),
                  return_dict=False)[0]
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)
    return dit(hidden_states=x, timestep=tt, encoder_hidden_states=pos, pooled_projections=pooled, return_dict=False)[0]


@torch.no_grad()
def sample_trajectory(dit, latents, sched, pos, neg, pooled, *, guidance, noise_level, kind, window, generator):
    """Run all steps; SDE on the `window` steps (recorded), the deterministic Euler step elsewhere.
    Returns (final latents, [(i, x_i, x_{i+1}, log_prob_i)] for the recorded steps)."""
    sigmas, timesteps = sched.sigmas, sched.timesteps
    sde = sde_window(len(timesteps), window)
    x, record = latents, []
    for i, t in enumerate(timesteps):
        v = velocity(dit, x.to(pos.dtype), t.to(x.device), pos, neg, pooled, guidance)
        step = sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level if sde[i] else 0.0, kind=kind,
                        sigma_max=sigmas[1], generator=generator)
        if sde[i]:
            record.append((i, x, step.prev_sample, step.log_prob))
        x = step.prev_sample
    return x, record


def decode(vae, latents) -> torch.Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W)."""
    x = latents / vae.config.scaling_factor + vae.config.shift_factor
    return ((vae.decode(x.to(vae.dtype), return_dict=False)[0].float() + 1) / 2).clamp(0, 1)


def rollout_chunks(samples: list[int], length: dict[int, int], size: int):
    """(offset, samples) chunks of at most `size` consecutive samples whose prompts' conditioning
    has one length: each prompt keeps exactly its own (release) conditioning, no longer padding."""
    start = 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or i - start == size or length[samples[i]] != length[samples[start]]:
            yield start, samples[start:i]
            start = i


def rank_share(cfg, it: int, n_refs: int, world: int, rank: int) -> tuple[list[int], list[int], int, int]:
    """The iteration's prompts, chosen the same on every process from (seed, iteration), each
    repeated group_size times; samples are split across processes in contiguous shares, so a
    group may span processes. Returns (prompts, this rank's sample prompts, share size, offset)."""
    pick = torch.randint(n_refs, (cfg.prompts_per_iteration,), generator=generator_for(cfg.seed + 1, it)).tolist()
    samples = [p for p in pick for _ in range(cfg.group_size)]
    if len(samples) % world:
        raise UAEError(f"prompts_per_iteration x group_size = {len(samples)} is not divisible by {world} processes")
    per = len(samples) // world
    return pick, samples[rank * per:(rank + 1) * per], per, rank * per


class U4GRecipe:
    """Stage 3 (u4g): the decoder's LoRA learns from the reconstruction reward; all else frozen."""

    def __init__(self, cfg, reward=None):
        from uae.config import to_dict

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.acc = make_accelerator(cfg, self.out)
        self.config_dict = to_dict(cfg)
        self.reward = reward
        self.pool = ThreadPoolExecutor(max_workers=1)  # rewards overlap the next sampling batch

    # ------------------------------------------------------------------ set-up
    def _references(self):
        """(key, image, caption or None) per reference: a folder of images (captions come from the
        encoder), a folder with .txt captions, or a .jsonl / datasets / webdataset source."""
        from uae.data import read_items

        refs = []
        for it in read_items(self.cfg.data):
            try:
                refs.append((it.image.name if it.image is not None else it.source, it.open(), it.caption))
            except Exception as e:
                logger.warning("skipping reference %s: %s", it.source, e)
        if not refs:
            raise UAEError(f"--data {self.cfg.data}: no readable reference image")
        return refs

    def plots(self, records: list[dict]) -> None:
        from uae.report import loss_curve

        loss_curve(records, self.out / "curves.png", f"Unified-GRPO {self.cfg.stage}", keys=("reward_mean", "kl"))

    def _prompts(self, refs):
        """Stage 3's prompts: the encoder's captions of the references."""
        return self._captions(refs)

    def _captions(self, refs) -> list[str]:
        """The encoder's captions of the references (prompts of stage 3), generated once and kept in
        captions.jsonl (a resumed run reads them back); with `use_data_captions`, captions that come
        with the data are used instead."""
        path = self.out / "captions.jsonl"
        if path.exists():
            stored = {r["key"]: r["caption"] for r in map(json.loads, path.read_text().splitlines())}
            if set(stored) >= {k for k, _, _ in refs}:
                return [stored[k] for k, _, _ in refs]
        use_given = self.cfg.use_data_captions
        todo = [i for i, (_, _, c) in enumerate(refs) if not (use_given and c)]
        generated = {}
        for j in range(0, len(todo), 4):
            idx = todo[j:j + 4]
            out = self.model.encoder.caption([refs[i][1] for i in idx], max_new_tokens=self.cfg.max_new_tokens,
                                             temperature=self.cfg.temperature, seed=self.cfg.seed + j)
            generated.update(zip(idx, out))
        caps = [c if (use_given and c) else generated[i] for i, (_, _, c) in enumerate(refs)]
        if self.acc.is_main_process:
            from uae.io import atomic_write_text

            atomic_write_text(path, "".join(json.dumps({"key": k, "caption": c}) + "\n" for (k, _, _), c in zip(refs, caps)))
        return caps

    def _models(self):
        from peft import LoraConfig

        from uae.models.uae import UAE

        cfg = self.cfg
        self.model = UAE.from_pretrained(cfg.checkpoint, overrides={"dit_lora": "none"}, device=self.acc.device,
                                         dtype=torch.float32)
        self.paths = self.model.components
        self.model.encoder.requires_grad_(False)
        pipe = self.model.decoder.pipe
        pipe.vae.requires_grad_(False)
        self.dit = pipe.transformer
        self.dit.requires_grad_(False)
        self.dit.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                        target_modules=list(cfg.lora_target_modules)))
        for n, p in self.dit.named_parameters():
            p.requires_grad_("lora_" in n)
        if cfg.gradient_checkpointing:
            self.dit.enable_gradient_checkpointing()
        self.trainable = [p for p in self.dit.parameters() if p.requires_grad]
        self.policy = self.dit
        self.sched = copy.deepcopy(pipe.scheduler)
        self.sched.set_timesteps(cfg.num_steps)

    def _default_reward(self):
        from uae.rl.rewards import ReconstructionReward
        from uae.runtime import resolve_dtype
        from uae.scoring.scorers import load_scorer

        cfg = self.cfg
        weights = dict(w.split("=") for w in cfg.reward_weights)
        weights = {k: float(v) for k, v in weights.items()}
        names = set(weights) | ({cfg.text_scorer} if cfg.text_reward_weight else set())
        wmode = cfg.scorer_weights if cfg.scorer_weights != "auto" else ("tiny" if cfg.checkpoint == "tiny" else "official")
        scorers = {n: load_scorer(n, weights=wmode, device=self.acc.device,
                                  dtype=resolve_dtype("float32", self.acc.device)) for n in sorted(names)}
        return ReconstructionReward(scorers, weights, cfg.text_reward_weight, cfg.text_scorer)

    # ------------------------------------------------------------------ loop
    def train(self) -> Path | None:
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        refs = self._references()
        set_seed(cfg.seed)
        with acc.main_process_first():  # cached artefacts (embedded checkpoints) are built by rank 0 only
            self._models()
            if self.reward is None:
                self.reward = self._default_reward()
        captions = self._prompts(refs)
        opt = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.policy_train, opt = acc.prepare(self.policy, opt)
        ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(self.trainable, decay=cfg.ema_decay)
            acc.register_for_checkpointing(ema)
        ckpts = Checkpoints(self.out, cfg.checkpoints_total_limit)
        start = 0
        resume = ckpts.resolve(cfg.resume_from_checkpoint)
        if resume is not None:
            start = Checkpoints.load(acc, resume)
            logger.info("resumed from %s at iteration %d", resume, start)
        metrics = MetricsLog(self.out / "metrics.jsonl", acc, start)
        samples = self.out / "samples.jsonl"
        if acc.is_main_process and samples.exists():  # keep only what the resumed run will not redo
            keep = [l for l in samples.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start]
            samples.write_text("".join(l + "\n" for l in keep))
        if acc.is_main_process:
            acc.init_trackers(f"uae_grpo_{cfg.stage}", config={k: v for k, v in self.config_dict.items()
                                                       if isinstance(v, (int, float, str, bool))})
        bar = tqdm(total=cfg.max_iterations, initial=start, desc=f"grpo {cfg.stage}", disable=not acc.is_local_main_process)
        for it in range(start, cfg.max_iterations):
            values = self.iteration(it, refs, captions, opt)
            if ema is not None and (it + 1) % cfg.ema_every == 0:
                ema.step(self.trainable)
            metrics.log(it + 1, values)
            bar.update(1)
            bar.set_postfix(reward=f"{values['reward_mean']:.4f}")
            if cfg.checkpointing_steps and (it + 1) % cfg.checkpointing_steps == 0 and it + 1 < cfg.max_iterations:
                ckpts.save(acc, it + 1, self.config_dict)
        bar.close()
        ckpts.save(acc, cfg.max_iterations, self.config_dict)
        final = self.save_output(ema)
        if acc.is_main_process:
            self.plots(metrics.read())
        acc.end_training()
        self.pool.shutdown()
        return final

    def iteration(self, it: int, refs, captions, opt) -> dict:
        cfg, acc = self.cfg, self.acc
        t_start = time.perf_counter()
        world, rank = acc.num_processes, acc.process_index
        # A group may span processes: rewards are gathered before the group statistics.
        pick, mine, per, offset = rank_share(cfg, it, len(refs), world, rank)
        # Each rollout has its own noise stream, a function of (seed, iteration, global sample index):
        # the same rollouts whatever the number of processes or the chunking.
        gens = [generator_for(cfg.seed, it * len(pick) * cfg.group_size + offset + j) for j in range(per)]
        dev = acc.device
        vae = self.model.decoder.pipe.vae
        side = cfg.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        # Rollouts in chunks of sample_batch_size; each chunk's reward runs in a worker thread while
        # the next chunk samples. Training reuses the same chunks, so the first ratio is exactly 1.
        chunks, futures, t_sample = [], [], 0.0
        t0 = time.perf_counter()
        with torch.no_grad():  # the encoder is frozen: each prompt's conditioning as at inference
            pairs = {p: self.model.encoder.embed_pair(captions[p]) for p in dict.fromkeys(mine)}
        t_sample += time.perf_counter() - t0
        for c0, idx in rollout_chunks(mine, {p: pos.shape[1] for p, (pos, _) in pairs.items()}, cfg.sample_batch_size):
            t0 = time.perf_counter()
            pos = torch.cat([pairs[p][0] for p in idx])
            neg = torch.cat([pairs[p][1] for p in idx])
            pooled = self.model.decoder.pooled.to(dev).expand(len(idx), -1)
            chunk_gens = gens[c0:c0 + len(idx)]
            latents = torch.stack([torch.randn((self.dit.config.in_channels, side, side), generator=g)
                                   for g in chunk_gens]).to(dev)
            self.dit.eval()
            final, record = sample_trajectory(self.dit, latents, self.sched, pos, neg, pooled,
                                              guidance=cfg.guidance_scale, noise_level=cfg.noise_level,
                                              kind=cfg.sde_kind, generator=chunk_gens,
                                              window=tuple(cfg.sde_window) if cfg.sde_window else None)
            with torch.no_grad():
                images = decode(vae, final)
            t_sample += time.perf_counter() - t0
            chunks.append((pos, neg, pooled, record, images))
            futures.append(self.pool.submit(self._score, images, [refs[p][0] for p in idx],
                                            [refs[p][1] for p in idx], [captions[p] for p in idx]))
        t0 = time.perf_counter()
        parts = [f.result() for f in futures]  # waits only for what did not overlap the sampling
        t_reward = time.perf_counter() - t0
        scores = {k: [v for part in parts for v in part[k]] for k in parts[0]}
        rewards = torch.tensor(scores["total"], dtype=torch.float32, device=dev)
        all_rewards = acc.gather(rewards)
        group_ids = torch.arange(len(pick), device=dev).repeat_interleave(cfg.group_size)
        adv = group_advantages(all_rewards, group_ids, std_scope=cfg.adv_std_scope, clip=cfg.adv_clip)
        my_adv, keep = adv.values[offset:offset + per], adv.keep[offset:offset + per]

        t0 = time.perf_counter()
        stats = self.train_on(chunks, my_adv, keep, opt)
        t_train = time.perf_counter() - t0
        total = time.perf_counter() - t_start
        values = {"reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std(unbiased=False).item(),
                  "skipped_groups": adv.skipped_groups, "groups": adv.groups,
                  "time_sampling": t_sample, "time_reward": t_reward, "time_train": t_train,
                  "time_other": total - t_sample - t_reward - t_train, **stats}
        for name, v in scores.items():
            if name != "total":
                values[f"reward_{name}"] = float(acc.gather(torch.as_tensor(v, device=dev)).mean())
        if cfg.image_log_steps and (it + 1) % cfg.image_log_steps == 0 and acc.is_main_process:
            self._grid(it + 1, refs, mine, torch.cat([c[4] for c in chunks]), scores["total"])
        return values

    def _score(self, images, keys, references, prompts) -> dict:
        out = self.reward.score(images, keys, references, prompts) if hasattr(self.reward, "score") else \
            {"total": torch.tensor(self.reward(images, keys, references, prompts))}
        return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}

    def train_on(self, chunks, adv, keep, opt) -> dict:
        """PPO-clip on the recorded transitions: gradients accumulated over chunks and trained
        timesteps, one optimizer step per inner epoch."""
        cfg, acc = self.cfg, self.acc
        sigmas, timesteps = self.sched.sigmas, self.sched.timesteps
        self.policy_train.train()
        agg: dict[str, float] = {}
        n = sum(len(c[3]) for c in chunks)
        for inner in range(cfg.inner_epochs):
            opt.zero_grad(set_to_none=True)
            offset, first = 0, True
            for pos, neg, pooled, record, images in chunks:
                b = images.shape[0]
                a, kp = adv[offset:offset + b], keep[offset:offset + b]
                offset += b
                for i, x, x_next, old_lp in record:
                    t = timesteps[i].to(x.device)
                    v = velocity(self.policy_train, x, t, pos, neg, pooled, cfg.guidance_scale)
                    step = sde_step(v, x, sigmas[i], sigmas[i + 1], cfg.noise_level, kind=cfg.sde_kind,
                                    sigma_max=sigmas[1], prev_sample=x_next)
                    kl = None
                    if cfg.beta:
                        with torch.no_grad():  # reference policy = the DiT with its adapter disabled
                            self.dit.disable_adapters()
                            v_ref = velocity(self.dit, x, t, pos, neg, pooled, cfg.guidance_scale)
                            self.dit.enable_adapters()
                            ref = sde_step(v_ref, x, sigmas[i], sigmas[i + 1], cfg.noise_level, kind=cfg.sde_kind,
                                           sigma_max=sigmas[1], prev_sample=x_next)
                        kl = flow_kl(step.mean, ref.mean, step.std)
                    loss, stats = ppo_clip_loss(step.log_prob, old_lp, a, cfg.clip_range, kl, cfg.beta, kp)
                    acc.backward(loss / n)
                    if inner == 0 and first:  # the first inner step: same weights as the rollout
                        agg.update({f"first_{k}": v for k, v in stats.items()})
                        first = False
                    for key, val in {**stats, "loss": loss.item()}.items():
                        agg[key] = agg.get(key, 0.0) + val / (n * cfg.inner_epochs)
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return agg

    def _grid(self, step, refs, mine, images, rewards) -> None:
        from torchvision.transforms.v2.functional import to_pil_image

        from uae.report import image_grid

        g = self.cfg.group_size
        ref = refs[mine[0]][1].resize((images.shape[-1], images.shape[-2]))
        pics = [ref] + [to_pil_image(im) for im in images[:g]]
        labels = ["reference"] + [f"r={r:.3f}" for r in rewards[:g]]
        image_grid(pics, labels, self.out / "grids" / f"iter_{step:06d}.png", columns=min(g + 1, 9))

    # Parts of the source checkpoint that final/ links unchanged; the trained part is written by
    # `write_trained`.
    unchanged_parts = ("SD3", "dit", "llm", "llm_lora", "llm_processor")

    def write_trained(self, final: Path) -> None:
        from uae.models.decoder import save_dit_lora

        save_dit_lora(self.acc.unwrap_model(self.policy_train), final / "dit_lora")

    def save_output(self, ema) -> Path | None:
        """final/: the trained part (EMA weights if kept) with the rest of the source checkpoint linked."""
        acc = self.acc
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        if ema is not None:
            ema.store(self.trainable)
            ema.copy_to(self.trainable)
        final = write_final(self.out, self.paths, self.cfg.link_unchanged, self.unchanged_parts,
                            {"trained_by": f"train_grpo.py --stage {self.cfg.stage}", "config": self.config_dict})
        self.write_trained(final)
        if ema is not None:
            ema.restore(self.trainable)
        logger.info("wrote %s (official layout: demo.py --checkpoint %s)", final, final)
        return final


class G4URecipe(U4GRecipe):
    """Stage 2, Generation for Understanding (g4u): GRPO on the encoder. The prompt is the caption
    instruction + an image; the G sampled captions are the actions; a caption's reward is the
    similarity of the frozen decoder's image from that caption to the input image. The decoder is
    conditioned through the LLM itself (as at inference): by default with the current LoRA,
    with `frozen_embedding` through the LoRA-free LLM."""

    def _models(self):
        from uae.models.uae import UAE

        cfg = self.cfg
        self.model = UAE.from_pretrained(cfg.checkpoint, device=self.acc.device, dtype=torch.float32)
        self.paths = self.model.components
        enc = self.model.encoder
        if not hasattr(enc.llm, "disable_adapter"):
            raise UAEError("stage g4u trains the LLM LoRA: the checkpoint needs an llm_lora/ (not --llm_lora none)")
        self.model.decoder.pipe.transformer.requires_grad_(False)
        self.model.decoder.pipe.vae.requires_grad_(False)
        enc.projector.requires_grad_(False)
        for n, p in enc.llm.named_parameters():
            p.requires_grad_("lora_" in n)
        self.trainable = [p for p in enc.llm.parameters() if p.requires_grad]
        self.policy = enc.llm

    def _prompts(self, refs):
        return None  # the prompts are the images themselves

    def plots(self, records: list[dict]) -> None:
        from uae.report import loss_curve, run_page

        loss_curve(records, self.out / "curves.png", "Unified-GRPO g4u: the aha moment",
                   keys=("reward_mean", "caption_len_mean"))
        run_page(self.out)

    def _inputs(self, images):
        enc = self.model.encoder
        texts = [enc.processor.apply_chat_template(enc.caption_messages(im), tokenize=False, add_generation_prompt=True)
                 for im in images]
        batch = enc.processor(text=texts, images=list(images), padding=True, padding_side="left",
                              return_tensors="pt").to(self.acc.device)
        return batch

    @property
    def suppressed(self) -> list[int]:
        """Vision placeholder tokens: a caption containing one would not re-encode with its image,
        so they are excluded from the action space (in sampling and in the log-probabilities)."""
        c = self.model.encoder.qwen.config
        return [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]

    def _token_logprobs(self, model, batch, completion) -> torch.Tensor:
        """log p(completion token | prefix) under `model` at the sampling temperature, over the
        same action space as sampling, (B, T)."""
        ids = torch.cat([batch["input_ids"], completion], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(completion)], dim=1)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"])
        p = batch["input_ids"].shape[1]
        logits = out.logits[:, p - 1:-1].float() / self.cfg.temperature
        logits[..., self.suppressed] = float("-inf")
        return torch.log_softmax(logits, dim=-1).gather(-1, completion[..., None])[..., 0]

    def iteration(self, it: int, refs, captions, opt) -> dict:
        import statistics

        cfg, acc = self.cfg, self.acc
        enc = self.model.encoder
        t_start = time.perf_counter()
        world, rank = acc.num_processes, acc.process_index
        pick, mine, per, offset = rank_share(cfg, it, len(refs), world, rank)

        t0 = time.perf_counter()
        self.policy_train.eval()
        batch = self._inputs([refs[p][1] for p in mine])
        torch.manual_seed((cfg.seed * 1_000_003 + it * world + rank) % (2 ** 63 - 1))
        eos = enc.qwen.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        with torch.no_grad():
            out = enc.llm.generate(**batch, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=cfg.max_new_tokens, suppress_tokens=self.suppressed)
        completion = out[:, batch["input_ids"].shape[1]:]
        is_eos = torch.zeros_like(completion, dtype=torch.bool)
        for e in eos:
            is_eos |= completion == e
        # Tokens up to and including the first end-of-sequence token are the action.
        after = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
        tok_mask = ~after
        pad = enc.qwen.generation_config.pad_token_id
        completion = completion.masked_fill(after, pad if pad is not None else 0)
        # Unstripped, as the release turns a caption into a prompt.
        texts = enc.processor.batch_decode(completion.masked_fill(~tok_mask, pad or 0), skip_special_tokens=True)
        with torch.no_grad():
            old_lp = self._token_logprobs(self.policy_train, batch, completion)
        t_sample = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            if cfg.frozen_embedding:
                with enc.llm.disable_adapter():
                    images = self.model.generate(texts, height=cfg.resolution, width=cfg.resolution,
                                                 num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                                 seed=cfg.seed + it, progress=False)
            else:
                images = self.model.generate(texts, height=cfg.resolution, width=cfg.resolution,
                                             num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                             seed=cfg.seed + it, progress=False)
        scores = self._score(images, [refs[p][0] for p in mine], [refs[p][1] for p in mine], texts)
        t_reward = time.perf_counter() - t0
        dev = acc.device
        all_rewards = acc.gather(torch.tensor(scores["total"], dtype=torch.float32, device=dev))
        group_ids = torch.arange(len(pick), device=dev).repeat_interleave(cfg.group_size)
        adv = group_advantages(all_rewards, group_ids, std_scope=cfg.adv_std_scope, clip=cfg.adv_clip)
        my_adv, keep = adv.values[offset:offset + per], adv.keep[offset:offset + per]

        t0 = time.perf_counter()
        self.policy_train.train()
        agg: dict[str, float] = {}
        for inner in range(cfg.inner_epochs):
            opt.zero_grad(set_to_none=True)
            lp = self._token_logprobs(self.policy_train, batch, completion)
            kl = None
            if cfg.beta:
                with torch.no_grad(), enc.llm.disable_adapter():
                    ref = self._token_logprobs(enc.llm, batch, completion)
                kl = torch.exp(ref - lp) - (ref - lp) - 1  # per-token k3 estimator
            token_keep = tok_mask & keep[:, None]
            a = my_adv[:, None].expand_as(lp)
            loss, stats = ppo_clip_loss(lp[token_keep], old_lp[token_keep], a[token_keep], cfg.clip_range,
                                        None if kl is None else kl[token_keep], cfg.beta)
            acc.backward(loss)
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            opt.step()
            if inner == 0:
                agg.update({f"first_{k}": v for k, v in stats.items()})
            agg.update(stats)
            agg["loss"] = loss.item()
        opt.zero_grad(set_to_none=True)
        t_train = time.perf_counter() - t0

        # Caption length in words (the paper's "longer, more descriptive captions"), and in tokens.
        words = acc.gather(torch.tensor([float(len(t.split())) for t in texts], device=dev)).tolist()
        tokens = acc.gather(tok_mask.sum(1).float()).tolist()
        total = time.perf_counter() - t_start
        values = {"reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std(unbiased=False).item(),
                  "caption_len_mean": sum(words) / len(words), "caption_len_median": statistics.median(words),
                  "caption_len_max": max(words), "caption_tokens_mean": sum(tokens) / len(tokens),
                  "skipped_groups": adv.skipped_groups, "groups": adv.groups,
                  "time_sampling": t_sample, "time_reward": t_reward, "time_train": t_train,
                  "time_other": total - t_sample - t_reward - t_train, **agg}
        for name, v in scores.items():
            if name != "total":
                values[f"reward_{name}"] = float(acc.gather(torch.as_tensor(v, device=dev)).mean())
        if cfg.image_log_steps and (it + 1) % cfg.image_log_steps == 0 and acc.is_main_process:
            self._log_samples(it + 1, refs, mine, images, texts, scores["total"])
        return values

    def _log_samples(self, step, refs, mine, images, texts, rewards) -> None:
        from uae.report import image_grid

        g = self.cfg.group_size
        side = images[0].size
        pics = [refs[mine[0]][1].resize(side)] + list(images[:g])
        labels = ["reference"] + [f"r={r:.3f} len={len(t.split())}w" for r, t in zip(rewards[:g], texts[:g])]
        image_grid(pics, labels, self.out / "grids" / f"iter_{step:06d}.png", columns=min(g + 1, 9))
        rec = {"step": step, "image": refs[mine[0]][0], "captions": texts[:g], "rewards": list(rewards[:g])}
        with open(self.out / "samples.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    unchanged_parts = ("SD3", "dit", "dit_lora", "llm", "llm_processor")

    def write_trained(self, final: Path) -> None:
        """The trained LLM LoRA as the release stores it (three shards)."""
        from uae.checkpoints import save_official_llm_lora

        save_official_llm_lora(self.model.encoder, final / "llm_lora")
