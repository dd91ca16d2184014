"""uae-export (python -m uae.apps.export): a checkpoint in the official layout with its LoRAs merged.

    python -m uae.apps.export --checkpoint SRC --output_dir DIR [--dtype bfloat16] [--overwrite]

DIR/llm is a plain Qwen2.5-VL folder (the LLM LoRA merged by PEFT's `merge_and_unload`, the
processor's files beside the weights): `Qwen2_5_VLForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` load it with no missing or unexpected weight, so understanding
benchmarks (lmms-eval's `qwen2_5_vl`, VLMEvalKit) run it unchanged. The projector is kept apart in
DIR/llm/projector.safetensors, a file transformers never reads and our loader does. DIR/dit is the
DiT with its LoRA fused (diffusers' `fuse_lora` + `unload_lora`); SD3/ and llm_processor/ are
copied (or linked); the manifest declares both LoRAs absent. `demo.py --checkpoint DIR` then
makes the source's captions and images, up to the float rounding of the merge (docs/evaluation.md, "Export").

A stage-2 run of another model (`train_grpo.py --stage g4u --model janus|pipeline`: its final/ holds
captioner_lora/ and a manifest naming the source model) exports as a plain transformers folder of
that model (Janus: JanusForConditionalGeneration, the LoRA merged into the language model that
both captions and generates image tokens; a pipeline's captioner: its image-text-to-text class),
with the source's processor files: `from_pretrained` and `--model janus --checkpoint DIR` load it.
A full fine-tune's final/ (`--captioner_finetune full`: captioner/, already a plain folder) is saved
again in the requested dtype.

A stage-3 run of a diffusers pipeline (`train_grpo.py --stage u4g --model pipeline`: final/ holds
generator_lora/ in diffusers' format) exports as that pipeline saved whole with the LoRA fused into
its transformer: `DiffusionPipeline.from_pretrained(DIR)` and `--model pipeline --generator DIR` load
it, with its images those of the pipeline + LoRA up to the rounding of the fuse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from uae.cli import script_main, setup_logging
from uae.config import check_fields, field, parse_config
from uae.errors import UAEError
from uae.files import atomic_folder, atomic_write_bytes, atomic_write_json, link_or_copy, writable_dir
from uae.models.decoder import load_dit_lora, save_dit
from uae.models.encoder import PROJECTOR_FILE, UAEEncoder
from uae.models.layout import MANIFEST, resolve_components
from uae.random_weights import resolve_checkpoint
from uae.runtime import stored_dtype
from uae.unified.loading import GENERATOR_ADAPTER, load_generator_lora, model_kind, run_manifest
from uae.unified.pipeline import load_text_to_image

logger = logging.getLogger("uae.apps.export")

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Files of a model folder that are not the processor's (not copied from the processor folder).
NOT_PROCESSOR = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


@dataclass
class ExportConfig:
    """Merge a UAE checkpoint's LoRAs into its weights: a plain Qwen2.5-VL folder for understanding
    benchmarks, a plain DiT, in the official layout (docs/evaluation.md, "Export")."""

    checkpoint: str | None = field(None, help="source: a folder in the official layout, a hub id (zhiyuanyan1/UAE), "
                                              "or 'tiny' for the embedded random checkpoint")
    output_dir: str | None = field(None, help="folder to write (refused if it exists and is not empty, unless "
                                              "--overwrite); written beside it under a temporary name and renamed "
                                              "when complete")
    dtype: str = field("auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="dtype of the written weights (auto: the LLM's and the DiT's stored dtypes in the source, "
                            "the small projector in float32, which holds any source's values exactly). Weights "
                            "are merged in float32 unless the source is stored in this dtype already, so that every "
                            "merged weight is rounded once")
    overwrite: bool = field(False, help="replace --output_dir if it exists and is not empty")
    link_unchanged: bool = field(False, help="symlink the unchanged parts (SD3/, llm_processor/) to the source's "
                                             "instead of copying them: saves disk, but the export then needs the "
                                             "source to stay where it is")
    log_level: str = field("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")

    def __post_init__(self):
        for name in ("checkpoint", "output_dir"):
            if not getattr(self, name):
                raise UAEError(f"--{name} is required (see --help)")
        check_fields(self)


# ---------------------------------------------------------------------------- checks

def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output(out: Path, overwrite: bool, sources: list[str]) -> None:
    """Refuse an output that exists and is not an empty folder (unless `overwrite`), and one that
    holds any of the source's folders (writing it would destroy what is being read)."""
    for src in sources:
        if _inside(Path(src), out):
            raise UAEError(f"--output_dir {out} holds the source part {src}: write the export to another folder")
    if out.is_symlink() or out.exists():
        if overwrite:
            return
        if not out.is_dir():
            raise UAEError(f"--output_dir {out} exists and is not a folder: pass --overwrite to replace it")
        if any(out.iterdir()):
            raise UAEError(f"--output_dir {out} exists and is not empty: pass --overwrite to replace it, or choose "
                           "another folder")
    writable_dir(out.parent, "--output_dir")  # the export is written beside it, then renamed


