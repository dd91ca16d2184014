"""The Unified-Bench protocol end to end: caption every reference with the model under test,
regenerate each reference from its caption, score (reconstruction, reference) pairs with the
chosen scorers, and score each caption against its reference (CLIP / LongCLIP text features).

Any unified model can be the model under test (`--model`, see uae/unified/): UAE (the default),
Janus / Janus-Pro, a transformers captioner + a diffusers text-to-image pipeline, or a user's class
implementing uae.unified.UnifiedModel.

Outputs in the run folder: captions/<stem>.txt, recon/<stem>.png, model.json (the model's
settings), unibench_run.json (what the outputs depend on), results.json, results.md, scores.png and
report.html. A rerun skips images already captioned and reconstructed, and refuses other settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from uae.apps.report import bar_plot, html_report, markdown_table
from uae.apps.settings import InferenceConfig
from uae.cli import script_main, setup_logging
from uae.config import field, parse_config, save_config
from uae.errors import UAEError
from uae.files import atomic_write_json, atomic_write_text, check_same_settings, writable_dir
from uae.images import list_images, open_image, save_image
from uae.paths import SAMPLES_DIR, cache_dir
from uae.random_weights import resolve_checkpoint, scorer_checkpoint
from uae.random_weights.unified import resolve as resolve_tiny
from uae.runtime import release_freed_memory, resolve_device, resolve_dtype
from uae.scoring.folder import score_folders
from uae.scoring.scorers import load_scorer, resolve_scorer_weights
from uae.unified.common import short_name
from uae.unified.loading import (MODEL_HELP, all_tiny, apply_captioner_lora, apply_generator_lora, load_model,
                                 model_kind, read_model_args)
from uae.unified.protocol import RunSettings, check_outputs

logger = logging.getLogger(__name__)


def read_captions(source: str | Path) -> dict[str, str]:
    """Captions from another system: a folder of <stem>.txt files or a .jsonl of
    {"image": name-or-stem, "caption": text}. Keys are stems. A caption is the file's text or the
    record's string exactly, never stripped (the release does not strip a caption before it
    becomes a prompt, and whitespace changes the conditioning)."""
    src = Path(source)
    if src.is_dir():
        return {p.stem: p.read_text(encoding="utf-8") for p in sorted(src.glob("*.txt"))}
    if src.is_file() and src.suffix == ".jsonl":
        out = {}
        for i, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    out[Path(str(rec["image"])).stem] = str(rec["caption"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UAEError(f"--captions_from {src} line {i}: expected {{\"image\": ..., \"caption\": ...}}") from None
        return out
    raise UAEError(f"--captions_from {source}: expected a folder of .txt files or a .jsonl file")


def _known_captions(cfg, cap_dir: Path) -> dict[str, str]:
    captions = read_captions(cap_dir) if cap_dir.exists() else {}
    captions.update(read_captions(cfg.captions_from) if cfg.captions_from else {})
    return captions


# What the captions and reconstructions depend on: a rerun into the same --output_dir resumes only
# with the same values (else its outputs would be mixed with another model's or seed's).
RUN_FILE = "unibench_run.json"
RESUME_KEYS = ("model", "checkpoint", "captioner", "generator", "captioner_lora", "generator_lora", "model_args",
               "captions_from", "seed", "increment_seed", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
               "repetition_penalty", "exif_transpose", "caption_batching", "steps", "guidance_scale", "height",
               "width", "dit_batching", "dtype")


def run_settings(cfg) -> dict:
    """RESUME_KEYS' values, local paths made absolute (a rerun from another folder resumes)."""
    def value(k):
        v = getattr(cfg, k)
        paths = ("checkpoint", "captioner", "generator", "captioner_lora", "generator_lora", "captions_from")
        return str(Path(v).resolve()) if k in paths and v and v != "tiny" and Path(v).exists() else v
    return {k: value(k) for k in RESUME_KEYS}


