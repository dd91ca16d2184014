"""The model under test from the runner's settings (`--model`):

    uae             uae.unified.uae_model.UAEModel(--checkpoint [, --captioner])
    janus           uae.unified.janus.JanusAdapter(--checkpoint)
    pipeline        uae.unified.pipeline.PipelineAdapter(--captioner, --generator, call kwargs --model_args);
                    without --captioner, the captions come from --captions_from
    module:Class    a user's class implementing uae.unified.UnifiedModel: `module` is an importable
                    module (dotted name, on PYTHONPATH) or a path to a .py file; it is constructed as
                    Class(**model_args), with settings=<RunSettings> added when its constructor has
                    a parameter named `settings` (a function returning a model works the same way)

`--model_args` is a mapping: inline JSON or YAML, or a path to a .json / .yaml file (or, in a
--config YAML, a mapping under `model_args:`). Every source here is a folder or a hub id: the
entry layer (uae.apps.unibench) resolves the name `tiny` to the embedded random models first."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from uae.errors import UAEError
from uae.models.layout import MANIFEST
from uae.unified.common import first_line
from uae.unified.janus import JanusAdapter
from uae.unified.pipeline import PipelineAdapter
from uae.unified.protocol import CAPTIONING_SIDE_MEMBERS, check_model
from uae.unified.uae_model import UAEModel

logger = logging.getLogger(__name__)

KINDS = ("uae", "janus", "pipeline")
MODEL_HELP = ("model under test: uae, janus, pipeline (--captioner + --generator), or module:Class (a class "
              "implementing uae.unified.UnifiedModel; module: a dotted name or a .py path)")


def model_kind(spec: str) -> str:
    """"uae", "janus", "pipeline" or "module" (for module:Class), or a one-line error."""
    if spec in KINDS:
        return spec
    module, _, name = str(spec).rpartition(":")
    if module and name.isidentifier():
        return "module"
    raise UAEError(f"--model {spec}: choose uae, janus, pipeline, or module:Class (an importable module or a .py "
                   "file, and the name of a class in it that implements uae.unified.UnifiedModel)")


def read_model_args(value: Any) -> dict:
    """The --model_args mapping from inline JSON / YAML, a .json / .yaml file, or a mapping."""
    import yaml

    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        out = value
    else:
        text, source = str(value), "--model_args"
        path = Path(text)
        if path.suffix.lower() in (".json", ".yaml", ".yml") and not text.lstrip().startswith("{"):
            if not path.is_file():
                raise UAEError(f"--model_args {text}: no such file")
            text, source = path.read_text(encoding="utf-8"), f"--model_args {path}"
        try:
            out = json.loads(text)
        except json.JSONDecodeError:
            try:
                out = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise UAEError(f"{source}: neither JSON nor YAML ({' '.join(str(e).split())})") from None
    if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
        raise UAEError(f"--model_args: expected a mapping of name: value (JSON object or YAML mapping), got "
                       f"{type(out).__name__}")
    return dict(out)


def import_class(spec: str, setting: str = "--model"):
    """The object `module:Name` names: `module` a dotted module name or a path to a .py file."""
    module_name, _, name = spec.rpartition(":")
    path = Path(module_name)
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        if not path.is_file():
            raise UAEError(f"{setting} {spec}: no such file {module_name}")
        unique = f"uae_user_model_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(unique)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[unique] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(unique, None)
                raise
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise  # the module exists; something it imports is missing: the user's traceback
            raise UAEError(f"{setting} {spec}: no module named {module_name!r} (put its folder on PYTHONPATH, or give "
                           "the file: path/to/file.py:Class)") from None
    obj = getattr(module, name, None)
    if obj is None:
        raise UAEError(f"{setting} {spec}: {module_name} has no {name!r}")
    if not callable(obj):
        raise UAEError(f"{setting} {spec}: {name} is a {type(obj).__name__}, not a class")
    return obj


def build_user_model(spec: str, settings, model_args: dict):
    """Class(**model_args) [+ settings=...], checked against the protocol."""
    cls = import_class(spec)
    kwargs = dict(model_args)
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        if "settings" in sig.parameters and "settings" not in kwargs:
            kwargs["settings"] = settings
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise UAEError(f"--model_args: {spec} cannot be constructed with {sorted(kwargs)} ({e})") from None
    return cls(**kwargs)


def load_model(spec: str, settings, *, checkpoint: str | None = None, captioner: str | None = None,
               generator: str | None = None, model_args: Any = None, labels: dict[str, str] | None = None):
    """The model under test, checked against the protocol. `labels`: report names for the
    sources ("checkpoint", "captioner", "generator"), e.g. for resolved `tiny` folders."""
    labels = labels or {}
    kind = model_kind(spec)
    if kind == "uae":
        model = UAEModel(checkpoint, settings, captioner=captioner, captioner_label=labels.get("captioner"))
    elif kind == "janus":
        model = JanusAdapter(checkpoint, settings, label=labels.get("checkpoint"))
    elif kind == "pipeline":
        if not generator:
            raise UAEError("--model pipeline needs --generator (a diffusers text-to-image pipeline)")
        model = PipelineAdapter(captioner or None, generator, settings, read_model_args(model_args),
                                captioner_label=labels.get("captioner"), generator_label=labels.get("generator"))
    else:
        model = build_user_model(spec, settings, read_model_args(model_args))
    check_model(model, f"--model {spec}")
    return model


def model_sources(spec: str, checkpoint: str | None, captioner: str | None, generator: str | None) -> list | None:
    """The sources (hub ids, folders or `tiny`) that `--model spec` loads; None for a user's class."""
    kind = model_kind(spec)
    if kind == "janus":
        return [checkpoint]
    if kind == "module":
        return None
    main = checkpoint if kind == "uae" else generator
    return [main] + ([captioner] if captioner else [])


