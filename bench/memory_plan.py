"""Memory plan at full size: what each trainer holds on a GPU, counted on the meta device (no
memory, no download), and activations measured on smaller models and extrapolated.

Weights, gradients, optimizer state, EMA. For each setting (SFT with a DiT LoRA, SFT of the whole
DiT, cold start, g4u, u4g; their configs in configs/), the full-size models (SD3.5-Large DiT, SD3
VAE, Qwen2.5-VL-3B + projector, the release's LoRAs, the reward's scorers) are built on the meta
device from configs/models/full.yaml by `uae.random_weights.build_uae`, through the toolkit's own
classes, with the dtypes the precision policy loads them in (`uae.training.precision`), and the recipe's
own `configure(model, cfg)` marks what trains. Stage 2 on Janus-Pro-1B / -7B (configs/grpo/g4u_janus.yaml,
with a LoRA or --captioner_finetune full) builds transformers' JanusForConditionalGeneration on the
meta device from Janus-Pro's sizes (JANUS_PRO), and counts the KL reference its config needs; its
activations are not measured here (the DiT's fit does not apply): the largest estimate stands in. Bytes follow: frozen weights at their dtype;
trained weights, gradients and EMA in fp32; AdamW 8 bytes per trained weight (8-bit AdamW 2).
Per parallel setting: 1 GPU; 8 GPUs with DDP (every GPU holds it all, plus DDP's gradient buckets,
one more copy of the gradients); for SFT, 8 GPUs with FSDP full sharding of the modules accelerate
wraps (the recipe's `Parts.prepared`): their weights, gradients, optimizer state and EMA / 8, the
rest replicated. The RL stages have no FSDP row: train_grpo.py refuses FSDP and DeepSpeed launches
(`uae.train.refuse_sharded_launch`, docs/scaling.md), so the table says "refused".

Activations. One training step's peak memory above the weights is measured at `--act_preset` (a
small DiT on this machine: resident memory sampled every 2 ms, glibc told to return freed blocks)
at `--act_resolutions`, for each setting with its config's batch and gradient checkpointing. The
model: activations = a + b * image_tokens, tokens = (resolution / 16)^2 (the DiT's patches),
fitted on the first two resolutions and checked at the third (the error is printed). At full
size both terms are scaled by the DiT's width x depth (2432 x 38 against the small model's) and
evaluated at the config's resolution: an estimate, stated as one; the GPU check measures the real
stage-3 step (`--measure u4g` on a GPU).

    python bench/memory_plan.py                          # plan at full size + activations at mid (minutes)
    python bench/memory_plan.py --act_preset tiny --act_resolutions 32 48 64   # quick
    python bench/memory_plan.py --reuse results/cpu/memory_plan.json --json results/cpu/memory_plan.json
                                                         # the plans again, the measured activations kept
    python bench/memory_plan.py --measure u4g --preset full   # on a GPU: the stage-3 step, measured vs planned
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, write_json

import torch
from accelerate.state import AcceleratorState

from uae.cli import setup_logging
from uae.config import from_dict, read_yaml
from uae.methods import METHODS
from uae.paths import MODEL_PRESETS
from uae.random_weights import build_checkpoint, build_scorer_model, build_uae, load_preset
from uae.rl.flow_backends import FLUX_LORA_TARGETS
from uae.runtime import release_freed_memory
from uae.methods.u4g import U4GRecipe
from uae.training.parts import Parts
from uae.training.precision import precision_policy
from uae.training.run import JsonlLog, Run

logger = logging.getLogger("uae.bench.memory_plan")

GIB = 2 ** 30
GPU_BYTES = 80 * GIB
GPUS = 8
# The stages whose script accepts an FSDP launch: train_grpo.py refuses one for every RL stage
# (uae.train.refuse_sharded_launch; tests/test_output.py checks the two agree).
FSDP_STAGES = ("sft",)
SETTINGS = {  # name -> (stage, config file, extra settings)
    "SFT LoRA": ("sft", "configs/sft/paper.yaml", {"dit_mode": "lora"}),
    "SFT full": ("sft", "configs/sft/paper.yaml", {}),
    "cold start": ("cold_start", "configs/grpo/cold_start.yaml", {}),
    "g4u": ("g4u", "configs/grpo/g4u.yaml", {}),
    "u4g": ("u4g", "configs/grpo/u4g.yaml", {}),
    # Stage 2 on Janus-Pro (configs/grpo/g4u_janus.yaml: Janus-Pro-7B), a LoRA or the full language model.
    "g4u Janus-Pro-7B LoRA": ("g4u", "configs/grpo/g4u_janus.yaml", {}),
    "g4u Janus-Pro-7B full": ("g4u", "configs/grpo/g4u_janus.yaml", {"captioner_finetune": "full"}),
}
# The same config on Janus-Pro-1B. Kept apart from SETTINGS: these rows differ from the 7B ones by
# --checkpoint alone, which tests/test_readme.py's launch check counts as a setting that changes
# nothing a GPU holds (true of UAE's checkpoints), so there a 1B row would match a 7B launch too.
OTHER_SIZES = {
    "g4u Janus-Pro-1B LoRA": ("g4u", "configs/grpo/g4u_janus.yaml",
                              {"checkpoint": "deepseek-community/Janus-Pro-1B"}),
    "g4u Janus-Pro-1B full": ("g4u", "configs/grpo/g4u_janus.yaml",
                              {"checkpoint": "deepseek-community/Janus-Pro-1B", "captioner_finetune": "full"}),
}
# Stage 3 on a diffusers pipeline's transformer (uae.rl.flow_backends), at the sizes of
# configs/models/pipelines/<preset>.yaml, with stage 3's config (its LoRA rank on the backend's
# targets, its rollouts): train_grpo.py --stage u4g --model pipeline --generator black-forest-labs/FLUX.1-dev
# (the captioner is loaded at set-up only, to caption the references, and freed before training:
# not counted). tests/test_readme.py matches launches to SETTINGS and PIPELINES rows.
PIPELINES = {
    "u4g FLUX.1-dev LoRA": ("u4g", "configs/grpo/u4g.yaml",
                            {"model": "pipeline", "generator": "black-forest-labs/FLUX.1-dev",
                             "captioner": "Qwen/Qwen2.5-VL-3B-Instruct"}, "flux1_dev"),
}
ROWS = {**SETTINGS, **OTHER_SIZES, **{k: v[:3] for k, v in PIPELINES.items()}}
# Janus-Pro's language models (DeepSeek-LLM 1.5B / 7B: Llama layers, untied output layer, bf16), as
# deepseek-ai/Janus-Pro-1B / -7B's config.json `language_config` gives them (transformers' converter
# copies them into text_config of deepseek-community/Janus-Pro-*); the vision tower (SigLIP-L, 384 px,
# 576 tokens) and the VQ model (16384 codes) are transformers' JanusVisionConfig / JanusVQVAEConfig
# defaults, which are Janus-Pro's, with their projections to the language model's width.
JANUS_PRO = {
    "deepseek-community/Janus-Pro-1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                                        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 102400},
    "deepseek-community/Janus-Pro-7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30,
                                        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 102400},
}


def config(stage: str, path: str, extra: dict, **over):
    values = {**read_yaml(str(ROOT / path)), "data": "plan", **extra, **over}
    return from_dict(METHODS[stage].config, values)


def recipe_module(stage: str):
    """The method's recipe class: its `configure(model, cfg)` and `fully_trained(cfg)`."""
    return METHODS[stage].recipe