def produce(cfg, refs: list[Path], out: Path, state=None) -> tuple[dict[str, str], dict[str, str]]:
    """Captions and reconstructions for every readable reference not done yet. Returns
    ({stem: caption} for every reference that has one, {reference name: why it was skipped}).

    Under `accelerate launch` / torchrun (`state`: accelerate's PartialState) the batches are
    formed as in one process and dealt out round-robin; every caption and image has its own seed
    (`seeds`), so it comes out the same however many processes run and whatever the batch size.
    Every process returns the merged result."""
    from tqdm.auto import tqdm

    world, rank = (1, 0) if state is None else (state.num_processes, state.process_index)
    settings = run_settings(cfg)
    check_same_settings(out / RUN_FILE, settings, RESUME_KEYS)  # on every process: none waits for a failed one
    if rank == 0:
        atomic_write_json(out / RUN_FILE, settings)
    cap_dir, rec_dir = out / "captions", out / "recon"
    captions = _known_captions(cfg, cap_dir)
    todo = [r for r in refs if not ((rec_dir / f"{r.stem}.png").exists() and r.stem in captions)]
    logger.info("%d reference(s); %d already done, %d to caption and/or reconstruct%s",
                len(refs), len(refs) - len(todo), len(todo), f" over {world} processes" if world > 1 else "")
    skipped: dict[str, str] = {}
    starts = list(range(0, len(todo), cfg.batch_size))[rank::world]
    if world > 1:
        logger.info("process %d/%d: %d batch(es)", rank, world, len(starts))
    if starts:
        seeds = dict(zip(refs, cfg.seeds(range(len(refs)))))
        where = f" (process {rank}/{world})" if world > 1 else ""
        skipped = _caption_and_regenerate(cfg, todo, starts, seeds, captions, cap_dir, rec_dir,
                                          tqdm, state.device if world > 1 else cfg.device,
                                          show=state is None or state.is_local_main_process,
                                          desc="caption + regenerate" + where)
    if world > 1:
        from accelerate.utils import gather_object

        state.wait_for_everyone()
        skipped = {k: v for part in gather_object([skipped]) for k, v in part.items()}
        captions = _known_captions(cfg, cap_dir)  # the other processes' captions, from disk
    return captions, skipped


def _source_label(value: str | None, kind: str) -> str | None:
    return None if value is None else (f"tiny-{kind}" if value == "tiny" else short_name(value))


def model_label(cfg) -> str:
    """The model under test's name for titles, known without loading it."""
    kind = model_kind(cfg.model)
    if kind == "uae":
        name = Path(cfg.checkpoint).name if cfg.checkpoint else "external"
        return f"{_source_label(cfg.captioner, 'captioner')} + UAE {name}" if cfg.captioner else name
    if kind == "janus":
        return f"Janus {_source_label(cfg.checkpoint, 'janus')}"
    if kind == "pipeline":
        captioner = _source_label(cfg.captioner, "captioner") or "captions"
        return f"{captioner} + {_source_label(cfg.generator, 'generator')}"
    return cfg.model


def load_model_under_test(cfg, device, caption_progress: bool = False):
    """The `--model` on `device`, built with the run's settings (uae.unified.RunSettings); the name
    `tiny` of --checkpoint / --captioner / --generator resolved to the embedded random models.
    `caption_progress`: the model shows a bar of each caption's tokens."""
    dev = resolve_device(str(device))
    settings = RunSettings.from_config(cfg, dev, resolve_dtype(cfg.dtype, dev), caption_progress=caption_progress)
    kind = model_kind(cfg.model)
    checkpoint = cfg.checkpoint  # used by uae and janus only
    if kind == "uae":
        checkpoint = resolve_checkpoint(cfg.checkpoint)
    elif kind == "janus":
        checkpoint = resolve_tiny(cfg.checkpoint, "janus")
    labels = {"checkpoint": _source_label(cfg.checkpoint, "janus" if kind == "janus" else "uae"),
              "captioner": _source_label(cfg.captioner, "captioner"),
              "generator": _source_label(cfg.generator, "generator")}
    model = load_model(cfg.model, settings, checkpoint=checkpoint, captioner=resolve_tiny(cfg.captioner, "captioner"),
                       generator=resolve_tiny(cfg.generator, "generator"), model_args=cfg.model_args, labels=labels)
    if cfg.captioner_lora:
        apply_captioner_lora(model, cfg.captioner_lora)
    if cfg.generator_lora:
        apply_generator_lora(model, cfg.generator_lora)
    return model


MODEL_FILE = "model.json"  # the model under test's name and settings(), written when it is loaded


