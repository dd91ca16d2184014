"""Stage 3's generator backends: what Flow-GRPO on a flow-matching decoder needs of the model it
trains, for UAE's SD3.5 decoder and for any diffusers SD3 or FLUX pipeline.

A backend provides, for a pipeline at one image size:

    encode(texts, negative)        each text's conditioning, one opaque dict of tensors per text
                                   (batch dimension 1: what a disk cache keeps; `batch` joins them)
    initial_latents(generators)    the pipeline's own initial latents, one generator per sample
                                   (FLUX's packed 2x2 into tokens), in float32
    schedule(num_steps)            sigmas and timesteps from the pipeline's scheduler set up as the
                                   pipeline's __call__ sets it up (FLUX: its sigmas and the mu shift of
                                   the image's token count, through diffusers' retrieve_timesteps)
    velocity(model, x, t, cond, guidance)
                                   the transformer's velocity as the pipeline computes it: SD3's
                                   classifier-free guidance over [negative, positive] with the
                                   negative's own pooled vector; FLUX's guidance embedding, one
                                   forward per step (FLUX.1-schnell, without one: the conditional
                                   forward alone)
    decode(latents)                images in [0, 1], (B, 3, H, W)
    lora_targets                   the modules a new LoRA wraps
    save_lora(transformer, folder) diffusers' LoRA format: `pipe.load_lora_weights(folder)` loads it

`sample_trajectory` runs a backend's steps with the SDE sampler of uae.rl.sde, recording the
trained steps' transitions. At noise level 0 its result is the pipeline's own
`pipe(..., output_type="latent")` from the same generators (tested).

UAE's decoder (an SD3 pipeline without text encoders, conditioned on the LLM's projected states and
one pooled vector of the empty prompt for both branches) is `UAEBackend`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from uae.errors import UAEError
from uae.models.decoder import DIT_LORA_TARGETS, decode_latents, guided_velocity
from uae.rl.sde import sde_step, sde_window

logger = logging.getLogger(__name__)

# FLUX: the attention projections of its double-stream blocks (image and text streams: the SD3
# list of Flow-GRPO, whose names FLUX's blocks share) and of its single-stream blocks (to_q / to_k /
# to_v of the joint sequence). Our choice: Flow-GRPO publishes a target list for SD3 only.
FLUX_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")


@dataclass
class Schedule:
    sigmas: torch.Tensor     # (n + 1,) float32, from 1 (noise) to 0
    timesteps: torch.Tensor  # (n,) as the scheduler gives them (the transformer's input, before FLUX's / 1000)

    @property
    def sigma_max(self) -> torch.Tensor:
        """The second sigma: the SDE's stand-in where sigma = 1 (uae.rl.sde)."""
        return self.sigmas[1]