def export_dtype(requested: str, folder: str) -> tuple[torch.dtype, torch.dtype]:
    """(written dtype, dtype the weights are loaded and merged in) of one part. The merge runs in
    the written dtype when the source is stored in it (PEFT adds the fp32 LoRA delta to the weight
    in place: one rounding, the same as merging in fp32 and casting), else in float32."""
    stored = stored_dtype(folder)
    if stored is None:
        logger.warning("no floating safetensors tensor in %s: taking float32 as its stored dtype", folder)
        stored = torch.float32
    out = stored if requested == "auto" else DTYPE_NAMES[requested]
    return out, (out if out == stored else torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _no_adapter_left(model, what: str) -> None:
    left = [n for n, _ in model.named_parameters() if "lora_" in n or ".base_layer." in n]
    if left:
        raise RuntimeError(f"{what}: {len(left)} adapter parameter(s) left after the merge, e.g. {left[:3]}")


# ---------------------------------------------------------------------------- parts

def _with_dtype(config: dict, name: str) -> dict:
    """A config dict with every `torch_dtype` / `dtype` entry (top level and sub-configs) set to `name`."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            value = _with_dtype(value, name)
        elif key in ("torch_dtype", "dtype") and isinstance(value, str):
            value = name
        out[key] = value
    return out


def _copy_processor_files(src: Path, dst: Path) -> list[str]:
    """The processor's files (tokenizer, image / video processor configs, chat template) of `src`
    copied into the model folder `dst`, so that AutoProcessor / AutoTokenizer load it; weights and
    the model's own configs are skipped (`src` may be the llm/ folder itself)."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in NOT_PROCESSOR or f.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(f, dst / f.name)  # follows the hub cache's symlinks: the file's bytes
        copied.append(f.name)
    return copied


def export_llm(paths, dst: Path, requested: str) -> torch.dtype:
    """DIR/llm: the Qwen2.5-VL weights with the LLM LoRA merged by PEFT (`merge_and_unload`),
    written by transformers' `save_pretrained`; the source's config.json and generation_config.json
    kept as they are (the merge changes no architecture, and the source's files load with the
    transformers the source was made for), the dtype entries updated; the processor's files beside
    them; the projector in projector.safetensors (not in the weights transformers reads)."""
    from safetensors.torch import save

    out_dtype, work = export_dtype(requested, paths.llm)
    logger.info("LLM: loading %s%s in %s", paths.llm, f" + LoRA {paths.llm_lora}" if paths.llm_lora else "",
                _dtype_name(work))
    encoder = UAEEncoder.from_pretrained(paths.llm, paths.llm_processor, paths.llm_lora, dtype=work, device="cpu",
                                         attn_implementation="sdpa", projector_dtype=torch.float32)
    llm = encoder.llm.merge_and_unload() if paths.llm_lora else encoder.llm
    _no_adapter_left(llm, "LLM")
    llm.to(out_dtype)
    dst.mkdir(parents=True)
    llm.save_pretrained(dst)
    src = Path(paths.llm)
    config = json.loads((src / "config.json").read_text())
    written = json.loads((dst / "config.json").read_text())
    if not {"torch_dtype", "dtype"} & set(config):  # the source's says none: the entry save_pretrained wrote
        config.update({k: written[k] for k in ("torch_dtype", "dtype") if k in written})
    atomic_write_json(dst / "config.json", _with_dtype(config, _dtype_name(out_dtype)))
    if (src / "generation_config.json").exists():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    copied = _copy_processor_files(Path(paths.llm_processor), dst)
    # The projector (a few MB) may be stored apart in another dtype (SFT writes it in float32 beside a
    # bf16 LLM): with --dtype auto it is written in float32, which holds any source's values exactly.
    projector_dtype = torch.float32 if requested == "auto" else out_dtype
    state = {f"projector.{k}": v.detach().to(projector_dtype).cpu().contiguous()
             for k, v in encoder.projector.state_dict().items()}
    atomic_write_bytes(dst / PROJECTOR_FILE, save(state, metadata={"format": "pt"}))
    logger.info("LLM: wrote %s in %s (%s; processor files: %s)", dst, _dtype_name(out_dtype),
                "LoRA merged" if paths.llm_lora else "no LoRA in the source", ", ".join(copied))
    return out_dtype


def export_dit(paths, dst: Path, requested: str) -> torch.dtype:
    """DIR/dit: the DiT with its PEFT LoRA fused by diffusers (`fuse_lora`, then `unload_lora`
    takes the LoRA layers out, leaving the merged base layers), written by `save_dit`."""
    from diffusers import SD3Transformer2DModel  # diffusers takes seconds to import: not for --help

    out_dtype, work = export_dtype(requested, paths.dit)
    logger.info("DiT: loading %s%s in %s", paths.dit, f" + LoRA {paths.dit_lora}" if paths.dit_lora else "",
                _dtype_name(work))
    try:
        dit = SD3Transformer2DModel.from_pretrained(paths.dit, dtype=work)
        if paths.dit_lora:
            load_dit_lora(dit, paths.dit_lora)
    except UAEError:
        raise
    except Exception as e:  # shapes that do not fit the config, corrupt files, a bad adapter_config.json
        raise UAEError(f"could not load the DiT (+ LoRA) from {paths.dit}"
                       f"{f' and {paths.dit_lora}' if paths.dit_lora else ''}: {type(e).__name__}: {e}") from None
    if paths.dit_lora:
        dit.fuse_lora()
        dit.unload_lora()
    _no_adapter_left(dit, "DiT")
    save_dit(dit, dst, out_dtype)
    logger.info("DiT: wrote %s in %s (%s)", dst, _dtype_name(out_dtype),
                "LoRA merged" if paths.dit_lora else "no LoRA in the source")
    return out_dtype


def captioner_run(checkpoint: str) -> dict | None:
    """The manifest of a stage-2 run of another model (its final/: captioner_lora/ or captioner/,
    and a manifest naming its source model), or None for a checkpoint in UAE's layout."""
    declared = run_manifest(checkpoint, f"--checkpoint {checkpoint}")
    if declared is None:
        return None
    trained = declared.get("captioner") if declared.get("captioner_finetune") == "full" else "captioner_lora"
    if not trained or not (Path(checkpoint) / trained).is_dir():
        return None
    model = declared.get("model")
    if model not in ("janus", "pipeline") and model_kind(str(model)) == "module":
        raise UAEError(f"--checkpoint {checkpoint}: a run of --model {model} (a class of yours): its captioner is "
                       f"the class's, which uae-export cannot load; merge {trained}/ onto it with PEFT "
                       "(PeftModel.from_pretrained(model, folder).merge_and_unload())")
    return declared if model in ("janus", "pipeline") and declared.get("source") else None


def export_captioner(final: str, declared: dict, out: Path, requested: str, overwrite: bool) -> Path:
    """OUT: the source model of a stage-2 run (Janus, or a pipeline's captioner) with the run's
    captioner LoRA merged by PEFT (`merge_and_unload`), saved by transformers with the source's
    processor: a plain folder of the source's class."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if declared.get("captioner_finetune") == "full":
        return export_full_captioner(final, declared, out, requested, overwrite)
    source, lora = declared["source"], str(Path(final) / "captioner_lora")
    check_output(out, overwrite, [final] + ([source] if os.path.exists(source) else []))
    out_dtype, work = export_dtype(requested, source) if os.path.isdir(source) else (DTYPE_NAMES.get(requested,
                                                                                                     torch.float32),) * 2
    logger.info("%s: loading %s + LoRA %s in %s", declared["model"], source, lora, _dtype_name(work))
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=work)
        processor = AutoProcessor.from_pretrained(source)
        merged = PeftModel.from_pretrained(model, lora).merge_and_unload()
    except Exception as e:  # a moved source, an adapter of another model
        raise UAEError(f"--checkpoint {final}: could not load its source {source} with {lora} "
                       f"({type(e).__name__}: {e})") from None
    _no_adapter_left(merged, declared["model"])
    if declared["model"] == "janus" and "image" not in declared.get("lora_sides", ["caption"]):
        logger.warning("%s trained its LoRA with a frozen generator (images with the LoRA off); merged, the LoRA also "
                       "changes the exported model's images (the runner's --captioner_lora keeps them apart)", final)
    merged.to(out_dtype)
    with atomic_folder(out) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "uae_export.json", {"exported_by": "uae-export", "source": source,
                                                     "merged": "captioner_lora", "from_run": str(Path(final).resolve()),
                                                     "lora_sides": declared.get("lora_sides", ["caption"]),
                                                     "dtype": _dtype_name(out_dtype)})
    logger.info("wrote %s: a plain %s folder (%s, the LoRA merged)", out, type(merged).__name__, _dtype_name(out_dtype))
    return out


def export_full_captioner(final: str, declared: dict, out: Path, requested: str, overwrite: bool) -> Path:
    """OUT: a stage-2 full fine-tune's model (final/captioner, already a plain transformers folder)
    saved again by transformers in the requested dtype, with its processor: nothing to merge."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(final) / declared["captioner"]
    check_output(out, overwrite, [final])
    out_dtype, work = export_dtype(requested, str(folder))
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=work)
        processor = AutoProcessor.from_pretrained(folder)
    except Exception as e:  # a damaged folder
        raise UAEError(f"--checkpoint {final}: could not load its fine-tuned {folder} ({type(e).__name__}: {e})") from None
    model.to(out_dtype)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic_write_json(tmp / "uae_export.json", {"exported_by": "uae-export", "source": declared["source"],
                                                     "merged": None, "captioner_finetune": "full",
                                                     "from_run": str(Path(final).resolve()),
                                                     "dtype": _dtype_name(out_dtype)})
    logger.info("wrote %s: a plain %s folder (%s; a full fine-tune, nothing to merge: %s loads as it is too)", out,
                type(model).__name__, _dtype_name(out_dtype), folder)
    return out