def _caption_and_regenerate(cfg, todo, starts, seed, captions, cap_dir, rec_dir, tqdm, device, show: bool = True,
                            desc: str = "caption + regenerate") -> dict[str, str]:
    """`seed[reference]`: the release's one seed for all, or the reference's index added to it
    (--increment_seed), independent of batches, processes and resumes. `show`: this process draws
    the bars (of its images, and of each caption's tokens)."""
    skipped: dict[str, str] = {}
    model = load_model_under_test(cfg, device, caption_progress=show)
    setting = f"--model {cfg.model}"
    info = {"model": cfg.model, "name": str(model.name), "settings": model.settings()}
    atomic_write_json(cap_dir.parent / MODEL_FILE, json.loads(json.dumps(info, default=str)))
    if info["settings"].get("batch_invariant") is False:
        logger.warning("%s: outputs depend on --batch_size and on the number of processes (its settings say "
                       "batch_invariant: false)", model.name)
    # A with-block: the bar is closed before an error leaves (so that the error is the last line).
    with tqdm(total=sum(len(todo[i:i + cfg.batch_size]) for i in starts), desc=desc, unit="image",
              disable=not show) as bar:
        for i in starts:
            chunk, images = [], []
            for ref in todo[i:i + cfg.batch_size]:
                try:
                    images.append(open_image(ref, exif_transpose=cfg.exif_transpose))
                    chunk.append(ref)
                except UAEError as e:
                    skipped[ref.name] = str(e)  # reported as a failed pair
                    bar.update(1)
            if not chunk:
                continue
            missing = [j for j, r in enumerate(chunk) if r.stem not in captions]
            if missing:
                bar.set_postfix_str(f"captioning {len(missing)}")
                new = check_outputs(model.caption([images[j] for j in missing], [seed[chunk[j]] for j in missing]),
                                    len(missing), "caption", model, setting)
                for j, cap in zip(missing, new):
                    captions[chunk[j].stem] = cap
                    atomic_write_text(cap_dir / f"{chunk[j].stem}.txt", cap)
            bar.set_postfix_str(f"regenerating {len(chunk)}")
            recons = check_outputs(model.generate([captions[r.stem] for r in chunk], [seed[r] for r in chunk]),
                                   len(chunk), "image", model, setting)
            for ref, im in zip(chunk, recons):
                save_image(im, rec_dir / f"{ref.stem}.png")
            bar.update(len(chunk))
    del model
    return skipped


TEXT_BATCH = 32  # captions encoded together (a fixed number: the scores do not depend on --batch_size)