def scorer_names(stage: str, cfg) -> list[str]:
    if stage == "sft":
        return []
    if stage == "cold_start":
        return ["clip"]
    return sorted({f[5:] if f.startswith("text:") else f for f in cfg.reward_funcs if ":" not in f or f.startswith("text:")})


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def build_janus(checkpoint: str, dtype: torch.dtype):
    """Janus-Pro-1B / -7B on the meta device (JANUS_PRO's sizes), in `dtype`."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    if checkpoint not in JANUS_PRO:
        raise ValueError(f"no Janus-Pro size for {checkpoint}: add it to JANUS_PRO")
    text = JANUS_PRO[checkpoint]
    width = text["hidden_size"]
    config = JanusConfig(text_config={"model_type": "llama", **text, "tie_word_embeddings": False},
                         vision_config={"projection_dim": width},
                         vq_config={"projection_dim": width, "image_token_embed_dim": width},
                         tie_word_embeddings=False)
    with torch.device("meta"):
        return JanusForConditionalGeneration(config).to(dtype)


def _janus_modules(cfg, precision, parts, model) -> dict:
    """Janus's modules for the plan: the model (what trains marked by the recipe's configure), and
    the KL reference: with --captioner_finetune full and --beta, a frozen copy of the language model
    in the frozen dtype (uae.rl.kl.FrozenLanguageModel); a LoRA's `start` reference, a copy of the
    LoRA (uae.rl.kl.ReferenceWeights); a LoRA's `base`, nothing (the LoRA switched off)."""
    modules = {"llm": model}
    if cfg.beta and cfg.captioner_finetune == "full":
        with torch.device("meta"):
            modules["kl_reference"] = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.empty(p.shape, dtype=precision.frozen), requires_grad=False)
                 for p in model.model.language_model.parameters()])
    elif cfg.beta and cfg.kl_reference == "start":
        with torch.device("meta"):
            modules["kl_reference"] = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False) for p in parts.trainable])
    return modules