class FlowBackend:
    """The shared part of the SD3 and FLUX backends: a diffusers pipeline at one image size."""

    kind = ""
    lora_targets: Sequence[str] = ()

    def __init__(self, pipe, height: int, width: int, *, max_sequence_length: int | None = None):
        self.pipe, self.height, self.width = pipe, height, width
        self.max_sequence_length = max_sequence_length

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def _encode_kwargs(self) -> dict:
        return {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}

    def batch(self, conds: Sequence[dict], device=None) -> dict:
        """Per-sample conditionings joined into one batch (each key concatenated), on `device`."""
        device = device or self.device
        return {k: torch.cat([c[k] for c in conds]).to(device) for k in conds[0]}

    @staticmethod
    def length(cond: dict) -> int:
        """The conditioning's token count: only conditionings of one length batch together."""
        return cond["pos"].shape[1]

    def schedule(self, num_steps: int) -> Schedule:
        """The pipeline's scheduler set up as its __call__ sets it up, on a copy (the pipeline's own
        stays as it was)."""
        import copy

        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        sched = copy.deepcopy(self.pipe.scheduler)
        retrieve_timesteps(sched, num_steps, self.device, **self._schedule_kwargs(num_steps))
        return Schedule(sched.sigmas.float(), sched.timesteps)

    def _schedule_kwargs(self, num_steps: int) -> dict:
        return {}

    def save_lora(self, transformer, folder) -> None:
        """`transformer`'s PEFT LoRA in diffusers' format (pytorch_lora_weights.safetensors), which
        `pipe.load_lora_weights(folder)` loads into a plain pipeline of the same class."""
        from peft.utils import get_peft_model_state_dict

        # The adapter's config goes with it (rank, alpha, targets): without it diffusers loads the LoRA
        # with alpha = rank, a scale of 1 instead of alpha / rank.
        type(self.pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                          transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())

    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def text_encoders(self) -> dict:
        """The pipeline's text encoders it holds, by component name."""
        return {n: m for n in self.TEXT_ENCODERS if (m := getattr(self.pipe, n, None)) is not None}

    def free_text_encoders(self) -> None:
        """Drop the pipeline's text encoders (once every prompt's conditioning is cached: stage 3
        needs only the transformer and the VAE; at full size T5-XXL alone is ~9 GB)."""
        for name in self.text_encoders():
            setattr(self.pipe, name, None)

    def call_kwargs(self, cond: dict) -> dict:
        """The pipeline's own __call__ arguments for a conditioning (`encode`'s): the pipeline then
        generates from it without its text encoders."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {"backend": self.kind, "pipeline": type(self.pipe).__name__, "height": self.height,
                "width": self.width, "max_sequence_length": self.max_sequence_length,
                "lora_targets": list(self.lora_targets)}


class SD3Backend(FlowBackend):
    """StableDiffusion3Pipeline (SD3, SD3.5): CLIP-L + CLIP-G (+ T5) prompt embeddings, classifier-
    free guidance with both branches in one batch, the negative prompt with its own pooled vector."""

    kind = "sd3"
    lora_targets = DIT_LORA_TARGETS

    def encode(self, texts: Sequence[str], negative: str = "") -> list[dict]:
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(texts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=[negative] * len(texts), **self._encode_kwargs())
        return [{"pos": pos[i:i + 1], "neg": neg[i:i + 1], "pooled": pooled[i:i + 1],
                 "neg_pooled": neg_pooled[i:i + 1]} for i in range(len(texts))]

    def initial_latents(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        return self.pipe.prepare_latents(len(generators), self.transformer.config.in_channels, self.height,
                                         self.width, torch.float32, self.device, list(generators))

    def _schedule_kwargs(self, num_steps: int) -> dict:
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.transformer.config.patch_size
        side = self.pipe.vae_scale_factor * p
        tokens = (self.height // side) * (self.width // side)
        return {"mu": calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.16))}

    def velocity(self, model, x, t, cond: dict, guidance: float, detach_uncond: bool = False) -> torch.Tensor:
        dtype = cond["pos"].dtype
        return guided_velocity(model, x.to(dtype), t, cond["pos"], cond["neg"], cond["pooled"], guidance,
                               detach_uncond=detach_uncond, neg_pooled=cond["neg_pooled"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe.vae, latents)

    def call_kwargs(self, cond: dict) -> dict:
        return {"prompt_embeds": cond["pos"], "negative_prompt_embeds": cond["neg"],
                "pooled_prompt_embeds": cond["pooled"], "negative_pooled_prompt_embeds": cond["neg_pooled"]}


class FluxBackend(FlowBackend):
    """FluxPipeline (FLUX.1-dev / -schnell): CLIP-L's pooled vector and T5's tokens, latents packed
    2x2 into tokens with their position ids, the guidance embedding instead of a negative branch."""

    kind = "flux"
    lora_targets = FLUX_LORA_TARGETS

    def __init__(self, pipe, height: int, width: int, *, max_sequence_length: int | None = None):
        super().__init__(pipe, height, width, max_sequence_length=max_sequence_length)
        self.image_ids = None

    def encode(self, texts: Sequence[str], negative: str = "") -> list[dict]:
        """Each text's T5 tokens and CLIP pooled vector (FLUX guides by its guidance embedding: no
        negative prompt)."""
        pos, pooled, _ = self.pipe.encode_prompt(prompt=list(texts), prompt_2=None, device=self.device,
                                                 num_images_per_prompt=1, **self._encode_kwargs())
        return [{"pos": pos[i:i + 1], "pooled": pooled[i:i + 1]} for i in range(len(texts))]

    def initial_latents(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        latents, self.image_ids = self.pipe.prepare_latents(
            len(generators), self.transformer.config.in_channels // 4, self.height, self.width, torch.float32,
            self.device, list(generators))
        return latents

    def _tokens(self) -> int:
        side = self.pipe.vae_scale_factor * 2
        return (self.height // side) * (self.width // side)

    def _schedule_kwargs(self, num_steps: int) -> dict:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(self._tokens(), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return {"sigmas": sigmas, "mu": mu}

    def velocity(self, model, x, t, cond: dict, guidance: float, detach_uncond: bool = False) -> torch.Tensor:
        """One forward per step: FLUX.1-dev takes the guidance scale as an embedding (there is no
        unconditional branch, so `detach_uncond` has nothing to detach)."""
        if self.image_ids is None:  # as prepare_latents makes them: one row per packed latent token
            side = self.pipe.vae_scale_factor * 2
            self.image_ids = self.pipe._prepare_latent_image_ids(x.shape[0], self.height // side, self.width // side,
                                                                 x.device, torch.float32)
        dtype = cond["pos"].dtype
        n = x.shape[0]
        tt = (t.expand(n) if t.ndim == 0 else t).to(x.dtype)
        g = torch.full((n,), guidance, device=x.device, dtype=torch.float32) \
            if self.transformer.config.guidance_embeds else None
        text_ids = torch.zeros(cond["pos"].shape[1], 3, device=x.device, dtype=dtype)
        return model(hidden_states=x.to(dtype), timestep=tt / 1000, guidance=g, pooled_projections=cond["pooled"],
                     encoder_hidden_states=cond["pos"], txt_ids=text_ids, img_ids=self.image_ids,
                     return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        unpacked = self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)
        return decode_latents(self.pipe.vae, unpacked)

    def call_kwargs(self, cond: dict) -> dict:
        return {"prompt_embeds": cond["pos"], "pooled_prompt_embeds": cond["pooled"]}


class UAEBackend(SD3Backend):
    """UAE's decoder: an SD3 pipeline without text encoders, conditioned on the encoder's projected
    states of [negative, prompt] (`embed_pair`) and one pooled vector (CLIP-L + CLIP-G of the empty
    prompt) for both branches, as the release generates."""

    kind = "uae"

    def __init__(self, model, height: int, width: int):
        super().__init__(model.decoder.pipe, height, width)
        self.model = model

    def encode(self, texts: Sequence[str], negative: str = "") -> list[dict]:
        """The release's conditioning (its own negative prompt: `negative` is not used)."""
        pooled = self.model.decoder.pooled
        out = []
        for text in texts:
            pos, neg = self.model.encoder.embed_pair(text)
            out.append({"pos": pos, "neg": neg, "pooled": pooled, "neg_pooled": pooled})
        return out


