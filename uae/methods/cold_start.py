"""Unified-GRPO stage 1, cold start: the encoder reads image + caption instruction + a reference
caption (teacher forcing); its hidden states, projected, condition the DiT, which samples a
reconstruction through a short schedule (the release's training code: 512 px, 10 steps, CFG 5);
the VAE decodes it and the loss is 1 - cos(CLIP image features of the reconstruction, of the
original). The paper's cold start "gently initialises both encoder and decoder": by default the
encoder's LoRA, the projector and the decoder's LoRA (at its own, smaller learning rate) train.

Gradients (`gradient`):
- "full" (default): the exact gradient, back-propagated through every sampling step. Each step is
  gradient-checkpointed (`step_checkpointing`): only its input latent is kept, and its
  activations are recomputed during the backward pass, so memory stays about one step's
  activations whatever the number of steps, for one more forward per step.
- "truncated": the first steps run without gradients and only the last `truncate_steps` keep them.
  Cheaper, but at SD3.5's schedule (shift 3.0, 10 steps) the last step moves the latent by only
  0.0089 v: the content is set by the early steps, whose influence this gradient ignores
  (`bench/bench_cold_start.py` prints how far it is from the exact one).
- "x0": the schedule runs without gradients down to a step drawn at random, then one DiT call with
  gradients predicts the clean latent x0 = x - sigma v, which is decoded. One forward's memory, but
  the gradient of a one-step prediction rather than of the sampled image.

Conditioning (`conditioning`), each with a negative branch of the same form:
- "caption_tokens" (default): the hidden states at the caption's tokens, the instruction and the
  image in context before them; negative: the negative prompt's tokens in the same place. This is
  what the release's cold-start composition selects (labels != -100).
- "all_tokens": every token of [instruction, image, caption] (the release's ComposedModelLongContext
  projects whole sequences); negative: every token of [instruction, image, negative prompt].
- "generate_template": the caption in the text-only "generate" template, exactly as at inference
  (`UAEEncoder.embed_pair`: [negative, caption] padded together, the release's positions).

Preprocessing note: the official code scales an image that is already in [0, 1] by 1/255 a second
time before CLIP; here the reconstruction (in [0, 1]) goes through the CLIP scorer's own
preprocessing once (resize, crop, mean/std), differentiably.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from accelerate.utils import reduce
from torch.utils.checkpoint import checkpoint

from uae.apps.report import loss_curve
from uae.config import field
from uae.data import read_items, validate
from uae.errors import UAEError
from uae.images import to_uint8
from uae.models.decoder import decode_latents as decode
from uae.models.decoder import guided_velocity, save_dit_lora
from uae.models.encoder import attention, release_position_ids
from uae.models.layout import save_official_llm_lora
from uae.models.uae import UAE
from uae.random_weights import scorer_checkpoint
from uae.rl.grpo import GRPOConfig
from uae.rl.iteration import Phases
from uae.scoring.scorers import load_scorer
from uae.training.evaluation import uae_evaluated
from uae.training.parts import Parts, ensure_dit_lora, train_dit, train_lora_only
from uae.training.precision import precision_policy
from uae.training.run import Prepared, Setup
from uae.training.seeding import StepSampler, generator_for
from uae.training.setup import make_optimizer


@dataclass
class ColdStartConfig(GRPOConfig):
    """Unified-GRPO stage 1, cold start (the release's training code: 512 px, 10 steps, CFG 5)."""

    stage: str = field("cold_start", choices=("cold_start",), help="this stage")
    max_steps: int = field(200, min=1, aliases=["--max_train_steps", "--max_iterations"], run_only=True,
                           help="optimizer steps")
    batch_size: int = field(1, min=1, help="images per step and process")
    learning_rate: float = field(1e-4, min=0, help="AdamW learning rate of the encoder's LoRA and the projector")
    decoder_learning_rate: float = field(1e-5, min=0, help="AdamW learning rate of the decoder's LoRA (ours: "
                                                           "\"gently\", the paper gives none)")
    train_decoder: bool = field(True, help="train the decoder's LoRA too (the checkpoint's dit_lora, or a new one)")
    gradient: str = field("full", choices=("full", "truncated", "x0"),
                          help="full (exact, through every sampling step), truncated (only the last "
                               "truncate_steps), x0 (one-step x0 estimate at a random step)")
    truncate_steps: int = field(1, min=1, help="with --gradient truncated: steps that keep gradients (the last N)")
    step_checkpointing: bool = field(True, help="checkpoint each sampling step (about one step's activations in "
                                                "memory, one more forward per step)")
    conditioning: str = field("caption_tokens", choices=("caption_tokens", "all_tokens", "generate_template"),
                              help="caption_tokens (states at the caption's tokens after instruction + image: the "
                                   "release's cold start), all_tokens, or generate_template (as at inference)")
    detach_uncond: bool = field(False, help="the unconditional CFG branch as a constant for the gradient (Flow-GRPO's "
                                            "training forward); the cold start keeps both by default: its loss's exact "
                                            "gradient, which trains the negative prompt's conditioning too")
    fixed_noise: bool = field(False, help="the same initial noise for an image at every step (a deterministic loss, "
                                          "for debugging and overfitting checks)")

    def __post_init__(self):
        super().__post_init__()
        if self.truncate_steps > self.num_steps:
            raise UAEError(f"--truncate_steps {self.truncate_steps} must be at most num_steps ({self.num_steps})")
        if self.gradient_accumulation_steps != 1:
            raise UAEError("--gradient_accumulation_steps: the cold start accumulates over --batch_size itself; keep 1")


logger = logging.getLogger(__name__)


def euler_step(dit, x, t, sigma, sigma_next, pos, neg, pooled, guidance: float, detach_uncond: bool = False):
    """One Euler step of the flow ODE with classifier-free guidance: (next latent, velocity)."""
    v = guided_velocity(dit, x, t, pos, neg, pooled, guidance, detach_uncond)
    return x + (sigma_next - sigma) * v, v


class ColdStartRecipe:
    """Stage 1 (cold start): the reconstruction loss through the decoder's sampling trains the
    encoder's LoRA, the projector and (by default) the decoder's LoRA."""

    trained_by = "train_grpo.py --stage cold_start"

    def __init__(self, run):
        self.run, self.cfg, self.acc = run, run.cfg, run.acc

    @staticmethod
    def fully_trained(cfg) -> set[str]:
        """Parts whose every weight trains (loaded in fp32 by the precision policy): the projector."""
        return {"projector"}

    @staticmethod
    def configure(model, cfg) -> Parts:
        """The cold start trains the encoder's LoRA and the projector ("encoder" group) and, by
        default, the decoder's LoRA ("decoder" group, its own learning rate); the rest is frozen."""
        enc, pipe = model.encoder, model.decoder.pipe
        if not hasattr(enc.llm, "disable_adapter"):
            raise UAEError("stage cold_start trains the LLM LoRA: the checkpoint needs an llm_lora/")
        dit = pipe.transformer
        dit.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        enc_params = train_lora_only(enc.llm)
        enc.projector.requires_grad_(True)
        dit_params = []
        if cfg.train_decoder:
            ensure_dit_lora(dit, cfg)
            dit_params = train_dit(dit)
        if cfg.gradient_checkpointing:  # block-level, inside the per-step checkpoints
            enc.qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if dit_params:
                dit.enable_gradient_checkpointing()
        # The DiT is not prepared: its checkpointed steps are recomputed inside the backward pass, where
        # a DDP forward must not run; the recipe averages its LoRA's gradients itself.
        return Parts({"encoder": enc_params + list(enc.projector.parameters()), "decoder": dit_params},
                     prepared={"llm": enc.llm, "projector": enc.projector})

    def setup(self) -> Setup:
        cfg = self.cfg
        v = validate(read_items(cfg.data))
        if not v.ok:
            raise UAEError(f"--data {cfg.data}: stage cold_start needs images with reference captions "
                           f"(a .jsonl, a folder with .txt captions, ...): {v.report()}")
        if v.bad:
            logger.warning("skipping %d item(s) without a readable image or a caption", v.bad)
        self.items = v.ok
        precision = precision_policy(cfg.mixed_precision)
        self.model = UAE.from_pretrained(cfg.checkpoint, device=self.acc.device, dtype=precision.frozen,
                                         part_dtypes=precision.load_dtypes(self.fully_trained(cfg)))
        pipe = self.model.decoder.pipe
        parts = self.configure(self.model, cfg)
        self.enc_trainable, self.dit_trainable = parts.groups["encoder"], parts.groups["decoder"]
        self.trainable = parts.trainable
        self.clip = load_scorer("clip", scorer_checkpoint("clip", cfg.scorer_weights), device=self.acc.device,
                                dtype=precision.frozen)
        self.sched = copy.deepcopy(pipe.scheduler)
        self.sched.set_timesteps(cfg.num_steps)
        groups = [{"params": self.enc_trainable, "lr": cfg.learning_rate}]
        if self.dit_trainable:
            groups.append({"params": self.dit_trainable, "lr": cfg.decoder_learning_rate})
        self.dit_train = pipe.transformer  # not prepared (configure says why)
        self.targets: dict[int, torch.Tensor] = {}
        return Setup(parts, make_optimizer(cfg, groups), uae_evaluated(self.model, cfg, encoder_trains=True),
                     self.model.components,
                     linked_parts=("SD3", "dit", "llm", "llm_processor") + (() if self.dit_trainable else ("dit_lora",)))

    def attach(self, prepared: Prepared) -> None:
        self.llm_train, self.proj_train = prepared.modules["llm"], prepared.modules["projector"]
        self.optimizer = prepared.optimizer
        self.llm_train.train()  # (no dropout in Qwen2.5-VL) so that gradient checkpointing applies

    # ------------------------------------------------------------------ the loss
    def conditioning(self, image, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) conditioning of `caption` for `image`, as `conditioning`
        says (module docstring). Through the prepared (DDP-wrapped) modules, so that gradients are
        synchronised across processes; hidden_states[-1] is the post-norm last hidden state."""
        enc, mode = self.model.encoder, self.cfg.conditioning
        negative = enc.prompts.negative_prompt
        if mode == "generate_template":
            ids, mask = enc.pad_right(enc.generate_ids([negative, caption]))
            with attention(enc.qwen, "sdpa"):
                out = self.llm_train(input_ids=ids, attention_mask=mask, position_ids=release_position_ids(mask),
                                     output_hidden_states=True, logits_to_keep=1)
            neg, pos = self.proj_train(out.hidden_states[-1]).chunk(2)
            return pos, neg
        # [instruction, image, caption] and [instruction, image, negative] in one right-padded batch.
        batch = enc.caption_inputs([image, image], padding_side="right", answers=[caption, negative])
        n_prompt = enc.caption_inputs([image], padding_side="right")["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(1).tolist()
        if min(lengths) <= n_prompt:
            raise UAEError(f"caption {caption[:40]!r} has no tokens")
        out = self.llm_train(**batch, output_hidden_states=True, logits_to_keep=1)
        hidden = self.proj_train(out.hidden_states[-1])
        start = n_prompt if mode == "caption_tokens" else 0
        return hidden[0:1, start:lengths[0]], hidden[1:2, start:lengths[1]]

    def reconstruct(self, pos: torch.Tensor, neg: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Sample from noise with the Euler ODE; gradients as `gradient` says."""
        cfg = self.cfg
        dit, vae = self.dit_train, self.model.decoder.pipe.vae
        side = cfg.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        x = torch.randn((1, self.model.decoder.transformer.config.in_channels, side, side), generator=gen).to(self.acc.device)
        pooled = self.model.decoder.pooled.to(self.acc.device)
        sig, steps = self.sched.sigmas.to(self.acc.device), self.sched.timesteps.to(self.acc.device)
        n = len(steps)
        if cfg.gradient == "x0":
            k = int(torch.randint(n, (1,), generator=gen))  # the step whose one-step estimate is trained
            first_grad = k
        else:
            first_grad = 0 if cfg.gradient == "full" else n - cfg.truncate_steps
        for i in range(n):
            args = (dit, x, steps[i], sig[i], sig[i + 1], pos, neg, pooled, cfg.guidance_scale, cfg.detach_uncond)
            if i < first_grad:
                with torch.no_grad():
                    x, _ = euler_step(*args)
                continue
            if cfg.gradient == "x0":
                _, v = euler_step(*args)
                return decode(vae, x - sig[i] * v)
            if cfg.step_checkpointing:
                x = checkpoint(lambda *a: euler_step(*a)[0], *args, use_reentrant=False)
            else:
                x, _ = euler_step(*args)
        return decode(vae, x)

    def loss(self, image, caption: str, gen: torch.Generator, target: torch.Tensor) -> torch.Tensor:
        """1 - cos(CLIP(reconstruction), CLIP(original) = `target`), differentiable in every trained
        weight."""
        pos, neg = self.conditioning(image, caption)
        recon = self.reconstruct(pos, neg, gen)
        return 1 - (self.clip(self.clip.pixel_values(recon)) * target).sum(-1).mean()

    # ------------------------------------------------------------------ one step
    def begin(self, start: int) -> None:
        cfg, acc = self.cfg, self.acc
        self.order = iter(StepSampler(len(self.items), cfg.batch_size, acc.num_processes, acc.process_index,
                                      cfg.seed, start, cfg.max_steps))

    def step(self, step: int) -> dict:
        cfg, acc = self.cfg, self.acc
        # Phases, as in the RL stages: sampling = conditioning and the differentiable
        # reconstruction's forward, reward = CLIP features of the original, train = the loss's
        # backward (through the recomputed steps) and the optimizer step; other = the rest.
        phase = Phases()
        self.optimizer.zero_grad(set_to_none=True)
        idx = [next(self.order) for _ in range(cfg.batch_size)]
        losses = []
        for k, i in enumerate(idx):
            item = self.items[i]
            image = item.open()
            with phase("reward"):
                if i not in self.targets:  # CLIP is frozen: each original's features are computed once
                    with torch.no_grad():
                        self.targets[i] = self.clip.encode_images(to_uint8([image]))
            # Fresh noise per step, or (fixed_noise) one noise per image: the loss is then
            # a deterministic function of the weights, which shows optimisation without sampling noise.
            gen = generator_for(cfg.seed, i if cfg.fixed_noise else
                                (step * acc.num_processes + acc.process_index) * 1024 + k)
            with phase("sampling"):
                loss = self.loss(image, item.caption.strip(), gen, self.targets[i])
            with phase("train"):
                acc.backward(loss / len(idx))
                losses.append(loss.item())
        with phase("train"):
            if self.dit_trainable and acc.num_processes > 1:
                self._average_dit_grads()
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            self.optimizer.step()
        value = sum(losses) / len(losses)
        if not math.isfinite(value):
            raise UAEError(f"cold-start loss is {value} at step {step + 1}: lower --learning_rate")
        times = phase.metrics()
        return {"loss": value, "seconds_per_step": sum(times.values()), **times}

    def _average_dit_grads(self) -> None:
        """The DiT LoRA's gradients (not DDP-wrapped, see setup) averaged over the processes in
        one all-reduce of one flat buffer, as DDP's buckets do, not one collective per tensor (a
        LoRA on every attention projection of 38 blocks is hundreds of tensors)."""
        params = self.dit_trainable
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def plot(self, records: list[dict]) -> None:
        loss_curve(records, self.run.out / "curves.png", "Unified-GRPO cold start: 1 - cos(CLIP)")

    def write_trained(self, final) -> None:
        """The LLM LoRA and the trained projector in the release's three LoRA shards, and the
        decoder's LoRA when it was trained."""
        save_official_llm_lora(self.model.encoder, final / "llm_lora")
        if self.dit_trainable:
            save_dit_lora(self.model.decoder.transformer, final / "dit_lora")

    def close(self) -> None:
        """Nothing held."""