def build_flux(preset: str, dtype: torch.dtype) -> dict:
    """FLUX.1-dev's parts on the meta device, at configs/models/pipelines/<preset>.yaml's sizes:
    the transformer, the VAE, CLIP-L and the T5-XXL encoder, in `dtype`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sizes = read_yaml(str(MODEL_PRESETS / "pipelines" / f"{preset}.yaml"))
    with torch.device("meta"):
        return {"dit": FluxTransformer2DModel(**sizes["transformer"]).to(dtype),
                "vae": AutoencoderKL(**sizes["vae"]).to(dtype),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**sizes["text_encoder"])).to(dtype),
                "text_encoder_2": T5EncoderModel(T5Config(**sizes["text_encoder_2"])).to(dtype)}


def _flux_modules(cfg, precision, preset: str):
    """The FLUX row's modules and what trains: a new LoRA of stage 3's rank on FLUX_LORA_TARGETS
    (fp32), the rest frozen in the frozen dtype; the text encoders are counted (the set-up's peak: stage 3
    frees them once every prompt's conditioning is cached)."""
    modules = build_flux(preset, precision.frozen)
    trainable = U4GRecipe.configure_transformer(modules["dit"], cfg, FLUX_LORA_TARGETS).trainable
    precision.cast_trained(trainable)
    return modules, trainable


def rollout_bytes(cfg, stage: str, latent_channels: int, vae_scale: int, gpus: int) -> float:
    """Stage 3's rollouts held on a GPU through an iteration: for each of its samples, the latents
    before and after every trained step (fp32: uae.methods.u4g.Transitions) and their log-probs,
    and its decoded image (fp32, kept for the reward and the grids until the step ends). The
    prompts' conditioning is a few prompts' worth: not counted."""
    if stage != "u4g":
        return 0.0
    samples = cfg.prompts_per_iteration * cfg.group_size / gpus
    lo, hi = cfg.sde_window if cfg.sde_window else (0, cfg.num_steps - 1)
    recorded = (hi - lo) if cfg.sde_window_mode == "fixed" else cfg.sde_window_size
    latent = latent_channels * (cfg.resolution // vae_scale) ** 2 * 4
    return samples * (recorded * (2 * latent + 4) + 3 * cfg.resolution ** 2 * 4)


def plan(name: str, preset: str = "full") -> dict:
    """Bytes held per GPU by setting `name` at `preset` size, per parallel setting."""
    stage, path, extra = ROWS[name]
    cfg = config(stage, path, extra)
    mod = recipe_module(stage)
    precision = precision_policy(cfg.mixed_precision)
    pipeline = PIPELINES.get(name, (None,) * 4)[3]
    if pipeline:
        modules, trainable = _flux_modules(cfg, precision, pipeline)
        parts = Parts({"decoder": trainable}, prepared={"dit": modules["dit"]})
        latent_channels, vae_scale = modules["dit"].config.in_channels // 4, \
            2 ** (len(modules["vae"].config.block_out_channels) - 1)
    elif getattr(cfg, "model", "uae") == "janus":
        # The recipe's own configure on the whole model (frozen dtype), then Run's cast of what trains to fp32.
        model = build_janus(cfg.checkpoint, precision.frozen)
        parts = mod.configure(model, cfg)
        precision.cast_trained(parts.trainable)
        modules = _janus_modules(cfg, precision, parts, model)
        latent_channels, vae_scale = 0, 1  # stage 2: no latents held
    else:
        # SFT trains the DiT from its base weights (no dit_lora); the RL stages start from the release's.
        model = build_uae(preset, dtypes=precision.load_dtypes(mod.fully_trained(cfg)), dit_lora=stage != "sft")
        parts = mod.configure(model, cfg)
        modules = {"llm": model.encoder.llm, "projector": model.encoder.projector,
                   "dit": model.decoder.transformer, "vae": model.decoder.pipe.vae}
        latent_channels, vae_scale = model.decoder.transformer.config.in_channels, \
            2 ** (len(model.decoder.pipe.vae.config.block_out_channels) - 1)
    trained = {id(p) for p in parts.trainable}
    with torch.device("meta"):
        scorers = {f"scorer:{n}": build_scorer_model(n, "full" if preset == "full" else "tiny")[0].to(precision.frozen)
                   for n in scorer_names(stage, cfg)}
    modules.update(scorers)
    if "encoder" in parts.freed:  # stage 3 frees the encoder once the captions' conditioning is cached
        freed = {"llm", "projector"}
    else:
        freed = set()
    n_trained = sum(p.numel() for p in parts.trainable)
    per_module = {}
    for key, m in modules.items():
        params = list(m.parameters())
        per_module[key] = {"frozen": _bytes(p for p in params if id(p) not in trained) + _bytes(m.buffers()),
                           "trained": _bytes(p for p in params if id(p) in trained)}
    opt_per = 2.0 if cfg.optimizer == "adamw8bit" else 8.0
    ema = cfg.use_ema and cfg.ema_device == "same"
    prepared = set(parts.prepared)

    def totals(shard: int, ddp: bool) -> dict:
        out = {"frozen_weights": 0.0, "trained_weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "ema": 0.0,
               "rollouts": rollout_bytes(cfg, stage, latent_channels, vae_scale, GPUS if ddp else 1)}
        for key, b in per_module.items():
            if key in freed:
                continue
            div = shard if key in prepared else 1
            out["frozen_weights"] += b["frozen"] / div
            out["trained_weights"] += b["trained"] / div
            n = b["trained"] / 4  # trained weights are fp32
            out["gradients"] += b["trained"] / div * (2 if ddp else 1)  # DDP: gradient buckets
            out["optimizer"] += n * opt_per / div
            out["ema"] += (b["trained"] if ema else 0) / div
        out["total"] = sum(out.values())
        return out

    startup = sum(b["frozen"] + b["trained"] for b in per_module.values())
    parallel = {"1 GPU": totals(1, False), f"{GPUS} GPUs DDP": totals(1, True)}
    if stage in FSDP_STAGES:
        parallel[f"{GPUS} GPUs FSDP"] = totals(GPUS, False)
    return {"setting": name, "stage": stage, "config": path, "mixed_precision": cfg.mixed_precision,
            **({"pipeline": f"configs/models/pipelines/{pipeline}.yaml"} if pipeline else {}),
            **({"checkpoint": cfg.checkpoint, "captioner_finetune": cfg.captioner_finetune}
               if getattr(cfg, "model", "uae") == "janus" else {}),
            "trained_parameters": n_trained, "modules_gib": {k: (v["frozen"] + v["trained"]) / GIB for k, v in per_module.items()},
            "startup_weights_gib": startup / GIB, "prepared": sorted(prepared), "freed": sorted(freed),
            "parallel": parallel}


# ---------------------------------------------------------------------------- activations

def _measure_step(setting: str, ckpt: str, resolution: int, tmp: str) -> dict:
    """In this fresh process: one training step's peak memory above the memory held before it."""
    from bench_cold_start import PeakSampler

    stage, path, extra = SETTINGS[setting]
    data = str(ROOT / "Unified-Bench" / "UniBench" / "sample.jsonl")
    over = dict(checkpoint=ckpt, data=data, output_dir=f"{tmp}/{setting.replace(' ', '_')}-{resolution}",
                resolution=resolution, report_to="none", checkpointing_steps=0, max_steps=2,
                device="auto")
    if stage == "sft":
        over.update(validation_steps=0)
    else:
        over.update(scorer_weights="tiny", image_log_steps=0, max_new_tokens=16)
    if stage == "u4g":  # one training micro-batch of the config's size (x2 for CFG)
        cfg0 = config(stage, path, extra)
        over.update(prompts_per_iteration=1, group_size=cfg0.train_batch_size or cfg0.sample_batch_size)
    if stage == "g4u":  # the config's samples per GPU on 8 GPUs
        cfg0 = config(stage, path, extra)
        over.update(prompts_per_iteration=max(cfg0.prompts_per_iteration // GPUS, 1), group_size=cfg0.group_size)
    cfg = config(stage, path, extra, **over)
    AcceleratorState._reset_state(reset_partial_state=True)
    run = Run(cfg, "plan")
    recipe = recipe_module(stage)(run)
    run.set_up(recipe)  # setup, prepared and attached: what trains is run.trainable
    run.metrics = run.samples = JsonlLog(Path(tmp) / "plan.jsonl", run.acc)
    recipe.begin(0)
    with run.acc.autocast():
        recipe.step(0)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with run.acc.autocast():
            recipe.step(1)
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "held_bytes": before, "memory": "gpu"}
    release_freed_memory()
    with PeakSampler() as s, run.acc.autocast():
        recipe.step(1)
    return {"peak_bytes": s.peak - s.base, "held_bytes": s.base, "memory": "cpu rss"}


def fit(name: str, points: list[dict], scale: float) -> dict:
    """a + b * tokens through the first two points, checked on the third; at full size b * tokens
    scaled by the DiT's width x depth. The constant a (gradients, optimizer temporaries, the text
    side) is not extrapolated: the plan counts gradients and optimizer state apart. No estimate
    where b is not positive or the check misses by more than 25%: the token-proportional part is
    then below this measurement's noise at this size. g4u adds the LM head's logits of one
    micro-batch, computed: captions x (tokens + 1) x vocabulary x 14 bytes (bf16 logits, their fp32
    copy, log-softmax, its gradient)."""
    (r0, r1), r2 = points[:2], points[-1]
    b = (r1["peak_bytes"] - r0["peak_bytes"]) / (r1["tokens"] - r0["tokens"])
    a = r0["peak_bytes"] - b * r0["tokens"]
    predicted = a + b * r2["tokens"]
    error = (predicted - r2["peak_bytes"]) / max(r2["peak_bytes"], 1)
    stage, path, extra = SETTINGS[name]
    cfg = config(stage, path, extra)
    tokens_full = (cfg.resolution // 16) ** 2
    ok = b > 0 and abs(error) <= 0.25
    estimate = b * scale * tokens_full if ok else None
    logits = None
    if stage == "g4u":
        vocab = load_preset("full")["llm"]["text_config"].get("vocab_size", 151936)
        logits = cfg.train_batch_size * (cfg.max_new_tokens + 1) * vocab * 14
    if logits is not None:  # the LM head's logits dominate this stage whatever the fit says
        estimate = (estimate or 0.0) + logits
    return {"points": points, "fit": {"a_bytes": a, "b_bytes_per_token": b},
            "check": {"resolution": r2["resolution"], "predicted_bytes": predicted, "measured_bytes": r2["peak_bytes"],
                      "relative_error": error},
            "full_size_estimate_bytes": estimate,
            "logits_bytes": logits, "scale": scale, "full_resolution": cfg.resolution}


def activations(settings: list[str], preset: str, resolutions: list[int], tmp: Path) -> dict:
    from tqdm.auto import tqdm

    logger.info("activations: building a random %s checkpoint to measure them on", preset)
    ckpt = build_checkpoint(tmp / "ckpt", preset, seed=0)
    small, full = load_preset(preset)["dit"], load_preset("full")["dit"]
    width = lambda d: d["num_attention_heads"] * d["attention_head_dim"] * d["num_layers"]  # noqa: E731
    scale = width(full) / width(small)
    out = {}
    bar = tqdm(total=len(settings) * len(resolutions), desc="activations", unit="step")
    for name in settings:
        points = []
        for res in resolutions:
            bar.set_postfix_str(f"{name} at {res}px")
            cmd = [sys.executable, __file__, "--_measure", name, "--_ckpt", str(ckpt), "--_res", str(res),
                   "--_tmp", str(tmp)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError(f"{name} at {res}px: {proc.stderr[-3000:]}")
            points.append({"resolution": res, "tokens": (res // 16) ** 2,
                           **json.loads(proc.stdout.strip().splitlines()[-1])})
            bar.update(1)
        out[name] = fit(name, points, scale)
    bar.close()
    return out


# ---------------------------------------------------------------------------- measured vs planned

def measure_full(setting: str, preset: str, tmp: Path, ckpt: str | None = None) -> dict:
    """The setting's training step for real (random weights of `preset` size: `ckpt`, or built
    here): peak memory against the plan's weights + optimizer + gradients (GPU: torch's allocator)."""
    if ckpt is None:
        kw = {"dtype": "bfloat16", "device": "cuda"} if torch.cuda.is_available() else {}
        logger.info("measure: building a random %s checkpoint", preset)
        ckpt = build_checkpoint(tmp / "measure", preset, seed=0, **kw)
    logger.info("measure: one %s training step at %s size, for real", setting, preset)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = _measure_step(setting, str(ckpt), SETTINGS_RES.get(setting, 64), str(tmp))
    planned = plan(setting, preset)["parallel"]["1 GPU"]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else res["held_bytes"] + res["peak_bytes"]
    return {"setting": setting, "preset": preset, "measured_peak_gib": peak / GIB, "measured_held_gib": res["held_bytes"] / GIB,
            "planned_without_activations_gib": planned["total"] / GIB, "seconds": time.perf_counter() - t0,
            "memory": res["memory"]}


SETTINGS_RES: dict[str, int] = {}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="full", help="model size of the plan (full)")
    ap.add_argument("--settings", nargs="*", default=list(ROWS), help=f"among {list(ROWS)}")
    ap.add_argument("--act_preset", default="mid", help="model size the activations are measured at ('' to skip)")
    ap.add_argument("--act_resolutions", type=int, nargs=3, default=[128, 192, 256],
                    help="fit on the first two, check on the third")
    ap.add_argument("--measure", default=None, help="a setting to run for real at --preset (on a GPU) and compare")
    ap.add_argument("--measure_resolution", type=int, default=None, help="resolution of --measure (default its config's)")
    ap.add_argument("--measure_checkpoint", default=None, help="use this checkpoint for --measure (default: build one)")
    ap.add_argument("--reuse", default=None, help="a JSON this script wrote: refit its measured activation points")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--_res", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        print(json.dumps(_measure_step(args._measure, args._ckpt, args._res, args._tmp)))
        return {}
    setup_logging("INFO")
    plans = {}
    for name in args.settings:
        logger.info("plan: %s at %s size (its models built on the meta device)", name, args.preset)
        plans[name] = plan(name, args.preset)
    res = {"machine": machine(), "preset": args.preset, "gpu_gib": GPU_BYTES / GIB, "plans": plans}
    with tempfile.TemporaryDirectory() as d:
        if args.reuse:
            old = json.loads(Path(args.reuse).read_text())["activations"]
            res["activations"] = {n: fit(n, a["points"], a["scale"]) for n, a in old.items() if n in args.settings}
        elif args.act_preset:  # measured on UAE's DiT: not for the Janus rows
            res["activations"] = activations([n for n in args.settings if "Janus" not in n], args.act_preset,
                                             args.act_resolutions, Path(d))
        if args.measure:
            stage, path, extra = SETTINGS[args.measure]
            SETTINGS_RES[args.measure] = args.measure_resolution or config(stage, path, extra).resolution
            res["measured"] = measure_full(args.measure, args.preset, Path(d), args.measure_checkpoint)
    print(f"memory plan ({res['machine']}); {args.preset} size, GiB per GPU of {GPU_BYTES / GIB:.0f}")
    print(f"{'setting':<21} {'parallel':<15} {'frozen':>7} {'trained':>8} {'grads':>7} {'optim':>7} {'ema':>6} "
          f"{'rollout':>7} {'total':>7} {'activ.':>7} {'headroom':>9}")
    for name, p in res["plans"].items():
        act = (res.get("activations", {}).get(name) or {}).get("full_size_estimate_bytes")
        for par, t in p["parallel"].items():
            a = "" if act is None else f"{act / GIB:7.1f}"
            left = GPU_BYTES - t["total"] - (act or 0)
            print(f"{name:<21} {par:<15} {t['frozen_weights'] / GIB:7.1f} {t['trained_weights'] / GIB:8.2f} "
                  f"{t['gradients'] / GIB:7.2f} {t['optimizer'] / GIB:7.2f} {t['ema'] / GIB:6.2f} "
                  f"{t.get('rollouts', 0) / GIB:7.2f} {t['total'] / GIB:7.1f} "
                  f"{a:>7} {left / GIB:9.1f}")
        if p["stage"] not in FSDP_STAGES:
            print(f"{name:<21} {f'{GPUS} GPUs FSDP':<15} refused: train_grpo.py runs DDP only")
    for name, a in res.get("activations", {}).items():
        c = a["check"]
        est = a["full_size_estimate_bytes"]
        full = "no estimate (below the noise at this size)" if est is None else \
            f"{est / GIB:.1f} GiB (x{a['scale']:.0f} width x depth" + \
            (f"; of which logits {a['logits_bytes'] / GIB:.1f} GiB)" if a.get("logits_bytes") else ")")
        print(f"activations {name}: fit at {a['points'][0]['resolution']}/{a['points'][1]['resolution']} px, predicted "
              f"{c['predicted_bytes'] / 2 ** 20:.0f} MB at {c['resolution']} px, measured {c['measured_bytes'] / 2 ** 20:.0f} "
              f"MB ({c['relative_error']:+.0%}); full size at {a['full_resolution']} px: {full}")
    if "measured" in res:
        m = res["measured"]
        print(f"measured {m['setting']} at {m['preset']} size: peak {m['measured_peak_gib']:.1f} GiB ({m['memory']}), "
              f"planned without activations {m['planned_without_activations_gib']:.1f} GiB")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
