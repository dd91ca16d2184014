"""uae-assemble: a UAE checkpoint in the official layout from the base models (the start of the paper's
training: Qwen2.5-VL-3B-Instruct + Stable Diffusion 3.5 Large), with a fresh projector.

    uae-assemble --llm Qwen/Qwen2.5-VL-3B-Instruct --decoder stabilityai/stable-diffusion-3.5-large --out DIR
    uae-assemble --llm tiny --decoder tiny --out DIR     # the tiny random parts, offline

What goes where (docs/from-base.md):

    llm/            the Qwen2.5-VL weights as transformers saves them + llm/projector.safetensors
    llm_processor/  the LLM's processor
    llm_lora/       a FRESH LLM LoRA (rank / alpha from the model preset; PEFT's "gaussian" init: A
                    drawn, B = 0), so the model is exactly the base LLM, and stages 1-2 (cold start, g4u)
                    find the LoRA they train
    dit/            the pipeline's SD3Transformer2DModel, its files copied as they are stored
    SD3/            the pipeline's VAE, scheduler, CLIP-L / CLIP-G text encoders and tokenizers (no
                    transformer, no T5: UAE never uses them)
    no dit_lora/    declared absent in uae_checkpoint.json: SFT trains the DiT (all of it, or a new LoRA)

The projector (Linear(LLM hidden -> preset's projector.hidden_dim), GELU, Linear(-> the DiT's
joint_attention_dim)) starts, by default (`--projector_init calibrated`), from PyTorch's Linear
initialisation (seeded) with its last layer then scaled so that the conditioning starts in the range
the DiT's text path was trained on: the mean per-token L2 norm of the projected states of
`--calibration_prompts` (in the "generate" template, real tokens) equals the mean per-token norm of
the decoder's own prompt embeddings of the same texts (SD3's CLIP-L and CLIP-G penultimate states side
by side, zero-padded to joint_attention_dim: the pipeline's `encode_prompt`, its 77 CLIP rows; the
padding adds nothing to a norm, and the DiT's first op on them, context_embedder, is linear).
`--projector_init pytorch` keeps PyTorch's initialisation unscaled; a folder (a UAE checkpoint or its
llm/) starts from the projector stored there, whose widths must fit the LLM and the DiT.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from uae.cli import script_main
from uae.config import check_fields, field, parse_config
from uae.errors import UAEError
from uae.files import atomic_folder
from uae.models.encoder import UAEEncoder, build_projector, llm_lora_config, load_projector, save_projector
from uae.models.layout import MANIFEST, save_official_llm_lora
from uae.random_weights.checkpoint import load_preset, save_sd3_folder
from uae.random_weights.unified import resolve
from uae.runtime import resolve_device, stored_dtype

logger = logging.getLogger(__name__)

PROJECTOR_INITS = ("calibrated", "pytorch")
# What is downloaded of a decoder on the hub: the diffusers folders UAE reads. Not T5 (~9.5 GB, never read)
# nor the single-file checkpoints some repos also hold (SD3.5-Large's sd3.5_large.safetensors, text_encoders/).
DECODER_FILES = ["model_index.json"] + [f"{part}/*" for part in ("transformer", "vae", "scheduler", "text_encoder",
                                                                   "text_encoder_2", "tokenizer", "tokenizer_2")]


@dataclass
class AssembleConfig:
    """A UAE checkpoint in the official layout from a Qwen2.5-VL LLM and an SD3 pipeline, with a fresh projector."""

    llm: str = field(help="a Qwen2.5-VL model: hub id (Qwen/Qwen2.5-VL-3B-Instruct), folder, or tiny")
    decoder: str = field(help="a StableDiffusion3Pipeline: hub id (stabilityai/stable-diffusion-3.5-large), folder, "
                              "or tiny")
    out: str = field(help="folder to create (official layout)")
    preset: str = field("auto", help="model preset (configs/models/) giving the projector's hidden width and the "
                                     "LLM LoRA's rank / alpha: tiny, mid, full, a YAML path, or auto (tiny when "
                                     "--llm tiny, else full)")
    projector_init: str = field("calibrated", help="calibrated (PyTorch's init, last layer scaled so the "
                                                   "conditioning's per-token norm matches the decoder's own prompt "
                                                   "embeddings), pytorch (unscaled), or a folder holding a projector")
    calibration_prompts: list[str] = field(
        ["A photo of a red cube on a wooden table in a bright room with white walls.",
         "A cat sitting on a window sill, looking out at the rain in soft natural light.",
         "A city street at night with neon signs, cars and people walking on the wet sidewalk.",
         "A close-up portrait of a smiling woman, shallow depth of field, warm colours."],
        help="texts whose conditioning sets the projector's scale (--projector_init calibrated)")
    seed: int = field(0, help="seed of the projector's and the LLM LoRA's initialisation")
    device: str = field("auto", help="where the calibration runs: auto (GPU if present), cpu, cuda")
    overwrite: bool = field(False, help="replace --out if it exists")

    def __post_init__(self):
        check_fields(self)
        if self.projector_init not in PROJECTOR_INITS and not os.path.isdir(self.projector_init):
            raise UAEError(f"--projector_init {self.projector_init!r}: use {' or '.join(PROJECTOR_INITS)}, or a folder "
                           "holding a projector (a UAE checkpoint or its llm/)")
        if not self.calibration_prompts:
            raise UAEError("--calibration_prompts: give at least one text")


def _local(name: str, what: str, patterns: list[str] | None = None) -> Path:
    """A folder of `name`: itself, or its hub snapshot (downloaded unless in the cache)."""
    if os.path.isdir(name):
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except Exception as e:  # no such folder, network, auth (gated repos), not in the offline cache
        raise UAEError(f"{what} {name!r}: not a folder, and the hub gave no copy ({type(e).__name__}: {e}); check the "
                       "id, the network and `hf auth login` for gated repos, or pass --llm tiny --decoder tiny") from None


# What each part must be: the file, key and value that say so, and its name.
PART_KINDS = {"llm": ("config.json", "model_type", "qwen2_5_vl", "a Qwen2.5-VL model"),
              "decoder": ("model_index.json", "_class_name", "StableDiffusion3Pipeline", "a StableDiffusion3Pipeline")}


def _check_kind(folder: Path, part: str, name: str) -> None:
    file, key, want, what = PART_KINDS[part]
    path = folder / file
    kind = json.loads(path.read_text()).get(key) if path.is_file() else None
    if kind != want:
        raise UAEError(f"--{part} {name}: {what} is needed ({file} with {key} {want}); this is "
                       f"{kind or f'a folder without {file}'}")


def token_norms(states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token L2 norms of (B, T, D) states, of the rows where `mask` is 1 (all rows without one)."""
    norms = states.float().norm(dim=-1)
    return norms[mask.bool()] if mask is not None else norms.flatten()