def all_tiny(spec: str, checkpoint: str | None, captioner: str | None, generator: str | None) -> bool:
    """Whether every model that `--model spec` loads is an embedded random one (then scorer weights
    `auto` are the tiny ones)."""
    sources = model_sources(spec, checkpoint, captioner, generator)
    return bool(sources) and all(s in ("tiny", "tiny-flux") for s in sources)


def captioning_side(model, setting: str):
    """The captioning side of a model under test (uae.unified.protocol.CaptioningSide): a Janus
    adapter itself, a pipeline's or a user class's `captioner`; a one-line error naming what is
    missing."""
    side = getattr(model, "captioner", model)
    name = type(model).__name__
    if side is None or not hasattr(side, "model"):
        raise UAEError(f"{setting}: {name} has no transformers captioner to train or load a LoRA onto (--model janus, "
                       "--model pipeline --captioner ..., or a class with a `captioner` holding model, processor and "
                       "inputs(images): uae.unified.protocol.CaptioningSide; a UAE LoRA lives in its checkpoint)")
    missing = [m for m in CAPTIONING_SIDE_MEMBERS if not hasattr(side, m)]
    if missing or not callable(side.inputs):
        raise UAEError(f"{setting}: {name}'s captioner lacks {', '.join(missing or ['a callable inputs'])} "
                       "(uae.unified.protocol.CaptioningSide: model, processor, inputs(images))")
    return side


