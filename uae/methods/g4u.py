"""Unified-GRPO stage 2, Generation for Understanding: GRPO on the encoder's LoRA.

The prompt is the caption instruction + an image; the G sampled captions are the actions; a
caption's reward is the similarity of the frozen decoder's image from that caption to the input
image. The decoder is conditioned through the LLM itself (as at inference): with the current
LoRA by default, with `frozen_embedding` through the LoRA-free LLM.

Janus / Janus-Pro (`--model janus`, the paper's UMM-2: one autoregressive model both sides) trains
end to end by default: the policy captions the image, then generates the reconstruction from its
own caption as image tokens (x -> y -> x~), and the loss covers the caption tokens and the image
tokens of each sample with the sample's one advantage (`--train_tokens both`: one sequence per
sample, caption tokens then image tokens, normalised as `loss_type` says). The image tokens come
from our own sampling loop (uae.unified.janus_images), which records each token's log-probability
(`--image_logprob guided|conditional`). `--frozen_generator true --train_tokens caption` is the
control: images with the LoRA off, as a frozen part of the reward.

On-policy: captions are sampled with an explicit generation config whose only logits processors
are the temperature and the suppressed vision tokens, exactly what the log-probabilities are
recomputed with (a checkpoint's generation_config.json may hold repetition_penalty, top_k or top_p,
which would make the rollouts come from another distribution than the one the ratio assumes).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from dataclasses import dataclass, field, replace

import torch

from uae.apps.report import image_grid, loss_curve, run_page
from uae.config import field as config_field
from uae.data import load_references
from uae.errors import UAEError
from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION
from uae.models.layout import save_official_llm_lora
from uae.models.uae import UAE
from uae.random_weights.unified import resolve as resolve_model
from uae.rl.captioners import (CaptionPolicy, add_captioner_lora, save_full_captioner, train_language_model,
                               uae_policy)
from uae.rl.grpo import LOSS_TYPES, GroupConfig, clipped_surrogate, ratio_stats, token_loss
from uae.rl.iteration import Phases, check_share, gathered_advantages, iteration_metrics, iteration_share
from uae.rl.kl import FrozenLanguageModel, k3_kl, kl_reference
from uae.rl.rewards import default_reward, score
from uae.scoring.scorers import resolve_scorer_weights
from uae.training.evaluation import Evaluated, uae_evaluated
from uae.training.parts import Parts, train_lora_only
from uae.training.precision import precision_policy
from uae.training.run import Prepared, Setup
from uae.training.seeding import generator_for
from uae.training.setup import make_optimizer
from uae.unified.janus_images import image_token_logprobs
from uae.unified.loading import all_tiny, captioning_side, load_model, model_kind, read_model_args
from uae.unified.protocol import RunSettings


TRAIN_TOKENS = ("caption", "image", "both")
CAPTIONER_FINETUNE = ("lora", "full")


@dataclass
class G4UConfig(GroupConfig):
    """Unified-GRPO stage 2, Generation for Understanding. UAE publishes no settings: these are TRL's
    GRPO defaults for VLMs (8 generations, LoRA lr 1e-5, epsilon 0.2, beta 0)."""

    stage: str = config_field("g4u", choices=("g4u",), help="this stage")
    max_steps: int = config_field(1000, min=1, aliases=["--max_train_steps", "--max_iterations"], run_only=True,
                           help="GRPO iterations")
    learning_rate: float = config_field(1e-5, min=0, help="AdamW learning rate of the encoder's LoRA")
    group_size: int = config_field(8, min=2, help="captions per image (G)")
    prompts_per_iteration: int = config_field(16, min=1, help="images per iteration over all processes, drawn without replacement")
    clip_range: float = config_field(0.2, min=0, help="PPO clip range (token level)")
    beta: float = config_field(0.0, min=0, help="KL (k3, per token) weight to the reference policy")
    train_batch_size: int | None = config_field(4, min=1, help="captions per log-probability forward (their logits are "
                                                        "captions x tokens x vocabulary: the stage's largest activation)")
    frozen_embedding: bool = config_field(False, help="condition the decoder through the LoRA-free LLM instead of the "
                                               "current encoder weights")
    decoder_noise: str | None = config_field(None, choices=("group", "sample"),
                                             help="the generator's sampling noise: one seed per group (the captions "
                                                  "of a group are compared on the same noise) or one per caption. "
                                                  "Default: group, or sample when image tokens train (--model janus: "
                                                  "the image tokens are actions too, and a group sampling them from "
                                                  "one seed explores them hardly at all)")
    model: str = config_field("uae",
                       help="whose captioner trains: uae (the checkpoint's encoder LoRA; images through its own "
                            "decoder), janus (--checkpoint: Janus / Janus-Pro; a new LoRA on its language model, which "
                            "captions and then generates the reward's image from its caption: see --train_tokens, "
                            "--frozen_generator), pipeline (--captioner: any transformers "
                            "image-text-to-text model, a new LoRA on its language model; --generator: any diffusers "
                            "text-to-image pipeline), or module:Class (a user's model with a captioning side, "
                            "--model_args its constructor's arguments; with conditions_generator = True its "
                            "generator reads the LLM that trains: the paper's UMM-1, docs/examples/"
                            "llm_conditioned_sd3.py): the paper's '+ Ours' rows")
    model_args: str | None = config_field(None, help="--model module:Class: its constructor's keyword arguments, a "
                                                     "mapping (inline JSON / YAML, or a .json / .yaml file)")
    captioner: str | None = config_field(None, help="--model pipeline: the captioner that trains (hub id, folder or tiny)")
    generator: str | None = config_field(None, help="--model pipeline: the frozen text-to-image pipeline of the reward (hub "
                                             "id, folder or tiny)")
    captioner_finetune: str = config_field("lora", choices=CAPTIONER_FINETUNE,
                                           help="--model janus / pipeline: what trains on the captioner's language "
                                                "model: lora (a new LoRA, --captioner_lora_*), or full (every weight "
                                                "of its language model, fp32 master weights; the vision tower, the "
                                                "aligners, Janus's VQ model, image embeddings, image head and lm_head "
                                                "stay frozen; final/captioner is then a plain model folder)")
    captioner_lora_rank: int = config_field(16, min=1, help="--model janus / pipeline: rank of the new LoRA")
    captioner_lora_alpha: float = config_field(32.0, min=0, help="--model janus / pipeline: alpha of the new LoRA")
    captioner_lora_targets: str = config_field(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                        help="--model janus / pipeline: the modules the new LoRA wraps (a regex on module "
                                             "names: the language model's attention and MLP; the vision tower, the "
                                             "aligners and Janus's image head stay frozen; add |lm_head for the output "
                                             "layer)")
    loss_type: str = config_field("dapo", choices=LOSS_TYPES,
                           help="how token losses are summed into the loss, TRL's normalisers: dapo (over every "
                                "completion token of the iteration, on all processes: TRL's default), bnpo (over the "
                                "tokens of each micro-batch), grpo (each caption's mean, then the mean over captions), "
                                "dr_grpo (over micro-batch size x max_new_tokens)")
    mask_truncated_completions: bool = config_field(False, help="leave captions cut at max_new_tokens (no end-of-sequence "
                                                         "token) out of the loss (DAPO; TRL's option)")
    adv_clip: float = config_field(0.0, min=0, help="advantages are clipped to [-adv_clip, adv_clip] (0: no clipping, as TRL)")
    train_tokens: str | None = config_field(None, choices=TRAIN_TOKENS,
                                            help="whose tokens the loss covers, each sample with its one advantage: "
                                                 "caption (the caption tokens), image (--model janus: the image tokens "
                                                 "of the reconstruction it generates from its caption), both (the "
                                                 "paper's UMM-2: x -> caption -> image, the one model end to end). "
                                                 "Default: both for janus, caption otherwise")
    frozen_generator: bool | None = config_field(None, help="--model janus: generate the reward's images with the LoRA "
                                                            "off (the frozen generator as part of the reward; the "
                                                            "control) instead of by the policy itself. Default false "
                                                            "for janus; uae's decoder and a pipeline's generator are "
                                                            "always frozen here")
    image_logprob: str = config_field("guided", choices=("guided", "conditional"),
                                      help="--model janus, image tokens: the log-probability the ratio uses. guided: "
                                           "of the classifier-free-guided distribution the tokens are sampled from "
                                           "(Janus-Pro-R1, AR-GRPO; on-policy); conditional: of the conditional "
                                           "branch alone (T2I-R1, CoRL)")
    detach_uncond: bool = config_field(False, help="--model janus, image tokens, guided: no gradient through the "
                                                   "unconditional branch of the guidance")

    bias_correction_kl_refused = None  # applied: uae.rl.kl.k3_kl with the sampling policy's log-probs

    def __post_init__(self):
        super().__post_init__()
        kind = model_kind(self.model)
        if self.model == "pipeline" and not (self.captioner and self.generator):
            raise UAEError("--model pipeline trains --captioner's LoRA with rewards through --generator: give both")
        if self.model != "pipeline" and (self.captioner or self.generator):
            given = "--model_args" if kind == "module" else "--checkpoint"
            raise UAEError(f"--captioner / --generator are --model pipeline's; --model {self.model} uses {given}")
        if self.model_args and kind != "module":
            raise UAEError(f"--model_args is for --model module:Class; --model {self.model} takes none")
        janus = self.model == "janus"
        if self.train_tokens is None:
            self.train_tokens = "both" if janus else "caption"
        if self.frozen_generator is None:
            self.frozen_generator = kind in ("uae", "pipeline")
        if not janus and self.train_tokens != "caption":
            raise UAEError(f"--train_tokens {self.train_tokens}: only --model janus generates its images as tokens; "
                           f"--model {self.model} trains its caption tokens (--train_tokens caption)")
        if kind in ("uae", "pipeline") and not self.frozen_generator:
            raise UAEError(f"--frozen_generator false: --model {self.model}'s generator is frozen in stage 2 (UAE's "
                           "decoder trains in stage 3, train_grpo.py --stage u4g)")
        if kind == "module" and self.frozen_generator:
            raise UAEError(f"--frozen_generator true: --model {self.model} generates the reward's images as its "
                           "generate() does (a class with conditions_generator = True reads the LLM that trains, "
                           "its frozen diffusion decoder being part of the reward); leave --frozen_generator unset")
        if self.decoder_noise is None:
            self.decoder_noise = "group" if self.train_tokens == "caption" else "sample"
        if self.captioner_finetune == "full" and self.model == "uae":
            raise UAEError("--captioner_finetune full: --model uae trains its checkpoint's llm_lora; full fine-tuning "
                           "is for --model janus / pipeline")
        if self.captioner_finetune == "full" and janus and self.frozen_generator:
            raise UAEError("--captioner_finetune full with --frozen_generator true: Janus's one language model both "
                           "captions and generates, so a full fine-tune changes its images too; use "
                           "--captioner_finetune lora for the frozen-generator control")
        if self.frozen_generator and self.train_tokens != "caption":
            raise UAEError(f"--train_tokens {self.train_tokens} with --frozen_generator true: a frozen generator's "
                           "image tokens do not come from the policy; use --frozen_generator false or --train_tokens "
                           "caption")

    def resolved(self) -> "G4UConfig":
        """As TrainConfig's, for the models --model loads: `scorer_weights: auto` is tiny when
        every one of them is an embedded random model, and `tiny` names resolve to their folders
        (janus: --checkpoint; pipeline: --captioner and --generator)."""
        if self.model == "uae":
            return super().resolved()
        if model_kind(self.model) == "module":  # its sources are its own (--model_args): weights as given
            return replace(self, scorer_weights=resolve_scorer_weights(self.scorer_weights, False))
        weights = resolve_scorer_weights(self.scorer_weights,
                                         all_tiny(self.model, self.checkpoint, self.captioner, self.generator))
        if self.model == "janus":
            return replace(self, scorer_weights=weights, checkpoint=resolve_model(self.checkpoint, "janus"))
        return replace(self, scorer_weights=weights, captioner=resolve_model(self.captioner, "captioner"),
                       generator=resolve_model(self.generator, "generator"))


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
    image: "ImageRollout | None" = None  # --model janus, the policy generating: its image tokens (filled by scoring)


@dataclass
class ImageRollout:
    """The image tokens of one process's reconstructions, generated by the policy (--model janus,
    --frozen_generator false) from its own captions."""

    input_ids: torch.Tensor       # (B, L) the captions' generation prompts, left-padded, ending in <begin_of_image>
    attention_mask: torch.Tensor  # (B, L)
    tokens: torch.Tensor          # (B, N) the sampled image tokens
    sampled_log_probs: torch.Tensor  # (B, N) at sampling time, under --image_logprob


class G4URecipe:
    """Stage 2 (g4u): the encoder's LoRA learns to caption for reconstruction; the decoder is frozen."""

    trained_by = "train_grpo.py --stage g4u"

    def __init__(self, run, reward=None):
        self.run, self.cfg, self.acc = run, run.cfg, run.acc
        self.reward = reward

    @staticmethod
    def fully_trained(cfg) -> set[str]:
        """Parts whose every weight trains: the captioner's language model with --captioner_finetune
        full, else none (a LoRA is fp32 whatever its base)."""
        return {"llm"} if cfg.model != "uae" and cfg.captioner_finetune == "full" else set()

    @staticmethod
    def configure(model, cfg) -> Parts:
        """UAE: the encoder's LoRA trains; the projector and the decoder are frozen. Another model
        (`model`: its transformers captioner, Janus whole): a new LoRA on its language model, or with
        --captioner_finetune full every weight of its language model; the rest frozen. The module
        that trains (PEFT-wrapped, or the model itself) is `prepared["llm"]`."""
        if cfg.model != "uae":
            if cfg.captioner_finetune == "full":
                return Parts({"captioner": train_language_model(model)}, prepared={"llm": model})
            model.requires_grad_(False)
            lm = add_captioner_lora(model, cfg)
            return Parts({"captioner": train_lora_only(lm)}, prepared={"llm": lm})
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

    # ------------------------------------------------------------------ set-up
    def setup(self) -> Setup:
        cfg, acc = self.cfg, self.acc
        self.refs = load_references(cfg.data)
        check_share(cfg, len(self.refs), acc.num_processes)  # before anything loads
        precision = precision_policy(cfg.mixed_precision)
        parts, around = self._setup_uae(precision) if cfg.model == "uae" else self._setup_other(precision)
        self.trainable = parts.trainable
        if cfg.model != "uae" and cfg.captioner_finetune == "full":
            # `start` and `base` are the same weights here: the source checkpoint's.
            self.reference = FrozenLanguageModel(self.hf) if cfg.beta else None
        else:
            self.reference = kl_reference(cfg, self.trainable, acc)
        if self.reward is None:
            self.reward = default_reward(cfg, acc.device, precision.frozen)
        return Setup(parts, make_optimizer(cfg, self.trainable), **around)

    def attach(self, prepared: Prepared) -> None:
        self.policy, self.optimizer = prepared.modules["llm"], prepared.optimizer

    def _setup_uae(self, precision) -> tuple[Parts, dict]:
        """UAE: the checkpoint's encoder LoRA trains; the reward's images come from its decoder,
        conditioned through the current LLM (or, frozen_embedding, the LoRA-free one). Returns its
        Parts and the rest of its Setup."""
        cfg = self.cfg
        self.model = UAE.from_pretrained(cfg.checkpoint, device=self.acc.device, dtype=precision.frozen)
        parts = self.configure(self.model, cfg)
        self.captioner = uae_policy(self.model.encoder, cfg.temperature, cfg.max_new_tokens)
        return parts, dict(evaluated=uae_evaluated(self.model, cfg, encoder_trains=True), paths=self.model.components,
                           linked_parts=("SD3", "dit", "dit_lora", "llm", "llm_processor"))

    def _setup_other(self, precision) -> tuple[Parts, dict]:
        """Janus or a transformers captioner (uae.unified's adapters): a new LoRA on its language
        model trains (or, --captioner_finetune full, the language model itself); the reward's images
        come from the policy (Janus end to end) or a frozen generator (Janus with the LoRA off, a
        pipeline's); final/ holds the LoRA (`captioner_lora/`, PEFT's format) or the fine-tuned model
        (`captioner/`, a plain transformers folder).
        The held-out evaluation runs the adapter at its own settings (the reward's). Returns its
        Parts and the rest of its Setup."""
        cfg = self.cfg
        settings = RunSettings(device=str(self.acc.device), dtype=str(precision.frozen).removeprefix("torch."),
                               caption_instruction=RELEASE_CAPTION_INSTRUCTION, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                               height=cfg.resolution, width=cfg.resolution)
        module = model_kind(cfg.model) == "module"
        self.model = load_model(cfg.model, settings, checkpoint=cfg.checkpoint, captioner=cfg.captioner,
                                generator=cfg.generator, model_args=cfg.model_args)
        side = captioning_side(self.model, f"--model {cfg.model}")
        hf = self.hf = side.model
        full = cfg.captioner_finetune == "full"
        parts = self.configure(hf, cfg)
        # The adapter holds the model that trains (LoRA-wrapped, as after --captioner_lora in the runner):
        # its captions (the held-out evaluation) are the trained ones, and a generator conditioned on
        # it (conditions_generator: UMM-1) reads the trained states.
        side.model = lm = parts.prepared["llm"]
        self.captioner = CaptionPolicy(lm, hf, side.processor, side.inputs, cfg.temperature, cfg.max_new_tokens,
                                       getattr(side, "text_kwargs", {}))
        if cfg.model == "janus":
            # The reward's images (and the held-out evaluation's) by the policy itself, or with its LoRA off.
            side.image_lora = not cfg.frozen_generator
            self.image_ids = dict(bos_id=side.bos_id, boi_id=side.boi, pad_id=side.pad_id)
        if module:
            sides = ["caption", "image"] if getattr(self.model, "conditions_generator", False) else ["caption"]
        else:
            sides = ["caption"] if cfg.frozen_generator else ["caption", "image"]
        logger.info("--model %s: the trained weights serve its %s", cfg.model, " and its ".join(f"{s}s" for s in sides))
        source = cfg.checkpoint if cfg.model == "janus" else cfg.model if module else cfg.captioner
        manifest = {"model": cfg.model, "source": source, "generator": cfg.generator,
                    "captioner_finetune": cfg.captioner_finetune, "train_tokens": cfg.train_tokens}
        if module:
            manifest["model_args"] = read_model_args(cfg.model_args)
        model_flags = f"--model {cfg.model}" + (" --model_args <as in this run>" if module else "")
        if full:  # a plain transformers folder: the model under test itself
            given = ("--checkpoint" if cfg.model == "janus" else
                     "<its captioner argument in --model_args>" if module else "--captioner")
            manifest.update(captioner="captioner", captioner_lora=None, trained_sides=sides,
                            load_with=f"run_unibench.py {model_flags} {given} <this folder>/captioner ...")
        else:
            manifest.update(captioner_lora="captioner_lora", lora_sides=sides,
                            load_with=f"run_unibench.py {model_flags} ... --captioner_lora "
                                      "<this folder>/captioner_lora")
        if cfg.model == "janus" and cfg.train_tokens != "caption":
            manifest["image_logprob"] = cfg.image_logprob
        if cfg.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return (parts,
                dict(evaluated=Evaluated(self.model, side.processor.tokenizer, encoder_trains=True), paths=None,
                     manifest=manifest))

    def generate_images(self, texts: list[str], seeds: list[int]) -> tuple[list, ImageRollout]:
        """--model janus, the policy generating: the images of `texts` by the current weights (the
        adapter's model is the policy), image i from seeds[i], with each token's log-probability
        under --image_logprob (JanusAdapter.sample_images: all prompts padded together, sampled
        images_per_call at a time)."""
        side = self.model
        with side.image_lora_context():
            batch, out = side.sample_images(texts, seeds)
        logps = out.guided if self.cfg.image_logprob == "guided" else out.conditional
        return side.decode(out.tokens), ImageRollout(batch["input_ids"], batch["attention_mask"], out.tokens, logps)

    def image_logprobs(self, model, image: ImageRollout, rows: slice) -> torch.Tensor:
        """Log-probabilities (B, N) of the image tokens of samples `rows` under `model` (the
        prepared policy, or the LoRA model in a reference context), recomputed teacher-forced."""
        return image_token_logprobs(model, self.hf, image.input_ids[rows], image.attention_mask[rows],
                                    image.tokens[rows], guidance_scale=self.cfg.guidance_scale,
                                    temperature=self.model.image_temperature, mode=self.cfg.image_logprob,
                                    detach_uncond=self.cfg.detach_uncond, **self.image_ids)

    def log_probs(self, model, roll: "Rollout", rows: slice) -> torch.Tensor:
        """Log-probabilities of samples `rows` over the tokens the loss covers (--train_tokens):
        caption tokens, then image tokens, one sequence per sample."""
        parts = []
        if self.cfg.train_tokens != "image":
            parts.append(self.captioner.token_logprobs(model, roll.batch, roll.completion, rows))
        if self.cfg.train_tokens != "caption":
            parts.append(self.image_logprobs(model, roll.image, rows))
        return torch.cat(parts, dim=1)

    def loss_mask(self, roll: "Rollout") -> torch.Tensor:
        """(B, T) the tokens of the loss, as `log_probs` lays them out; with
        mask_truncated_completions a sample whose caption was cut is left out whole."""
        cfg = self.cfg
        keep = ~roll.truncated[:, None] if cfg.mask_truncated_completions else torch.ones_like(roll.truncated[:, None])
        parts = []
        if cfg.train_tokens != "image":
            parts.append(roll.token_mask & keep)
        if cfg.train_tokens != "caption":
            parts.append(torch.ones_like(roll.image.tokens, dtype=torch.bool) & keep)
        return torch.cat(parts, dim=1)

    def max_tokens(self) -> int:
        """The longest sequence of the loss (dr_grpo's normaliser)."""
        n = self.cfg.max_new_tokens if self.cfg.train_tokens != "image" else 0
        return n + (self.model.image_tokens if self.cfg.train_tokens != "caption" else 0)

    @torch.no_grad()
    def reconstruct(self, texts: list[str], seeds: list[int]) -> list:
        """The reward's images of `texts`, image i from seeds[i], by the frozen generator (another
        model's adapter generates at the run's settings; Janus with its LoRA off)."""
        cfg = self.cfg
        if cfg.model != "uae":
            return self.model.generate(texts, seeds)
        with (self.model.encoder.llm.disable_adapter() if cfg.frozen_embedding else contextlib.nullcontext()):
            return self.model.generate(texts, height=cfg.resolution, width=cfg.resolution,
                                       num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                       seed=seeds, progress=False)

    # ------------------------------------------------------------------ rollouts
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
        cfg, cap = self.cfg, self.captioner
        mine = share.samples
        self.policy.eval()
        batch = cap.prompt_inputs([self.refs[p].image for p in mine])
        # Each caption from a generator of its own, seeded by its global index in the iteration: the
        # same captions on 1 or N processes, and whatever the batch.
        n = len(share.prompts) * cfg.group_size
        out = cap.sample(batch, seeds=[generator_for(cfg.seed, it * n + share.offset + j).initial_seed() % 2 ** 63
                                       for j in range(share.size)])
        completion = out[:, batch["input_ids"].shape[1]:]
        is_eos = torch.zeros_like(completion, dtype=torch.bool)
        for e in cap.eos_ids:
            is_eos |= completion == e
        # Tokens up to and including the first end-of-sequence token are the action; a caption
        # without one was cut at max_new_tokens.
        after = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
        tok_mask = ~after
        completion = completion.masked_fill(after, cap.pad_id)
        texts = cap.decode(completion, tok_mask)
        rows = self.micro_batches(len(mine))
        old_lp = None
        if cfg.inner_epochs > 1 and cfg.train_tokens != "image":
            # With one optimizer step per rollout batch the policy has not moved when it is taken:
            # the old log-probs are the current ones, detached (TRL's shortcut; one forward saved).
            with torch.no_grad():
                old_lp = torch.cat([cap.token_logprobs(self.policy, batch, completion, r) for r in rows])
        return Rollout(batch, completion, tok_mask, ~is_eos.any(1), texts, rows, old_lp)

    def score_rollout(self, it: int, share, roll: "Rollout"):
        """Rewards of this process's captions (their images by the frozen decoder), every process's
        rewards, and the advantages of every sample of the iteration."""
        cfg, acc = self.cfg, self.acc
        mine = share.samples
        seeds = self.decoder_seeds(it, share)
        if cfg.model == "janus" and not cfg.frozen_generator:
            roll.images, roll.image = self.generate_images(roll.texts, seeds)
        else:
            roll.images = self.reconstruct(roll.texts, seeds)
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
        cfg, acc, cap = self.cfg, self.acc, self.captioner
        self.policy.train()
        mask = self.loss_mask(roll)
        tokens = acc.gather(mask.sum()[None].float()).sum().item()
        norm = dict(accumulation_steps=len(roll.rows), tokens_in_batch=tokens, num_processes=acc.num_processes,
                    max_completion_length=self.max_tokens())
        old_all = None
        if cfg.inner_epochs > 1:  # the captions' from the rollout, the image tokens' from their sampling
            old_all = torch.cat(([roll.old_log_probs] if cfg.train_tokens != "image" else [])
                                + ([roll.image.sampled_log_probs] if cfg.train_tokens != "caption" else []), dim=1)
        agg: dict[str, float] = {}
        for inner in range(cfg.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            loss_value, parts = 0.0, []
            for c, r in enumerate(roll.rows):
                ref = None
                if cfg.beta:  # before the policy's forward: swapping weights in place would corrupt its saved tensors
                    with torch.no_grad():
                        # the LoRA the stage started from, or none
                        with (self.reference.active() if self.reference is not None else cap.without_lora()):
                            ref = self.log_probs(cap.lm, roll, r)
                sync = acc.no_sync(self.policy) if c < len(roll.rows) - 1 else contextlib.nullcontext()
                with sync:  # one gradient all-reduce per optimizer step
                    lp = self.log_probs(self.policy, roll, r)
                    old = lp.detach() if old_all is None else old_all[r]
                    per, _ = clipped_surrogate(lp, old, adv[r][:, None], cfg.clip_range)
                    # per-token k3 estimator; --use_bias_correction_kl: times the ratio (TRL 1.16's default)
                    kl = None if ref is None else k3_kl(lp, ref, old if cfg.use_bias_correction_kl else None)
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
        loss_curve(records, self.run.out / "curves.png", "Unified-GRPO g4u: the aha moment",
                   keys=("reward_mean", "caption_len_mean"))
        run_page(self.run.out)

    def write_trained(self, final) -> None:
        """UAE: the trained LLM LoRA as the release stores it (three shards); another model: its
        captioner's LoRA in PEFT's format (`captioner_lora/`, what --captioner_lora loads), or with
        --captioner_finetune full the whole fine-tuned model with its processor (`captioner/`, a
        plain transformers folder: --checkpoint for Janus, --captioner for a pipeline)."""
        if self.cfg.model != "uae" and self.cfg.captioner_finetune == "full":
            save_full_captioner(self.acc.unwrap_model(self.policy), captioning_side(self.model, "").processor,
                                final / "captioner", precision_policy(self.cfg.mixed_precision).frozen)
            return
        if self.cfg.model != "uae":
            self.acc.unwrap_model(self.policy).save_pretrained(str(final / "captioner_lora"))
            return
        save_official_llm_lora(self.model.encoder, final / "llm_lora")
