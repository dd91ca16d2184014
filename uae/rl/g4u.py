"""Unified-GRPO stage 2, Generation for Understanding: GRPO on the encoder's LoRA.

The prompt is the caption instruction + an image; the G sampled captions are the actions; a
caption's reward is the similarity of the frozen decoder's image from that caption to the input
image. The decoder is conditioned through the LLM itself (as at inference): with the current
LoRA by default, with `frozen_embedding` through the LoRA-free LLM.

On-policy: captions are sampled with an explicit generation config whose only logits processors
are the temperature and the suppressed vision tokens, exactly what the log-probabilities are
recomputed with (a checkpoint's generation_config.json may hold repetition_penalty, top_k or top_p,
which would make the rollouts come from another distribution than the one the ratio assumes).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from dataclasses import dataclass, field

import torch

from uae.errors import UAEError
from uae.rl.grpo import clipped_surrogate, ratio_stats, token_loss
from uae.rl.iteration import Phases, gathered_advantages, iteration_metrics, iteration_share
from uae.data import load_references
from uae.rl.kl import kl_reference
from uae.rl.rewards import default_reward, score
from uae.training.seeding import generator_for
from uae.training.setup import make_optimizer
from uae.training.parts import Parts, train_lora_only
from uae.training.precision import precision_policy

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One process's captions of an iteration."""

    batch: dict                         # the caption prompts (instruction + image), processor outputs
    completion: torch.Tensor            # (B, T) sampled tokens, padded after the first end-of-sequence token
    token_mask: torch.Tensor            # (B, T) bool: the tokens of the action (up to and including that token)
    truncated: torch.Tensor             # (B,) bool: no end-of-sequence token within max_new_tokens
    texts: list[str]                    # the captions, decoded unstripped
    rows: list[slice]                   # the micro-batches of the log-prob forwards
    old_log_probs: torch.Tensor | None  # (B, T) at sampling time; None: the first update's own, detached
    images: list = field(default_factory=list)  # the decoder's image of each caption (filled by scoring)


def _pixel_rows(batch, rows: slice) -> torch.Tensor:
    """Qwen2.5-VL flattens every image's patches into one pixel_values tensor: the rows of images
    `rows` are the patches counted by their image_grid_thw."""
    counts = batch["image_grid_thw"].prod(-1).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return batch["pixel_values"][starts[rows.start]:starts[rows.stop]]


@contextlib.contextmanager
def only_this_generation_config(model, config):
    """generate() fills what a given config leaves unset from the model's own generation_config
    (transformers 5): for the duration of the block the model's is `config` itself, so nothing of
    the checkpoint's file (repetition_penalty, top_k, top_p, ...) leaks into the sampling."""
    before = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = before


def fully_trained(cfg) -> set[str]:
    """Parts whose every weight trains: none (a LoRA is fp32 whatever its base)."""
    return set()


def configure(model, cfg) -> Parts:
    """Stage 2 trains the encoder's LoRA; the projector and the decoder are frozen."""
    enc = model.encoder
    if not hasattr(enc.llm, "disable_adapter"):
        raise UAEError("stage g4u trains the LLM LoRA: the checkpoint needs an llm_lora/ (not --llm_lora none)")
    model.decoder.pipe.transformer.requires_grad_(False)
    model.decoder.pipe.vae.requires_grad_(False)
    enc.projector.requires_grad_(False)
    parts = Parts({"encoder": train_lora_only(enc.llm)}, prepared={"llm": enc.llm})
    if cfg.gradient_checkpointing:
        enc.qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return parts


