"""The official checkpoint layout: finding its parts (local folders or hub ids), checking them,
and reading / writing the LLM LoRA in the release's three-shard format.

The trap this module exists for: the release was saved with transformers 4.50,
where `Qwen2_5_VLForConditionalGeneration` kept the text model at `model.` and the vision tower
at `visual.`; today both live inside `model.` (`model.language_model.`, `model.visual.`).
`from_pretrained` converts base weights by itself, but the LoRA shards are a raw state dict that
the official code loaded with strict=False: with today's names every LoRA tensor would be dropped
silently. We map the names and fail loudly on any unused tensor or unloaded LoRA weight.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from uae.errors import UAEError
from uae.hub import local_or_cached

logger = logging.getLogger(__name__)

COMPONENTS = ("SD3", "dit", "dit_lora", "llm", "llm_lora", "llm_processor")
# Sub-folder names tried, in order, inside a checkpoint folder.
SUBFOLDERS = {"SD3": ("SD3",), "dit": ("dit",), "dit_lora": ("dit_lora",), "llm": ("llm", "llm_model"),
              "llm_lora": ("llm_lora",), "llm_processor": ("llm_processor",)}
LORA_SHARDS = tuple(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
OPTIONAL = ("dit_lora", "llm_lora")  # may be switched off with the value "none"
FLAG = {c: "--" + c.lower() for c in COMPONENTS}
MANIFEST = "uae_checkpoint.json"


@dataclass
class ComponentPaths:
    """Where each part of a UAE model lives: a local folder or a hub id (None: not used)."""

    SD3: str | None = None
    dit: str | None = None
    dit_lora: str | None = None
    llm: str | None = None
    llm_lora: str | None = None
    llm_processor: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _is_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not os.path.exists(s)


def _download(repo_id: str, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    found = local_or_cached(repo_id, "checkpoint", hint="offline, pass --checkpoint tiny (random weights, for "
                                                        "tests) or a local folder in the official layout")
    if found != repo_id:
        return Path(found)
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth (gated repos), missing repo
        raise UAEError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the id, your network and `hf auth login` for gated repos, or pass a local "
            "folder instead.") from None


def resolve_components(checkpoint: str | None, overrides: dict[str, str | None] | None = None,
                       need: tuple[str, ...] = COMPONENTS) -> ComponentPaths:
    """Resolve the parts in `need` from a checkpoint (local folder in the official layout or hub id)
    and per-part overrides (local path, hub id, or "none" for the optional LoRAs)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(COMPONENTS)
    if unknown:
        raise UAEError(f"unknown model component(s) {sorted(unknown)}; known: {list(COMPONENTS)}")
    root: Path | None = None
    if checkpoint is not None:
        if os.path.isdir(checkpoint):
            root = Path(checkpoint)
            run_folder = (root / "final").is_dir() or (root / "config.yaml").is_file()
            if run_folder and not any((root / s).is_dir() for s in SUBFOLDERS["llm"]):
                raise UAEError(f"checkpoint {checkpoint!r} is a training run's folder: its result, in the official "
                               f"layout, is {root / 'final'}: pass --checkpoint {root / 'final'}" +
                               ("" if (root / "final").is_dir() else " once the run has finished (it has none yet)"))
        elif _is_hub_id(checkpoint):
            wanted = [c for c in need if c not in overrides]
            patterns = [f"{sub}/*" for c in wanted for sub in SUBFOLDERS[c]] or None
            root = _download(checkpoint, patterns)
        else:
            raise UAEError(f"checkpoint folder {checkpoint!r} does not exist. Pass a folder in the "
                           "official layout (SD3/, dit/, dit_lora/, llm/, llm_lora/, llm_processor/) or "
                           "a hub id such as the release's (README, Real weights).")
    # A folder may declare optional parts it deliberately lacks (e.g. a fully fine-tuned DiT has
    # no dit_lora): {"dit_lora": null} in uae_checkpoint.json.
    declared = {}
    if root is not None and (root / MANIFEST).exists():
        declared = json.loads((root / MANIFEST).read_text())
    paths = ComponentPaths()
    for comp in need:
        if comp not in overrides and comp in OPTIONAL and comp in declared and declared[comp] is None:
            continue
        if comp in overrides:
            value = overrides[comp]
            if value.lower() == "none":
                if comp not in OPTIONAL:
                    raise UAEError(f"{FLAG[comp]} none: {comp} is required and cannot be switched off")
                continue
            if not os.path.exists(value) and not _is_hub_id(value):
                raise UAEError(f"{FLAG[comp]} {value!r}: no such file or folder (and not a hub id)")
            setattr(paths, comp, value)
            continue
        found = None
        if root is not None:
            for sub in SUBFOLDERS[comp]:
                if (root / sub).is_dir():
                    found = root / sub
                    break
            if found is None and comp == "llm_processor":
                llm = next((root / s for s in SUBFOLDERS["llm"] if (root / s).is_dir()), None)
                if llm is not None and _has_any(llm, ("tokenizer.json", "vocab.json")):
                    found = llm
        if found is None:
            where = f"checkpoint {checkpoint!r} has no {SUBFOLDERS[comp][0]}/ folder" if checkpoint else \
                f"no {comp} given"
            hint = f" or `{FLAG[comp]} none` to run without it" if comp in OPTIONAL else ""
            raise UAEError(f"{where}: pass {FLAG[comp]} PATH_OR_HUB_ID{hint}")
        setattr(paths, comp, str(found))
    for comp in need:
        value = getattr(paths, comp)
        if value is not None and os.path.isdir(value):
            check_component(comp, Path(value))
    return paths