@torch.no_grad()
def sd3_prompt_norms(pipe, prompts: list[str]) -> torch.Tensor:
    """Per-token norms of the decoder's own prompt embeddings of `prompts`: the CLIP rows of its
    `encode_prompt` (CLIP-L and CLIP-G penultimate states side by side, zero-padded to the DiT's
    width), the `tokenizer_max_length` rows the DiT sees before T5's."""
    embeds = pipe.encode_prompt(prompts, None, None, device=pipe.text_encoder.device,
                                do_classifier_free_guidance=False)[0]
    return token_norms(embeds[:, :pipe.tokenizer_max_length])


@torch.no_grad()
def projected_norms(encoder: UAEEncoder, prompts: list[str]) -> torch.Tensor:
    """Per-token norms of the conditioning of `prompts` (the "generate" template, real tokens), the
    LLM's states (bf16 for the real one) projected in the projector's dtype."""
    ids, mask = encoder.pad_right(encoder.generate_ids(prompts))
    weight = encoder.projector[0].weight
    return token_norms(encoder.projector(encoder.hidden_states(ids, mask).to(weight.dtype)), mask)


@torch.no_grad()
def calibrate(encoder: UAEEncoder, pipe, prompts: list[str]) -> dict[str, float]:
    """Scale the projector's last Linear (weight and bias: its output scales exactly) so that the mean
    per-token norm of the projected states of `prompts` equals the decoder's own (sd3_prompt_norms).
    Returns both means and the scale."""
    target = sd3_prompt_norms(pipe, prompts).mean().item()
    before = projected_norms(encoder, prompts).mean().item()
    scale = target / before
    last = encoder.projector[-1]
    last.weight.mul_(scale)
    last.bias.mul_(scale)
    return {"target_norm": target, "pytorch_init_norm": before, "scale": scale}