def generator_run(checkpoint: str) -> dict | None:
    """The manifest of a stage-3 run of a diffusers pipeline (`train_grpo.py --stage u4g --model
    pipeline`: its final/ holds generator_lora/ and a manifest naming the generator), or None."""
    declared = run_manifest(checkpoint, f"--checkpoint {checkpoint}")
    if not declared or declared.get("model") != "pipeline" or not declared.get("generator_lora"):
        return None
    return declared if (Path(checkpoint) / declared["generator_lora"]).is_dir() else None


def export_generator(final: str, declared: dict, out: Path, requested: str, overwrite: bool) -> Path:
    """OUT: the run's generator pipeline with its stage-3 LoRA fused into the transformer
    (diffusers' `load_lora_weights`, `fuse_lora`, `unload_lora_weights`), saved whole by
    `save_pretrained`: a plain pipeline folder that `DiffusionPipeline.from_pretrained` (and
    `--model pipeline --generator OUT`) loads with no LoRA."""
    source, lora = declared["generator"], str(Path(final) / declared["generator_lora"])
    check_output(out, overwrite, [final] + ([source] if os.path.exists(source) else []))
    transformer = Path(source) / "transformer"
    out_dtype, work = export_dtype(requested, str(transformer)) if transformer.is_dir() else \
        (DTYPE_NAMES.get(requested, torch.float32),) * 2
    logger.info("pipeline: loading %s + LoRA %s in %s", source, lora, _dtype_name(work))
    pipe = load_text_to_image(source, work, f"--checkpoint {final}: its generator")
    load_generator_lora(pipe, lora, f"--checkpoint {final}: its {declared['generator_lora']}")
    pipe.fuse_lora(components=["transformer"], adapter_names=[GENERATOR_ADAPTER])
    pipe.unload_lora_weights()
    _no_adapter_left(pipe.transformer, "transformer")
    pipe.to(out_dtype)
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp)
        atomic_write_json(tmp / "uae_export.json", {"exported_by": "uae-export", "source": source,
                                                     "merged": declared["generator_lora"],
                                                     "from_run": str(Path(final).resolve()),
                                                     "dtype": _dtype_name(out_dtype)})
    logger.info("wrote %s: a plain %s folder (%s, the LoRA fused into its transformer)", out, type(pipe).__name__,
                _dtype_name(out_dtype))
    return out