def _has_any(folder: Path, names: tuple[str, ...]) -> bool:
    return any((folder / n).exists() for n in names)


def check_component(comp: str, folder: Path) -> None:
    """Fail early, naming the missing file, instead of deep inside a library's loader."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise UAEError(f"{comp} folder {folder} is incomplete: {what}. Re-download or rebuild it.")

    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if comp == "SD3":
        need((folder / "model_index.json").exists(), "model_index.json is missing")
        for sub in ("vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            need((folder / sub).is_dir(), f"{sub}/ is missing (UAE needs it for the VAE, the sampler "
                                          "and the pooled empty-prompt vector)")
    elif comp in ("dit", "llm"):
        need((folder / "config.json").exists(), "config.json is missing")
        need(has_weights, "no *.safetensors weights")
    elif comp == "dit_lora":
        need((folder / "adapter_config.json").exists(), "adapter_config.json is missing (a PEFT adapter)")
        need(has_weights, "no adapter weights (adapter_model.safetensors)")
    elif comp == "llm_lora":
        missing = [s for s in LORA_SHARDS if not (folder / s).exists()]
        need(not missing, f"LoRA shard(s) {missing} missing (the release stores the LLM LoRA in "
                          f"{len(LORA_SHARDS)} shards)")
    elif comp == "llm_processor":
        need(_has_any(folder, ("tokenizer.json", "vocab.json")), "no tokenizer (tokenizer.json)")
        need(_has_any(folder, ("preprocessor_config.json", "processor_config.json")),
             "no image processor config (preprocessor_config.json)")


# ---------------------------------------------------------------------------- key names

KEY_NAMES = ("4.50", "4.52")


def current_to_official(key: str, peft: bool, names: str = "4.50") -> str:
    """transformers>=4.52 name (unwrapped by PEFT) -> a name of the release's state dict. With
    `peft`, the wrapped `uae_model.model` carries PEFT's `base_model.model.` prefix.

    names "4.50" (the inferred release version): `model.` was the text model, the vision tower sat
    at `visual.` outside it. names "4.52": `model.` holds both (`model.language_model.`,
    `model.visual.`), as a release saved with transformers >= 4.52 would have it."""
    if names not in KEY_NAMES:
        raise ValueError(f"names {names!r}: use one of {KEY_NAMES}")
    wrap = "model.base_model.model." if peft else "model."
    if names == "4.52":
        return wrap + key[len("model."):] if key.startswith("model.") else key
    if key.startswith("model.language_model."):
        return wrap + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def official_to_current(key: str) -> str:
    """The release's 4.50 name (PEFT-wrapped or not) -> today's canonical name."""
    key = key.replace("base_model.model.", "")
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def canonical(name: str) -> str:
    """A parameter name without PEFT's wrapping: no `base_model.model.` prefix, no `.base_layer`,
    no adapter name after lora_A / lora_B. Both sides of a mapping meet on this form."""
    name = name.replace("base_model.model.", "").replace(".base_layer", "")
    return re.sub(r"\.(lora_[AB]|lora_embedding_[AB])\.[^.]+\.", r".\1.", name)


def save_sharded(state: dict, out: Path, n_shards: int, index_name: str | None = None,
                 names: tuple[str, ...] | None = None) -> None:
    """Split `state` into `n_shards` safetensors files (contiguous, tensors cloned so tied weights
    save), plus an index json when `index_name` is given."""
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // n_shards)
    names = names or tuple(f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards))
    weight_map, total = {}, 0
    for i, name in enumerate(names):
        chunk = {k: state[k].detach().contiguous().clone() for k in keys[i * per:(i + 1) * per]}
        save_file(chunk, str(out / name), metadata={"format": "pt"})
        for k, v in chunk.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    if index_name:
        (out / index_name).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))


def save_official_llm_lora(encoder, out: Path, full_state_dict: bool = False, names: str = "4.50",
                           with_projector: bool = True) -> None:
    """Write the encoder's LoRA (and projector) in the release's three-shard format, with the key
    names of transformers `names` (see `current_to_official`). `full_state_dict` also writes the
    base weights, as the release did."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in encoder.state_dict().items():
        if not full_state_dict and "lora_" not in name and not name.startswith("projector."):
            continue
        if name.startswith("projector.") and not with_projector:
            continue
        if name.startswith("llm."):
            name = current_to_official(name[len("llm."):].replace("base_model.model.", "", 1), peft=True, names=names)
        state[name] = tensor
    save_sharded(state, out, len(LORA_SHARDS), names=LORA_SHARDS)