@torch.no_grad()
def caption_faithfulness(scorers: dict, captions: dict[str, str], ref_features: dict, refs: list[Path]) -> dict:
    """Cosine of each caption's text feature with its reference's image feature (text scorers),
    TEXT_BATCH captions at a time (all at once, a text encoder's activations grow with the number
    of references: gigabytes at 2,000)."""
    out = {}
    for name, scorer in scorers.items():
        if not scorer.has_text:
            continue
        names = [r.name for r in refs if r.stem in captions and r.name in ref_features.get(name, {})]
        if not names:
            continue
        per = {}
        for i in range(0, len(names), TEXT_BATCH):
            chunk = names[i:i + TEXT_BATCH]
            text = scorer.encode_text([captions[Path(n).stem] for n in chunk]).cpu()
            img = torch.stack([ref_features[name][n] for n in chunk])
            per.update({n: float(v) for n, v in zip(chunk, (text * img).sum(-1))})
            release_freed_memory()
        vals = list(per.values())
        out[name] = {**per, "average": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
    return out


def run_unibench(cfg) -> dict | None:
    """Caption + regenerate (split over the processes of an `accelerate launch` / torchrun job),
    then score and report on the main process. Returns the result there, None elsewhere."""
    from accelerate import PartialState

    out = writable_dir(cfg.output_dir, "--output_dir")  # before anything loads
    refs = list_images(cfg.ref_path, "reference (--ref_path)")
    skipped: dict[str, str] = {}
    if cfg.recon_from:
        recon_dir = Path(cfg.recon_from)
        captions = read_captions(cfg.captions_from) if cfg.captions_from else {}
    else:
        state = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
        captions, skipped = produce(cfg, refs, out, state if state.num_processes > 1 else None)
        if state.num_processes > 1:
            # No collective after the gather: every process leaves the group now. A process that exits
            # with the group alive can abort at interpreter shutdown (gloo's threads: "terminate called
            # without an active exception", SIGABRT) while the main process is still scoring.
            state.destroy_process_group()
        if not state.is_main_process:
            return None  # scoring (cheap next to generation) and the report happen once
        recon_dir = out / "recon"
        if not recon_dir.is_dir():
            raise UAEError(f"no reference in {cfg.ref_path} could be read: {skipped}")
    device = resolve_device(cfg.device)
    weights = resolve_scorer_weights(cfg.scorer_weights, cfg.model_is_tiny())
    if weights == "tiny":
        logger.warning("tiny scorer weights are RANDOM: scores test the pipeline, not image similarity")
    scorers = {m: load_scorer(m, scorer_checkpoint(m, weights), device=device,
                              dtype=resolve_dtype(cfg.scorer_dtype, device)) for m in dict.fromkeys(cfg.models)}
    ref_feats: dict = {m: {} for m, s in scorers.items() if s.has_text}  # kept for caption faithfulness only
    result = score_folders(recon_dir, cfg.ref_path, scorers, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                           cache_dir=None if cfg.no_cache else cache_dir() / "features",
                           reference_features=ref_feats or None)
    for name, why in skipped.items():  # unreadable references: failures with their reason, not "unmatched"
        result["errors"][name] = why
        if name in result["unmatched"]["references"]:
            result["unmatched"]["references"].remove(name)
            result["summary"]["pairs"] += 1
            result["summary"]["failed"] += 1
    result["caption_faithfulness"] = caption_faithfulness(scorers, captions, ref_feats, refs)
    result["captions"] = {r.name: captions.get(r.stem) for r in refs}
    result["meta"] = {"checkpoint": cfg.checkpoint, "reference_folder": str(cfg.ref_path),
                      "reconstruction_folder": str(recon_dir), "scorer_weights": weights,
                      "device": str(device), "torch": torch.__version__}
    if not cfg.recon_from:
        model_file = out / MODEL_FILE
        info = json.loads(model_file.read_text(encoding="utf-8")) if model_file.is_file() else {}
        result["meta"].update(model=cfg.model, model_label=model_label(cfg), captioner=cfg.captioner,
                              generator=cfg.generator, model_name=info.get("name"),
                              model_settings=info.get("settings"))
    names = list(scorers)
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", markdown_table(result, names))
    external = Path(cfg.checkpoint).name if cfg.checkpoint else "external"
    title = f"Unified-Bench: {external if cfg.recon_from else model_label(cfg)}"
    bar_plot(result, names, out / "scores.png", title)
    recon_by_stem = {p.stem.removeprefix("recon_"): p for p in recon_dir.iterdir()} if recon_dir.is_dir() else {}
    rows = ({"name": r.name, "reference": r, "reconstruction": recon_by_stem.get(r.stem),
             "caption": captions.get(r.stem)} for r in refs)
    html_report(result, names, rows, out / "report.html", title)
    return result


# ---------------------------------------------------------------------------- the runner's command line

@dataclass
class UniBenchConfig(InferenceConfig):
    """Unified-Bench: image -> caption -> image reconstruction similarity of a unified model (UAE by default)."""

    model: str = field("uae", help=MODEL_HELP)
    checkpoint: str = field("tiny", help="--model uae: a UAE folder in the official layout, hub id, or 'tiny'; "
                                         "--model janus: a Janus checkpoint in transformers' layout (hub id such as "
                                         "deepseek-community/Janus-Pro-7B, folder, or 'tiny')")
    captioner: str | None = field(None, help="a transformers image-text-to-text model (hub id, folder, or 'tiny'): "
                                             "--model pipeline's captioner; with --model uae, captions from it are "
                                             "regenerated by UAE (the paper's Tab. 3 captioner swap)")
    generator: str | None = field(None, help="--model pipeline: a diffusers text-to-image pipeline (hub id, folder, "
                                             "or 'tiny'); without --captioner it regenerates --captions_from's "
                                             "captions (a decoder swap)")
    captioner_lora: str | None = field(None, aliases=["--lora"],
                                       help="--model janus / pipeline: a LoRA trained by train_grpo.py --stage g4u "
                                            "--model ... (its final/captioner_lora), loaded onto the captioner's "
                                            "language model; Janus also generates with it when its run trained end "
                                            "to end (the run's manifest, lora_sides), else with it off, as it trained")
    generator_lora: str | None = field(None, help="--model pipeline: a LoRA of its generator in diffusers' format (a "
                                                  "stage-3 run's final/generator_lora: train_grpo.py --stage u4g "
                                                  "--model pipeline), loaded as pipe.load_lora_weights does")
    model_args: str | None = field(None, help="a mapping (inline JSON / YAML, or a .json / .yaml file): the "
                                              "constructor's keyword arguments for --model module:Class; extra "
                                              "pipeline call arguments for --model pipeline")
    ref_path: str = field(str(SAMPLES_DIR / "sample"), help="reference images (default: the six sample photos; the "
                                                             "real benchmark: UniBench/Image, 100 images)")
    output_dir: str = field("Unified-Bench/results/run", help="run folder (captions/, recon/, results.*, report.html)")
    models: list[str] = field(["clip", "dinov2", "dinov3", "longclip"], choices=("clip", "dinov2", "dinov3", "longclip"),
                              help="scorers")
    scorer_weights: str = field("auto", choices=("auto", "official", "tiny"),
                                help="auto (tiny for the tiny model, else official), official, tiny")
    captions_from: str | None = field(None, help="use another system's captions: folder of <stem>.txt or .jsonl")
    recon_from: str | None = field(None, help="score another system's reconstructions (skips the model)")
    batch_size: int = field(4, min=1, help="references per batch (captioning, generation, scoring); results do not "
                                           "depend on it")
    num_workers: int = field(2, min=0, help="DataLoader workers decoding images for scoring")
    scorer_dtype: str = field("float32", help="scorer dtype")
    no_cache: bool = field(False, help="do not use the reference-feature cache")
    allow_failures: bool = field(False, help="exit 0 even when some pairs failed")

    def __post_init__(self):
        if not self.models:
            raise UAEError("--models: give at least one scorer")
        if self.recon_from and not Path(self.recon_from).is_dir():
            raise UAEError(f"--recon_from {self.recon_from}: no such folder")
        super().__post_init__()
        self.check_model_settings()

    def check_model_settings(self) -> None:
        """Which flags each --model takes (cheap: nothing is loaded)."""
        kind = model_kind(self.model)
        if kind == "uae" and not self.recon_from:
            self.check_sd3_size()
        has_captions = self.captioner or self.captions_from
        if kind == "pipeline" and not self.recon_from and not (self.generator and has_captions):
            raise UAEError("--model pipeline needs --generator (a diffusers text-to-image pipeline) and --captioner "
                           "(a transformers image-text-to-text model; or every caption from --captions_from), each a "
                           "hub id, a folder or 'tiny'")
        if self.generator and kind != "pipeline":
            raise UAEError(f"--generator applies to --model pipeline, not --model {self.model}")
        if self.captioner and kind not in ("pipeline", "uae"):
            raise UAEError(f"--captioner applies to --model pipeline and --model uae, not --model {self.model}")
        if self.model_args not in (None, "") and kind not in ("pipeline", "module"):
            raise UAEError(f"--model_args applies to --model module:Class and --model pipeline, not --model "
                           f"{self.model}")
        read_model_args(self.model_args)

    def model_is_tiny(self) -> bool:
        """Whether the run loads a model and every model it loads is an embedded random one (then
        --scorer_weights auto is tiny). Another system's reconstructions (--recon_from) and a
        user's class get the official scorers unless --scorer_weights tiny."""
        return not self.recon_from and all_tiny(self.model, self.checkpoint, self.captioner, self.generator)


@script_main
def main(argv=None, description: str | None = None) -> int:
    """Unified-Bench/run_unibench.py."""
    cfg = parse_config(UniBenchConfig, argv, description=description or __doc__)
    setup_logging(cfg.log_level)
    result = run_unibench(cfg)
    if result is None:  # a non-main process of a multi-process run: the main one reports
        return 0
    save_config(cfg, Path(cfg.output_dir) / "unibench_config.yaml")
    s = result["summary"]
    logger.info("overall %s over %d valid pair(s), %d failed: see %s/report.html",
                "n/a" if result["overall"] is None else f"{result['overall']:.4f}", s["valid"], s["failed"],
                cfg.output_dir)
    return 1 if s["failed"] and not cfg.allow_failures else 0