# ---------------------------------------------------------------------------- folder

def export(checkpoint: str, out_dir: str | os.PathLike, *, dtype: str = "auto", overwrite: bool = False,
           link_unchanged: bool = False, source_name: str | None = None) -> Path:
    """Write the merged export of `checkpoint` (a folder in the official layout or a hub id, or a
    stage-2 run's final/ of another model) to `out_dir`, atomically: built in a temporary sibling
    folder, renamed when complete."""
    declared = captioner_run(checkpoint)
    if declared is not None:
        return export_captioner(checkpoint, declared, Path(out_dir), dtype, overwrite)
    declared = generator_run(checkpoint)
    if declared is not None:
        return export_generator(checkpoint, declared, Path(out_dir), dtype, overwrite)
    paths = resolve_components(checkpoint)
    out = Path(out_dir)
    sources = [p for p in paths.as_dict().values() if p and os.path.exists(p)]
    if os.path.isdir(checkpoint):
        sources.append(checkpoint)
    check_output(out, overwrite, sources)
    with atomic_folder(out) as tmp:
        dtypes = {"llm": _dtype_name(export_llm(paths, tmp / "llm", dtype)),
                  "dit": _dtype_name(export_dit(paths, tmp / "dit", dtype))}
        link_or_copy(paths.SD3, tmp / "SD3", link_unchanged)
        # A processor that lives in llm/ (no llm_processor/ in the source) is in the export's llm/ too.
        if Path(paths.llm_processor).resolve() != Path(paths.llm).resolve():
            link_or_copy(paths.llm_processor, tmp / "llm_processor", link_unchanged)
        atomic_write_json(tmp / MANIFEST, {
            "llm_lora": None, "dit_lora": None, "exported_by": "uae-export", "source": source_name or checkpoint,
            "merged": [c for c in ("llm_lora", "dit_lora") if getattr(paths, c)], "dtypes": dtypes})
    return out


@script_main
def main(argv: list[str] | None = None, description: str | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, description=description or __doc__)
    setup_logging(cfg.log_level)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    out = export(checkpoint, cfg.output_dir, dtype=cfg.dtype, overwrite=cfg.overwrite,
                 link_unchanged=cfg.link_unchanged, source_name=cfg.checkpoint)
    if (out / "llm").is_dir():  # UAE's layout (a captioner run's export says what it wrote itself)
        logger.info("wrote %s: llm/ loads with plain transformers (Qwen2_5_VLForConditionalGeneration, AutoProcessor); "
                    "`demo.py --checkpoint %s` runs the merged model", out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