def shards_hold_projector(folder: Path) -> bool:
    from safetensors import safe_open

    for shard in LORA_SHARDS:
        with safe_open(str(Path(folder) / shard), framework="pt") as f:
            if any(k.startswith("projector.") for k in f.keys()):
                return True
    return False


def replace_projector_in_shards(src: Path, dst: Path, projector) -> None:
    """Copy the LoRA shards of `src` to `dst` with their projector tensors replaced by
    `projector`'s (every other tensor unchanged, same shard assignment)."""
    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    if dst.exists():
        import shutil

        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    dst.mkdir(parents=True)
    new = {f"projector.{k}": v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()}
    for shard in LORA_SHARDS:
        state = load_file(str(Path(src) / shard))
        state.update({k: new[k].to(v.dtype) for k, v in state.items() if k in new})
        save_file(state, str(dst / shard), metadata={"format": "pt"})


def load_official_llm_lora(encoder, folder: Path) -> dict[str, int]:
    """Load the release's LoRA shards into a LoRA-wrapped encoder. Every tensor of the shards must
    land on a parameter of the same shape, and every LoRA parameter must be loaded."""
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    check_component("llm_lora", folder)
    targets = {}
    for name, tensor in encoder.state_dict(keep_vars=True).items():
        targets[canonical(name[len("llm."):] if name.startswith("llm.") else name)] = (name, tensor)
    unused, mismatched, loaded = [], [], set()
    with torch.no_grad():
        for shard in LORA_SHARDS:
            with safe_open(str(folder / shard), framework="pt") as f:
                for key in f.keys():
                    hit = targets.get(canonical(official_to_current(key)))
                    if hit is None:
                        unused.append(f"{shard}:{key}")
                        continue
                    value = f.get_tensor(key)
                    if tuple(value.shape) != tuple(hit[1].shape):
                        mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(hit[1].shape)}")
                        continue
                    hit[1].copy_(value.to(hit[1].dtype))
                    loaded.add(hit[0])
    lora = {n for n, _ in targets.values() if "lora_" in n}
    unloaded = sorted(lora - loaded)
    if unused or mismatched or unloaded:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} tensor(s) with the wrong shape, e.g. {mismatched[:3]} "
                         "(LoRA rank or model size differ from the llm/ config)")
        if unused:
            parts.append(f"{len(unused)} tensor(s) that match no parameter, e.g. {unused[:3]}")
        if unloaded:
            parts.append(f"{len(unloaded)} LoRA parameter(s) not in the shards, e.g. {unloaded[:3]}")
        raise UAEError(f"llm_lora {folder} does not fit the LLM: " + "; ".join(parts))
    logger.info("loaded %d tensors (%d LoRA) from %s", len(loaded), len(lora), folder)
    return {"loaded": len(loaded), "lora": len(lora)}


@dataclass
class LoraLayout:
    rank: int
    modules: list[str]   # today's names of the modules the LoRA wraps, relative to the Qwen2.5-VL model


def lora_layout_in_shards(folder: Path) -> LoraLayout:
    """The LoRA the shards describe: its rank (rows of the lora_A matrices) and the modules that
    carry lora_A tensors, in today's names. Reading the targets from the shards places a LoRA
    saved with either transformers layout, including one that also wraps the vision tower (a
    release saved with transformers >= 4.52, where "all-linear" on `model` reaches it)."""
    from safetensors import safe_open

    ranks, modules = set(), set()
    for shard in LORA_SHARDS:
        with safe_open(str(Path(folder) / shard), framework="pt") as f:
            for key in f.keys():
                if ".lora_A." in key:
                    modules.add(official_to_current(key).split(".lora_A.", 1)[0])
                    ranks.add(int(f.get_slice(key).get_shape()[0]))
    if not modules:
        raise UAEError(f"llm_lora {folder}: no lora_A tensor in {list(LORA_SHARDS)}")
    if len(ranks) > 1:
        raise UAEError(f"llm_lora {folder}: LoRA matrices of several ranks {sorted(ranks)}; one rank is supported")
    return LoraLayout(ranks.pop(), sorted(modules))