class G4URecipe:
    """Stage 2 (g4u): the encoder's LoRA learns to caption for reconstruction; the decoder is frozen."""

    trained_by = "train_grpo.py --stage g4u"
    linked_parts = ("SD3", "dit", "dit_lora", "llm", "llm_processor")
    manifest: dict = {}

    def __init__(self, run, reward=None):
        self.run, self.cfg, self.acc = run, run.cfg, run.acc
        self.reward = reward

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from uae.models.uae import UAE

        cfg, acc = self.cfg, self.acc
        self.refs = load_references(cfg.data)
        precision = precision_policy(cfg.mixed_precision)
        self.model = UAE.from_pretrained(cfg.checkpoint, device=acc.device, dtype=precision.frozen)
        self.paths = self.model.components
        parts = configure(self.model, cfg)
        self.trainable = parts.trainable
        self.reference = kl_reference(cfg, self.trainable, acc)
        if self.reward is None:
            self.reward = default_reward(cfg, acc.device, precision.frozen)
        opt = make_optimizer(cfg, self.trainable)
        modules, self.optimizer = self.run.prepare(parts, opt)
        self.run.prepare_evaluation(self.model, encoder_trains=True)
        self.policy = modules["llm"]

    # ------------------------------------------------------------------ rollouts
    @property
    def suppressed(self) -> list[int]:
        """Vision placeholder tokens: a caption containing one would not re-encode with its image,
        so they are excluded from the action space (in sampling and in the log-probabilities)."""
        c = self.model.encoder.qwen.config
        return [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]

    def generation_config(self):
        """Sampling with the temperature and the suppressed tokens only: every other processor off."""
        from transformers import GenerationConfig

        own = self.model.encoder.qwen.generation_config
        return GenerationConfig(do_sample=True, temperature=self.cfg.temperature, top_k=0, top_p=1.0, min_p=None,
                                typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                max_new_tokens=self.cfg.max_new_tokens, suppress_tokens=self.suppressed,
                                bos_token_id=own.bos_token_id, eos_token_id=own.eos_token_id,
                                pad_token_id=own.pad_token_id)

    def sample(self, batch, **kwargs):
        """Sampled completions (B, T) of the caption prompts in `batch`, on-policy."""
        config = self.generation_config()
        with torch.no_grad(), only_this_generation_config(self.model.encoder.qwen, config):
            return self.model.encoder.llm.generate(**batch, generation_config=config, **kwargs)

    def token_logprobs(self, model, batch, completion, rows: slice | None = None) -> torch.Tensor:
        """log p(completion token | prefix) under `model` with the sampling processors (temperature,
        suppressed tokens), (B, T); `rows`: only these samples of the batch. The LM head runs on
        the completion's positions only (`logits_to_keep`): the logits are samples x tokens x the
        vocabulary (151,936 for Qwen2.5-VL), the largest activation of this stage."""
        if rows is not None:
            batch = {k: v[rows] if k != "pixel_values" else _pixel_rows(batch, rows) for k, v in batch.items()}
            completion = completion[rows]
        ids = torch.cat([batch["input_ids"], completion], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(completion)], dim=1)
        extra = {}
        if "mm_token_type_ids" in batch:  # where the image tokens are: M-RoPE positions depend on it
            extra["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
        t = completion.shape[1]
        out = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"], logits_to_keep=t + 1, **extra)
        logits = out.logits[:, :-1].float() / self.cfg.temperature
        logits[..., self.suppressed] = float("-inf")
        return torch.log_softmax(logits, dim=-1).gather(-1, completion[..., None])[..., 0]

    def decoder_seeds(self, it: int, share) -> list[int]:
        """The decoder's initial-noise seed of each of this process's captions: one per group by
        default (a group's captions are compared on the same noise, so the advantage reflects the
        caption, not the noise), new in every iteration and for every group of the iteration
        whatever process it is on; with decoder_noise "sample", one per caption."""
        per_group = self.cfg.decoder_noise == "group"
        n = len(share.prompts) * self.cfg.group_size
        return [generator_for(self.cfg.seed + 2, it * n + ((share.offset + j) // self.cfg.group_size if per_group
                                                             else share.offset + j)).initial_seed() % 2 ** 31
                for j in range(share.size)]

    def micro_batches(self, n: int) -> list[slice]:
        size = self.cfg.train_batch_size or n
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def begin(self, start: int) -> None:
        """Nothing to build: an iteration's prompts and randomness are functions of (seed, iteration)."""

    def close(self) -> None:
        """Nothing held."""

    # ------------------------------------------------------------------ one iteration
    def step(self, it: int) -> dict:
        """Rollout (captions sampled on-policy), score (the frozen decoder's images from them
        against the inputs; advantages over the whole iteration's groups), update (token-level
        PPO-clip, `inner_epochs` optimizer steps), as TRL splits `_generate_and_score_completions`
        and `compute_loss`."""
        cfg, acc = self.cfg, self.acc
        phase = Phases()
        share = iteration_share(cfg, it, len(self.refs), acc.num_processes, acc.process_index)
        with phase("sampling"):
            roll = self.rollout(it, share)
        with phase("reward"):
            scores, all_rewards, adv = self.score_rollout(it, share, roll)
        with phase("train"):
            stats = self.update(roll, adv.values[share.offset:share.offset + share.size])
        dev = acc.device
        # Caption length in words (the paper's "longer, more descriptive captions"), and in tokens.
        words = acc.gather(torch.tensor([float(len(t.split())) for t in roll.texts], device=dev)).tolist()
        tokens = acc.gather(roll.token_mask.sum(1).float()).tolist()
        truncated = acc.gather(roll.truncated.float()).mean().item()
        values = iteration_metrics(acc, all_rewards, scores, adv, phase)
        values.update(caption_len_mean=sum(words) / len(words), caption_len_median=statistics.median(words),
                      caption_len_max=max(words), caption_tokens_mean=sum(tokens) / len(tokens),
                      truncated_fraction=truncated, **stats)
        if cfg.image_log_steps and (it + 1) % cfg.image_log_steps == 0 and acc.is_main_process:
            self._log_samples(it + 1, share.samples, roll.images, roll.texts, scores["total"])
        return values

    def rollout(self, it: int, share) -> "Rollout":
        """This process's captions of the iteration: sampled, cut after the first end-of-sequence
        token, and (when an optimizer step will not be the first after them) their log-probs."""
        cfg, acc, enc = self.cfg, self.acc, self.model.encoder
        mine = share.samples
        self.policy.eval()
        batch = enc.caption_inputs([self.refs[p].image for p in mine])
        torch.manual_seed(generator_for(cfg.seed, it * acc.num_processes + acc.process_index).initial_seed())
        out = self.sample(batch)
        completion = out[:, batch["input_ids"].shape[1]:]
        eos = enc.qwen.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        is_eos = torch.zeros_like(completion, dtype=torch.bool)
        for e in eos:
            is_eos |= completion == e
        # Tokens up to and including the first end-of-sequence token are the action; a caption
        # without one was cut at max_new_tokens.
        after = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
        tok_mask = ~after
        pad = enc.qwen.generation_config.pad_token_id
        completion = completion.masked_fill(after, pad if pad is not None else 0)
        # Unstripped, as the release turns a caption into a prompt.
        texts = enc.processor.batch_decode(completion.masked_fill(~tok_mask, pad or 0), skip_special_tokens=True)
        rows = self.micro_batches(len(mine))
        old_lp = None
        if cfg.inner_epochs > 1:
            # With one optimizer step per rollout batch the policy has not moved when it is taken:
            # the old log-probs are the current ones, detached (TRL's shortcut; one forward saved).
            with torch.no_grad():
                old_lp = torch.cat([self.token_logprobs(self.policy, batch, completion, r) for r in rows])
        return Rollout(batch, completion, tok_mask, ~is_eos.any(1), texts, rows, old_lp)

    def score_rollout(self, it: int, share, roll: "Rollout"):
        """Rewards of this process's captions (their images by the frozen decoder), every process's
        rewards, and the advantages of every sample of the iteration."""
        cfg, acc, enc = self.cfg, self.acc, self.model.encoder
        mine = share.samples
        seeds = self.decoder_seeds(it, share)
        gen = dict(height=cfg.resolution, width=cfg.resolution, num_inference_steps=cfg.num_steps,
                   guidance_scale=cfg.guidance_scale, seed=seeds, progress=False)
        with torch.no_grad(), (enc.llm.disable_adapter() if cfg.frozen_embedding else contextlib.nullcontext()):
            roll.images = self.model.generate(roll.texts, **gen)
        scores = score(self.reward, roll.images, [self.refs[p].key for p in mine], [self.refs[p].image for p in mine],
                       roll.texts)
        # TRL's statistics: the std with Bessel's correction (its nanstd), no clipping by default.
        all_rewards, adv = gathered_advantages(acc, scores["total"], share, cfg, unbiased=True)
        return scores, all_rewards, adv

    def update(self, roll: "Rollout", adv: torch.Tensor) -> dict:
        """`inner_epochs` optimizer steps of token-level PPO-clip (+ beta x k3 KL) on this
        process's captions, in micro-batches, normalised as `loss_type` says (TRL's `_compute_loss`).
        As TRL: every completion token counts, those of zero-variance groups too (their advantage
        is 0; the KL still acts on them); with `mask_truncated_completions`, captions cut at
        max_new_tokens are left out."""
        cfg, acc, enc = self.cfg, self.acc, self.model.encoder
        self.policy.train()
        mask = roll.token_mask & ~roll.truncated[:, None] if cfg.mask_truncated_completions else roll.token_mask
        tokens = acc.gather(mask.sum()[None].float()).sum().item()
        norm = dict(accumulation_steps=len(roll.rows), tokens_in_batch=tokens, num_processes=acc.num_processes,
                    max_completion_length=cfg.max_new_tokens)
        agg: dict[str, float] = {}
        for inner in range(cfg.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            loss_value, parts = 0.0, []
            for c, r in enumerate(roll.rows):
                ref = None
                if cfg.beta:  # before the policy's forward: swapping weights in place would corrupt its saved tensors
                    with torch.no_grad():
                        if self.reference is not None:  # the LoRA the stage started from
                            with self.reference.active():
                                ref = self.token_logprobs(enc.llm, roll.batch, roll.completion, r)
                        else:
                            with enc.llm.disable_adapter():
                                ref = self.token_logprobs(enc.llm, roll.batch, roll.completion, r)
                sync = acc.no_sync(self.policy) if c < len(roll.rows) - 1 else contextlib.nullcontext()
                with sync:  # one gradient all-reduce per optimizer step
                    lp = self.token_logprobs(self.policy, roll.batch, roll.completion, r)
                    old = lp.detach() if roll.old_log_probs is None else roll.old_log_probs[r]
                    per, _ = clipped_surrogate(lp, old, adv[r][:, None], cfg.clip_range)
                    kl = None if ref is None else torch.exp(ref - lp) - (ref - lp) - 1  # per-token k3 estimator
                    if kl is not None:
                        per = per + cfg.beta * kl
                    # Every process runs this backward even with an empty mask: the loss still depends
                    # on every LoRA weight, so the gradient all-reduce goes on.
                    loss = token_loss(per, mask[r], cfg.loss_type, **norm)
                    acc.backward(loss)
                loss_value += loss.item()
                m = mask[r]
                parts.append((int(m.sum()), ratio_stats(lp.detach()[m], old[m], cfg.clip_range,
                                                        None if kl is None else kl.detach()[m])))
            n_tok = sum(n for n, _ in parts)
            stats = {k: sum(n * s[k] for n, s in parts if n) / n_tok if n_tok else float("nan") for k in parts[0][1]}
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            self.optimizer.step()
            if inner == 0:
                agg.update({f"first_{k}": v for k, v in stats.items()})
            agg.update(stats)
            agg["loss"] = loss_value
        self.optimizer.zero_grad(set_to_none=True)
        return agg

    # ------------------------------------------------------------------ seeing it work
    def _log_samples(self, step, mine, images, texts, rewards) -> None:
        from uae.report import image_grid

        g = self.cfg.group_size
        side = images[0].size
        pics = [self.refs[mine[0]].image.resize(side)] + list(images[:g])
        labels = ["reference"] + [f"r={r:.3f} len={len(t.split())}w" for r, t in zip(rewards[:g], texts[:g])]
        grid = image_grid(pics, labels, self.run.out / "grids" / f"iter_{step:06d}.png", columns=min(g + 1, 9))
        self.run.log_image(step, "grids/group", grid)
        record = {"image": self.refs[mine[0]].key, "captions": texts[:g], "rewards": list(rewards[:g])}
        table = "\n\n".join(f"r={r:.3f}: {t}" for r, t in zip(rewards[:g], texts[:g]))
        self.run.log_sample(step, record, text=table)

    def plot(self, records: list[dict]) -> None:
        from uae.report import loss_curve, run_page

        loss_curve(records, self.run.out / "curves.png", "Unified-GRPO g4u: the aha moment",
                   keys=("reward_mean", "caption_len_mean"))
        run_page(self.run.out)

    def write_trained(self, final) -> None:
        """The trained LLM LoRA as the release stores it (three shards)."""
        from uae.checkpoints import save_official_llm_lora

        save_official_llm_lora(self.model.encoder, final / "llm_lora")