def assemble(cfg: AssembleConfig) -> Path:
    """Write cfg.out (module docstring); returns it."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:  # before any model loads
        raise UAEError(f"--out {out} exists: pass --overwrite to replace it, or choose another folder")
    llm_name, dec_name = resolve(cfg.llm, "captioner"), resolve(cfg.decoder, "generator")
    preset = load_preset(("tiny" if cfg.llm == "tiny" else "full") if cfg.preset == "auto" else cfg.preset)
    llm_dir = _local(llm_name, "--llm")
    _check_kind(llm_dir, "llm", cfg.llm)
    dec_dir = _local(dec_name, "--decoder", DECODER_FILES)
    _check_kind(dec_dir, "decoder", cfg.decoder)
    if not (dec_dir / "transformer" / "config.json").is_file():
        raise UAEError(f"--decoder {cfg.decoder}: its transformer/ (the DiT) is missing")
    dit_config = SD3Transformer2DModel.load_config(dec_dir / "transformer")
    device = resolve_device(cfg.device)

    llm = Qwen2_5_VLForConditionalGeneration.from_pretrained(llm_dir, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(llm_dir)
    hidden, joint = llm.config.text_config.hidden_size, dit_config["joint_attention_dim"]
    if os.path.isdir(cfg.projector_init):
        src = Path(cfg.projector_init)
        projector = load_projector(str(src / "llm" if (src / "llm").is_dir() else src), hidden, torch.float32)
        if projector[-1].out_features != joint:
            raise UAEError(f"--projector_init {src}: its projector outputs {projector[-1].out_features} features, the "
                           f"DiT of --decoder {cfg.decoder} takes joint_attention_dim={joint}")
    else:
        torch.manual_seed(cfg.seed)
        projector = build_projector(hidden, preset["projector"]["hidden_dim"], joint)
    encoder = UAEEncoder(llm, projector, processor).to(device)
    with init_empty_weights():  # encode_prompt reads the DiT's config only: no weights loaded
        shape_only = SD3Transformer2DModel.from_config(dit_config)
    pipe = StableDiffusion3Pipeline.from_pretrained(dec_dir, transformer=shape_only, text_encoder_3=None,
                                                    tokenizer_3=None,
                                                    dtype=stored_dtype(dec_dir / "text_encoder") or torch.float32)
    init = {"projector_init": cfg.projector_init}
    if cfg.projector_init == "calibrated":
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        init.update(calibrate(encoder, pipe, list(cfg.calibration_prompts)))
        logger.info("projector calibrated: per-token norm %.4g at PyTorch's init, %.4g the decoder's own prompt "
                    "embeddings: last layer scaled by %.4g", init["pytorch_init_norm"], init["target_norm"],
                    init["scale"])
        pipe.text_encoder.to("cpu")
        pipe.text_encoder_2.to("cpu")

    with atomic_folder(out) as tmp:
        encoder.to("cpu")
        llm.save_pretrained(tmp / "llm")
        save_projector(encoder.projector, tmp / "llm")
        processor.save_pretrained(tmp / "llm_processor")
        lora = preset["llm_lora"]
        torch.manual_seed(cfg.seed + 1)
        encoder.add_lora(llm_lora_config(encoder.llm, r=lora["r"], alpha=lora["alpha"]))
        save_official_llm_lora(encoder, tmp / "llm_lora", with_projector=False)
        shutil.copytree(dec_dir / "transformer", tmp / "dit")
        save_sd3_folder(StableDiffusion3Pipeline(**{**pipe.components, "transformer": None}), tmp / "SD3")
        # Top-level keys named after a part declare it (dit_lora: none); the rest says how it was made.
        (tmp / MANIFEST).write_text(json.dumps({"dit_lora": None, "assembled": {
            "by": "uae-assemble", "llm": cfg.llm, "decoder": cfg.decoder,
            "projector": {**init, "seed": cfg.seed, "hidden_dim": projector[0].out_features},
            "llm_lora": {"r": lora["r"], "alpha": lora["alpha"], "init": "gaussian (B = 0: the base LLM exactly)"}}},
            indent=2))
        (tmp / "README.md").write_text(
            f"UAE checkpoint assembled by uae-assemble from {cfg.llm} (LLM) and {cfg.decoder} (decoder), with a fresh "
            f"projector ({cfg.projector_init}) and a fresh LLM LoRA: train it (train_sft.py, then train_grpo.py) "
            "before use; until then its images ignore the prompt.\n")
    return out


@script_main
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(AssembleConfig, argv, description=__doc__)
    logger.info("wrote %s", assemble(cfg))
    return 0
