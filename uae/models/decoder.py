"""The generation half: SD3 DiT (+ PEFT LoRA), VAE and FlowMatch scheduler, conditioned on the
encoder's projected embeddings. Sampling is diffusers' own StableDiffusion3Pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from uae.errors import UAEError

logger = logging.getLogger(__name__)

# The modules a new DiT LoRA wraps (Flow-GRPO's SD3 targets: joint attention and its context projections).
DIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _wrap(what: str, path: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UAEError:
        raise
    except Exception as e:  # shapes that do not fit the config, corrupt or missing files
        raise UAEError(f"could not load {what} from {path}: {type(e).__name__}: {e}") from None


@torch.no_grad()
def pooled_empty_prompt(sd3_path: str, dtype: torch.dtype, device) -> torch.Tensor:
    """SD3's pooled projection of the empty prompt "": CLIP-L text_embeds ++ CLIP-G text_embeds
    (the release uses this one vector for both CFG branches). The text encoders are loaded for
    this call only and released after it."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    pooled = []
    for te, tk in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tokenizer = _wrap(tk, sd3_path, CLIPTokenizer.from_pretrained, sd3_path, subfolder=tk)
        encoder = _wrap(te, sd3_path, CLIPTextModelWithProjection.from_pretrained, sd3_path,
                        subfolder=te, dtype=dtype).to(device)
        ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        pooled.append(encoder(ids).text_embeds)
        del encoder
    return torch.cat(pooled, dim=-1)


PEFT_PREFIX = "base_model.model."


def unreachable_modules(dit) -> list[str]:
    """The DiT's modules whose output never reaches the image. A joint block with `context_pre_only`
    (SD3's last block) computes the context tokens' attention output and then drops it: its context
    query projection (`attn.add_q_proj`, and the query norm `attn.norm_added_q` after it) only feeds
    that output, so nothing in them receives a gradient (measured: a LoRA there stays at its
    initial value). A new LoRA leaves them out and training freezes them."""
    return [f"transformer_blocks.{i}.attn.{name}" for i, block in enumerate(dit.transformer_blocks)
            if getattr(block, "context_pre_only", False) for name in ("add_q_proj", "norm_added_q")
            if getattr(block.attn, name) is not None]  # norm_added_q is None without qk_norm


def add_dit_lora(dit, config, adapter_name: str = "default") -> None:
    """Inject a LoRA into the DiT in place (diffusers' PEFT integration: it stays an
    SD3Transformer2DModel, and enable/disable_adapters give the LoRA-free reference without a
    second copy). On a bf16 / fp16 DiT the LoRA weights are kept in fp32, as the release's
    `PeftModel.from_pretrained` (autocast_adapter_dtype) keeps them."""
    from peft.tuners.tuners_utils import cast_adapter_dtype

    dit.add_adapter(config, adapter_name=adapter_name)
    cast_adapter_dtype(dit, adapter_name)


def _adapter_state(folder: Path) -> dict:
    """The adapter's tensors: adapter_model*.safetensors, or adapter_model.bin (PEFT's older
    format, read with weights_only=True: tensors, never pickled code)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("adapter_model*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    binary = folder / "adapter_model.bin"
    if binary.exists():
        state = torch.load(binary, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UAEError(f"dit_lora {binary} is not a state dict of tensors")
        return state
    raise UAEError(f"dit_lora {folder}: no adapter_model.safetensors (or adapter_model.bin)")


def load_dit_lora(dit, folder: str, adapter_name: str = "default") -> None:
    """Inject a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin, the
    format of the release's `dit_lora/`) into the DiT in place. Every tensor of the file must
    land on a LoRA parameter, and every LoRA parameter be loaded."""
    from peft import LoraConfig, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(folder)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in _adapter_state(Path(folder)).items()}
    add_dit_lora(dit, config, adapter_name)
    result = set_peft_model_state_dict(dit, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    lora_missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or lora_missing:
        raise UAEError(f"dit_lora {folder} does not fit the DiT: unexpected {unexpected[:3]}, "
                       f"LoRA weights not in the file {lora_missing[:3]}")


def disable_lora_dropout(dit) -> float:
    """Set the DiT's LoRA dropout to 0 (the adapters' configs say so, and PEFT's dropout modules
    become identities), as RL needs: in `.train()` mode a dropout > 0 (a release's
    adapter_config.json may set one) makes the training forward differ from the rollout's, so the
    first ratio of an iteration would not be 1. Returns the largest dropout found (0: nothing
    changed)."""
    found = [float(c.lora_dropout) for c in (getattr(dit, "peft_config", None) or {}).values()]
    for c in (getattr(dit, "peft_config", None) or {}).values():
        c.lora_dropout = 0.0
    for m in dit.modules():
        drop = getattr(m, "lora_dropout", None)
        if isinstance(drop, torch.nn.ModuleDict):
            for name in list(drop):
                if isinstance(drop[name], torch.nn.Dropout):
                    found.append(float(drop[name].p))
                    drop[name] = torch.nn.Identity()
    return max(found, default=0.0)


def save_dit_lora(dit, folder, adapter_name: str = "default", binary: bool = False) -> None:
    """Write the DiT's adapter in PEFT's folder format (loadable by `load_dit_lora` and by
    `peft.PeftModel.from_pretrained`, as the official code does); `binary` writes PEFT's older
    adapter_model.bin instead of safetensors."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dit.peft_config[adapter_name]
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(dit, adapter_name=adapter_name)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in state.items()}
    if binary:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_dit(dit, folder, dtype: torch.dtype | None = None) -> None:
    """A DiT in diffusers' folder format (config + sharded safetensors, loadable by
    SD3Transformer2DModel.from_pretrained), its weights written in `dtype` (the dtype of the files
    it was loaded from: a DiT trained in fp32 from a bf16 release is saved in bf16), tensor by
    tensor, without casting the model itself."""
    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dit.save_config(folder)
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
             for k, v in dit.state_dict().items()}
    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="10GB")