BACKENDS = {"StableDiffusion3Pipeline": SD3Backend, "FluxPipeline": FluxBackend}


def backend_for(pipe, height: int, width: int, setting: str, *, max_sequence_length: int | None = None):
    """The backend of a diffusers pipeline, or a one-line error naming `setting` when stage 3 cannot
    train it (a pipeline of another kind, or a scheduler that is not flow matching)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = type(pipe).__name__
    cls = BACKENDS.get(name)
    if cls is None:
        raise UAEError(f"{setting}: {name} is not a flow-matching pipeline stage 3 can train (it trains "
                       f"{', '.join(BACKENDS)}: SD3 / SD3.5 and FLUX)")
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise UAEError(f"{setting}: its scheduler is {type(pipe.scheduler).__name__}, not "
                       "FlowMatchEulerDiscreteScheduler: Flow-GRPO's SDE needs the flow-matching Euler schedule")
    side = pipe.vae_scale_factor * (2 if cls is FluxBackend else pipe.transformer.config.patch_size)
    if height % side or width % side:
        raise UAEError(f"{setting}: {height}x{width} is not a multiple of {side} pixels, which {name} needs")
    return cls(pipe, height, width, max_sequence_length=max_sequence_length)


@torch.no_grad()
def sample_trajectory(backend, model, latents, schedule: Schedule, cond: dict, *, guidance: float, noise_level: float,
                      kind: str, window, generator):
    """All steps of the schedule: the SDE step on the `window` steps (recorded), the deterministic
    Euler step elsewhere (and everywhere at noise level 0, where this is the pipeline's own loop).
    Returns (final latents, [(i, x_i, x_{i+1}, log_prob_i)] for the recorded steps)."""
    sigmas = schedule.sigmas
    sde = sde_window(len(schedule.timesteps), window)
    x, record = latents, []
    for i, t in enumerate(schedule.timesteps):
        v = backend.velocity(model, x, t.to(x.device), cond, guidance)
        step = sde_step(v, x, sigmas[i], sigmas[i + 1], noise_level if sde[i] else 0.0, kind=kind,
                        sigma_max=schedule.sigma_max, generator=generator)
        if sde[i]:
            record.append((i, x, step.prev_sample, step.log_prob))
        x = step.prev_sample
    return x, record