def apply_captioner_lora(model, folder: str) -> None:
    """A captioner LoRA from stage 2 (PEFT's folder format) onto the model under test's captioner:
    Janus's language model (its images then use the LoRA too when its run trained end to end, as its
    manifest says: see `lora_sides`; else they run with the LoRA off, as in its training) or a
    pipeline's transformers captioner. UAE keeps its LoRA in its checkpoint (--checkpoint
    <run>/final). A full fine-tune (--captioner_finetune full) has no LoRA: its final/captioner is
a plain model folder, given as --checkpoint (Janus) or --captioner (a pipeline); naming it here is a
one-line error that says so. Every tensor of the file must find its place and every LoRA weight must come
    from the file: PEFT drops a tensor it cannot place without a word, and only warns of one missing."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    setting = f"--captioner_lora {folder}"
    full = full_captioner(folder)
    if full is not None:
        given = "--checkpoint" if isinstance(captioning_side(model, setting), JanusAdapter) else "--captioner"
        raise UAEError(f"{setting}: a full fine-tune (train_grpo.py --captioner_finetune full) has no LoRA; its "
                       f"{full} is a plain model folder: give it as {given} {full}")
    if not (Path(folder) / "adapter_config.json").is_file():
        raise UAEError(f"{setting}: not a PEFT adapter folder (no adapter_config.json); give a stage-2 run's "
                       "final/captioner_lora")
    target = captioning_side(model, "--captioner_lora")
    try:
        lora = PeftModel.from_pretrained(target.model, folder).eval()
        saved = load_peft_weights(folder, device="cpu")
    except Exception as e:
        raise UAEError(f"{setting} does not fit the captioner ({first_line(e)})") from None
    placed = get_peft_model_state_dict(lora)
    unplaced, missing = sorted(set(saved) - set(placed)), sorted(set(placed) - set(saved))
    if unplaced or missing:
        raise UAEError(f"{setting} does not fit the captioner: {len(unplaced)} tensor(s) of the file have no place "
                       f"in it {unplaced[:1]}, {len(missing)} of its LoRA weight(s) are not in the file {missing[:1]}")
    target.model = lora
    sides = lora_sides(folder)
    if "image" in sides and isinstance(model, JanusAdapter):
        model.image_lora = True  # trained end to end: it generated the images it was rewarded for
    if "image" not in sides and getattr(model, "conditions_generator", False):
        logger.warning("%s was trained for captions only, and %s conditions its generator on the captioner: its "
                       "images now use the LoRA too", setting, type(model).__name__)
    logger.info("%s: the LoRA serves the %s", setting, " and the ".join(f"{s}s" for s in sides))


GENERATOR_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA format (save_lora_weights)


def apply_generator_lora(model, folder: str) -> None:
    """A generator LoRA in diffusers' format (stage 3 on a pipeline: train_grpo.py --stage u4g
    --model pipeline, its final/generator_lora) onto the model under test's diffusers pipeline
    (`load_generator_lora`)."""
    setting = f"--generator_lora {folder}"
    pipe = getattr(getattr(model, "generator", None), "pipe", None)
    if pipe is None or not hasattr(pipe, "load_lora_weights"):
        raise UAEError(f"{setting}: {type(model).__name__} has no diffusers pipeline to load a LoRA onto (--model "
                       "pipeline --generator ...; UAE's decoder LoRA lives in its checkpoint: --checkpoint <run>/final)")
    placed = load_generator_lora(pipe, folder, setting)
    model.generator.lora = str(folder)
    logger.info("%s: loaded into %s's transformer (%d tensors)", setting, type(pipe).__name__, placed)


GENERATOR_ADAPTER = "generator_lora"  # the adapter name a loaded generator LoRA gets


def load_generator_lora(pipe, folder: str, setting: str) -> int:
    """`pipe.load_lora_weights(folder)` as adapter GENERATOR_ADAPTER, checked: every LoRA tensor of
    the file must find its place (diffusers skips the keys it cannot place with a warning), else a
    one-line error naming `setting`. Returns the number of LoRA tensors placed."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(folder) / GENERATOR_LORA_FILE
    if not file.is_file():
        raise UAEError(f"{setting}: no {GENERATOR_LORA_FILE} there (diffusers' LoRA format); give a stage-3 run's "
                       "final/generator_lora")
    saved = [k for k in load_file(str(file)) if "lora" in k]
    quiet = logging.getLogger("diffusers.loaders.peft")  # it logs the whole state-dict error before raising it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        pipe.load_lora_weights(str(folder), adapter_name=GENERATOR_ADAPTER)
    except Exception as e:
        raise UAEError(f"{setting} does not fit {type(pipe).__name__} ({first_line(e)})") from None
    finally:
        quiet.setLevel(level)
    placed = get_peft_model_state_dict(pipe.transformer, adapter_name=GENERATOR_ADAPTER) \
        if getattr(pipe.transformer, "peft_config", None) else {}
    if len(placed) != len(saved):
        raise UAEError(f"{setting} does not fit {type(pipe).__name__}: {len(saved)} LoRA tensor(s) in the file, "
                       f"{len(placed)} placed in its transformer")
    return len(placed)


def run_manifest(final: str | os.PathLike, setting: str) -> dict | None:
    """The manifest a training run wrote in its final/ (uae_checkpoint.json: what trained, from
    which source, which sides a captioner LoRA serves), or None where there is none; a one-line
    error naming `setting` when it is not JSON."""
    manifest = Path(final) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        declared = json.loads(manifest.read_text())
    except ValueError as e:
        raise UAEError(f"{setting}: {manifest} is not valid JSON ({e}); it is the run's manifest, written by "
                       "train_grpo.py") from None
    if not isinstance(declared, dict):
        raise UAEError(f"{setting}: {manifest} holds a {type(declared).__name__}, not the run's manifest")
    return declared


def full_captioner(folder: str) -> Path | None:
    """The plain model folder of a stage-2 full fine-tune (--captioner_finetune full) that `folder`
    names (its final/, or final/captioner itself), or None for anything else."""
    folder = Path(folder)
    for final, model in ((folder, folder / "captioner"), (folder.parent, folder)):
        if not (model / "config.json").is_file():
            continue
        declared = run_manifest(final, str(folder)) or {}
        if declared.get("captioner_finetune") == "full" and (final / declared.get("captioner", "")) == model:
            return model
    return None


def lora_sides(folder: str) -> list[str]:
    """The sides a captioner LoRA serves, from the manifest of the run that wrote it
    (<final>/uae_checkpoint.json beside <final>/captioner_lora): ["caption"] when it was trained
    with a frozen generator (and for a folder without a manifest), ["caption", "image"] when the
    policy generated the reward's images itself (--model janus end to end)."""
    manifest = Path(folder).parent / MANIFEST
    declared = run_manifest(Path(folder).parent, f"--captioner_lora {folder}")
    if declared is None:
        return ["caption"]
    sides = declared.get("lora_sides", ["caption"])
    if not isinstance(sides, list) or not set(sides) <= {"caption", "image"} or "caption" not in sides:
        raise UAEError(f"--captioner_lora {folder}: {manifest} lora_sides {sides!r} is not ['caption'] or "
                       "['caption', 'image']")
    return sides