def guided_velocity(dit, x, t, pos, neg, pooled, guidance: float, detach_uncond: bool = False, neg_pooled=None):
    """The DiT's velocity with classifier-free guidance, v = v_u + g (v_c - v_u): both branches in
    one batched forward when their conditioning has the same length, two forwards when it does
    not; no negative branch at guidance <= 1. `t` is a scalar or one timestep per sample.
    `neg_pooled`: the negative branch's pooled vector where it has its own (a diffusers SD3
    pipeline's negative prompt); None: `pooled` for both (UAE's one vector of the empty prompt).

    `detach_uncond`: the unconditional branch is a constant for autograd, so the gradient is
    g * grad v_c alone instead of g * grad v_c + (1 - g) * grad v_u (Flow-GRPO's training forward,
    `compute_log_prob` in its scripts/train_sd3.py); the value is the same."""
    tt = t.expand(x.shape[0]) if t.ndim == 0 else t
    neg_pooled = pooled if neg_pooled is None else neg_pooled
    if guidance > 1 and pos.shape[1] == neg.shape[1]:
        out = dit(hidden_states=torch.cat([x, x]), timestep=torch.cat([tt, tt]), encoder_hidden_states=torch.cat([neg, pos]),
                  pooled_projections=torch.cat([neg_pooled, pooled]), return_dict=False)[0]
        uncond, cond = out.chunk(2)
    else:
        cond = dit(hidden_states=x, timestep=tt, encoder_hidden_states=pos, pooled_projections=pooled, return_dict=False)[0]
        if guidance <= 1:
            return cond
        uncond = dit(hidden_states=x, timestep=tt, encoder_hidden_states=neg, pooled_projections=neg_pooled,
                     return_dict=False)[0]
    if detach_uncond:
        uncond = uncond.detach()
    return uncond + guidance * (cond - uncond)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3 latents -> images in [0, 1], (B, 3, H, W) (differentiable)."""
    x = latents / vae.config.scaling_factor + vae.config.shift_factor
    return ((vae.decode(x.to(vae.dtype), return_dict=False)[0].float() + 1) / 2).clamp(0, 1)


class UAEDecoder:
    """SD3 pipeline without text encoders + the precomputed pooled vector."""

    def __init__(self, pipe, pooled: torch.Tensor):
        self.pipe = pipe
        self.pooled = pooled

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def joint_attention_dim(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim

    @classmethod
    def from_pretrained(cls, sd3_path: str, dit_path: str, dit_lora_path: str | None = None, *,
                        dtype: torch.dtype = torch.float32, device="cpu", dit_dtype: torch.dtype | None = None) -> "UAEDecoder":
        """`dtype`: the VAE, the text encoders of the pooled vector and (unless `dit_dtype`) the DiT."""
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        dit = _wrap("the DiT", dit_path, SD3Transformer2DModel.from_pretrained, dit_path, dtype=dit_dtype or dtype)
        if dit_lora_path is not None:
            _wrap("the DiT LoRA", dit_lora_path, load_dit_lora, dit, dit_lora_path)
        pipe = _wrap("the SD3 pipeline", sd3_path, StableDiffusion3Pipeline.from_pretrained, sd3_path,
                     transformer=dit, text_encoder=None, tokenizer=None, text_encoder_2=None,
                     tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, dtype=dtype)
        pipe.to(device)
        pooled = pooled_empty_prompt(sd3_path, dtype, device)
        if pooled.shape[-1] != dit.config.pooled_projection_dim:
            raise UAEError(f"pooled vector of {sd3_path} has {pooled.shape[-1]} features but the DiT "
                           f"in {dit_path} expects pooled_projection_dim={dit.config.pooled_projection_dim}")
        return cls(pipe, pooled)

    @torch.no_grad()
    def generate(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None, *,
                 height: int, width: int, num_inference_steps: int, guidance_scale: float,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 output_type: str = "pil", progress: bool = True):
        """Images from projected embeddings (B, T, joint_attention_dim)."""
        if prompt_embeds.shape[-1] != self.joint_attention_dim:
            raise UAEError(f"prompt embeddings have {prompt_embeds.shape[-1]} features; the DiT expects "
                           f"joint_attention_dim={self.joint_attention_dim}: LLM projector and DiT do not match")
        multiple = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1) * self.transformer.config.patch_size
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise UAEError(f"--height {height} / --width {width}: both must be positive multiples of {multiple}")
        b = prompt_embeds.shape[0]
        pooled = self.pooled.to(prompt_embeds.dtype).expand(b, -1)
        self.pipe.set_progress_bar_config(disable=not progress, leave=False, desc="denoising")
        return self.pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                         pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=pooled,
                         height=height, width=width, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, generator=generator, output_type=output_type).images
