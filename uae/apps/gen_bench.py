"""Text-to-image benchmarks in their official output layouts: GenEval and DPG-Bench.

    python -m uae.apps.gen_bench --benchmark geneval --prompts geneval/prompts/evaluation_metadata.jsonl \\
        --output_dir out/geneval --checkpoint zhiyuanyan1/UAE
    python -m uae.apps.gen_bench --benchmark dpg --prompts ELLA/dpg_bench/prompts --output_dir out/dpg \\
        --checkpoint zhiyuanyan1/UAE

GenEval (djghosh13/geneval): --prompts is its evaluation_metadata.jsonl (one JSON object a line,
with a "prompt"); the output is one folder per line, <index:05d>/, holding metadata.jsonl (that
line, exactly) and samples/<k:05d>.png, what evaluation/evaluate_images.py reads.

DPG-Bench (TencentQQGYLab/ELLA): --prompts is its prompts/ folder of <id>.txt files (the prompt is
the file's text less trailing line breaks), or a .jsonl of {"item_id" (or "id"): ..., "text" (or
"prompt"): ...}; the output is <id>.png, the images of a prompt tiled as compute_dpg_bench.py crops
them: image k at column k % 2, row k // 2, each --height x --width (square: the evaluator crops
squares of its --resolution).

Image k (0-based) of prompt i (0-based: its line among the non-blank lines for GenEval and a .jsonl,
its place in the file names' sorted order for a prompts folder) is generated alone with seed
`--seed + i * --images_per_prompt + k`, so every image is the same however the run is split over
processes or resumed. A rerun skips outputs already complete (every file is written atomically);
gen_bench_manifest.json in the output folder records every setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import uae
from uae.apps.settings import GenerationConfig
from uae.cli import script_main, setup_logging
from uae.config import field, parse_config
from uae.errors import UAEError
from uae.files import atomic_write_json, atomic_write_text, check_same_settings, writable_dir
from uae.images import save_image
from uae.models.uae import UAE
from uae.random_weights import resolve_checkpoint
from uae.random_weights.unified import resolve as resolve_model
from uae.unified.common import load_config
from uae.unified.janus import JanusAdapter, janus_image_side
from uae.unified.loading import apply_captioner_lora, apply_generator_lora
from uae.unified.pipeline import PipelineAdapter
from uae.unified.protocol import RunSettings
from uae.runtime import resolve_device, resolve_dtype

logger = logging.getLogger("uae.apps.gen_bench")  # not __name__: "__main__" under python -m

BENCHMARKS = ("geneval", "dpg")
MANIFEST = "gen_bench_manifest.json"
SEED_POLICY = ("image k (0-based) of prompt i (0-based) is generated alone with seed = seed + i * images_per_prompt "
               "+ k; i is the prompt's line among the non-blank lines (GenEval, .jsonl) or its place in the sorted "
               "file names (a folder of <id>.txt)")
DPG_MAX_IMAGES = 4  # compute_dpg_bench.py crops at most four cells: a 2x2 grid
# What an existing output folder must have been made with for a rerun to add to it.
RESUME_KEYS = ("benchmark", "prompts_sha256", "model", "checkpoint", "generator", "generator_lora", "lora",
               "images_per_prompt", "seed", "steps", "guidance_scale", "height", "width", "dit_batching", "dtype")


@dataclass
class GenBenchConfig(GenerationConfig):
    """Text-to-image benchmarks (GenEval, DPG-Bench): generate every prompt's images in the layout
    the benchmark's official evaluator reads."""

    seed: int = field(42, help="image k (0-based) of prompt i (0-based) is generated with seed + i * "
                               "images_per_prompt + k")

    benchmark: str | None = field(None, choices=BENCHMARKS, help="geneval or dpg (required)")
    prompts: str | None = field(None, help="GenEval: its evaluation_metadata.jsonl; DPG-Bench: its prompts/ folder of "
                                           "<id>.txt files, or a .jsonl of {\"item_id\" or \"id\", \"text\" or "
                                           "\"prompt\"} (required)")
    output_dir: str | None = field(None, help="folder the images go to, in the benchmark's layout (required); a rerun "
                                              "skips what is complete")
    model: str = field("uae", choices=("uae", "janus", "pipeline"),
                       help="whose generator: uae (--checkpoint in UAE's layout), janus (--checkpoint: Janus / "
                            "Janus-Pro in transformers' layout; its images are the checkpoint's size, 384 for "
                            "Janus-Pro, so --height / --width / --steps do not apply) or pipeline (--generator: a "
                            "diffusers text-to-image pipeline, e.g. one whose transformer stage 3 trained: "
                            "--generator_lora)")
    generator: str | None = field(None, help="--model pipeline: a diffusers text-to-image pipeline (hub id, folder, "
                                             "tiny: SD3, tiny-flux: FLUX)")
    generator_lora: str | None = field(None, help="--model pipeline: a LoRA of its transformer in diffusers' format (a "
                                                  "stage-3 run's final/generator_lora: train_grpo.py --stage u4g "
                                                  "--model pipeline), loaded as pipe.load_lora_weights loads it")
    checkpoint: str = field("tiny", help="uae: a folder in the official layout, a hub id (zhiyuanyan1/UAE), or 'tiny' "
                                         "for the embedded random checkpoint; janus: a Janus folder or hub id "
                                         "(deepseek-community/Janus-Pro-7B) or 'tiny'")
    lora: str | None = field(None, aliases=["--captioner_lora"],
                             help="--model janus: a LoRA trained by train_grpo.py --stage g4u --model janus (its "
                                  "final/captioner_lora); applied to the images when its run trained end to end "
                                  "(the run's manifest says so), else it changes nothing here")
    images_per_prompt: int = field(4, min=1, help="images per prompt (GenEval: samples/; DPG-Bench: tiled into one "
                                                  "png, at most 4, the evaluator's 2x2 grid)")
    attn_implementation: str = field("auto", help="auto (flash_attention_2 if installed and supported, else sdpa), "
                                                  "sdpa, eager")
    offload: bool = field(False, help="keep the models in CPU memory and bring each to the GPU only while it runs: "
                                      "for GPUs of 24 GB")

    def __post_init__(self):
        for name in ("benchmark", "prompts", "output_dir"):
            if not getattr(self, name):
                raise UAEError(f"--{name} is required (e.g. --benchmark geneval --prompts "
                               "geneval/prompts/evaluation_metadata.jsonl --output_dir out/geneval)")
        super().__post_init__()
        if self.model == "pipeline" and not self.generator:
            raise UAEError("--model pipeline: give --generator (a diffusers text-to-image pipeline: hub id, folder, "
                           "tiny or tiny-flux)")
        if self.model != "pipeline" and (self.generator or self.generator_lora):
            raise UAEError(f"--generator / --generator_lora: --model pipeline's; --model {self.model} generates with "
                           "--checkpoint (a UAE's trained decoder LoRA lives in its checkpoint: --checkpoint "
                           "<run>/final)")
        if self.lora and self.model != "janus":
            raise UAEError(f"--lora {self.lora}: a LoRA for --model janus; UAE's trained LoRAs live in its checkpoint "
                           "folder (--checkpoint <run>/final)")
        if self.benchmark == "dpg":
            if self.images_per_prompt > DPG_MAX_IMAGES:
                raise UAEError(f"--images_per_prompt {self.images_per_prompt}: DPG-Bench's evaluator reads at most "
                               f"{DPG_MAX_IMAGES} images per prompt (a 2x2 grid); use 1 to 4")
            if self.height != self.width:
                raise UAEError(f"--height {self.height} --width {self.width}: DPG-Bench's evaluator crops square cells "
                               "of its --resolution from the grid; give equal --height and --width")


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: `index` (its seed block), `key` (its output name: the GenEval folder
    <index:05d> or the DPG-Bench id), `prompt` (the text generated from), `record` (GenEval: the
    metadata line exactly as read, written to metadata.jsonl)."""

    index: int
    key: str
    prompt: str
    record: str | None = None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of every non-blank line; only "\\n" (and a "\\r" before it) ends a line,
    so a JSON string holding U+2028 or similar stays on its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UAEError(f"--prompts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _json_line(path: Path, n: int, line: str, expected: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UAEError(f"--prompts {path} line {n} is not JSON ({e.msg}, column {e.colno}): each line must be "
                       f"one JSON object {expected}") from None
    if not isinstance(rec, dict):
        raise UAEError(f"--prompts {path} line {n} is a JSON {type(rec).__name__}, not an object: each line must be "
                       f"one JSON object {expected}")
    return rec


def _text(path: Path, n: int, rec: dict, keys: tuple[str, ...], expected: str, number_ok: bool = False) -> str:
    """The first of `keys` in the record: a non-empty string (or, `number_ok`, an integer)."""
    for k in keys:
        if k in rec:
            value = rec[k]
            ok = isinstance(value, str) or (number_ok and isinstance(value, int) and not isinstance(value, bool))
            if not ok or not str(value).strip():
                raise UAEError(f"--prompts {path} line {n}: \"{k}\" must be a non-empty string; each line must be "
                               f"one JSON object {expected}")
            return str(value)
    raise UAEError(f"--prompts {path} line {n} has no {' or '.join(repr(k) for k in keys)} key; each line must be "
                   f"one JSON object {expected}")


def read_geneval(path: str | Path) -> list[Prompt]:
    """GenEval's evaluation_metadata.jsonl: one JSON object a line with a "prompt" (its "tag",
    "include", ... are the evaluator's business and travel on in metadata.jsonl, the line exactly)."""
    p = Path(path)
    expected = "with a \"prompt\" (GenEval's prompts/evaluation_metadata.jsonl)"
    if p.is_dir():
        raise UAEError(f"--prompts {p} is a folder: for GenEval give its prompts/evaluation_metadata.jsonl")
    if not p.is_file():
        raise UAEError(f"--prompts {p}: no such file (for GenEval give its prompts/evaluation_metadata.jsonl)")
    out = []
    for i, (n, line) in enumerate(_lines(p)):
        rec = _json_line(p, n, line, expected)
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UAEError(f"--prompts {p} line {n} has no \"prompt\" string; each line must be one JSON object "
                           f"{expected}")
        out.append(Prompt(i, f"{i:05d}", prompt, line))
    if not out:
        raise UAEError(f"--prompts {p} holds no prompts (for GenEval give its prompts/evaluation_metadata.jsonl)")
    return out


def _check_dpg_id(source: str, key: str) -> None:
    """compute_dpg_bench.py finds an image's questions by the file name up to its first '.'."""
    if not key or "." in key or "/" in key or "\\" in key or key.strip() != key:
        raise UAEError(f"{source}: DPG-Bench id {key!r} cannot name its image: the evaluator reads the id as the file "
                       "name up to its first '.'; use ids without '.', '/' or surrounding spaces")


def read_dpg(path: str | Path) -> list[Prompt]:
    """DPG-Bench prompts: its prompts/ folder of <id>.txt (the prompt is the file's text less
    trailing line breaks; prompts in sorted file-name order), or a .jsonl with one object a line,
    the id in "item_id" (dpg_bench.csv's name) or "id", the prompt in "text" (the csv's name) or
    "prompt" (prompts in line order)."""
    p = Path(path)
    out: list[Prompt] = []
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix == ".txt")
        if not files:
            raise UAEError(f"--prompts {p} holds no <id>.txt files (for DPG-Bench give ELLA's dpg_bench/prompts "
                           "folder, or a .jsonl)")
        for i, f in enumerate(files):
            _check_dpg_id(f"--prompts {f}", f.stem)
            try:
                prompt = f.read_text(encoding="utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UAEError(f"--prompts {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not prompt.strip():
                raise UAEError(f"--prompts {f} is empty: each <id>.txt holds its prompt")
            out.append(Prompt(i, f.stem, prompt))
        return out
    if not p.is_file():
        raise UAEError(f"--prompts {p}: no such file or folder (for DPG-Bench give ELLA's dpg_bench/prompts folder, "
                       "or a .jsonl)")
    if p.suffix != ".jsonl":
        raise UAEError(f"--prompts {p}: for DPG-Bench give a folder of <id>.txt files or a .jsonl file of "
                       "{\"item_id\": ..., \"text\": ...}")
    expected = "with \"item_id\" (or \"id\") and \"text\" (or \"prompt\")"
    seen: dict[str, int] = {}
    for i, (n, line) in enumerate(_lines(p)):
        rec = _json_line(p, n, line, expected)
        key = _text(p, n, rec, ("item_id", "id"), expected, number_ok=True)
        _check_dpg_id(f"--prompts {p} line {n}", key)
        if key in seen:
            raise UAEError(f"--prompts {p} line {n}: id {key!r} again (first on line {seen[key]}); ids name the "
                           "images and must be unique")
        seen[key] = n
        out.append(Prompt(i, key, _text(p, n, rec, ("text", "prompt"), expected)))
    if not out:
        raise UAEError(f"--prompts {p} holds no prompts")
    return out


def read_prompts(benchmark: str, path: str | Path) -> list[Prompt]:
    if benchmark not in BENCHMARKS:
        raise UAEError(f"--benchmark {benchmark}: choose from {', '.join(BENCHMARKS)}")
    return read_geneval(path) if benchmark == "geneval" else read_dpg(path)


def prompts_digest(prompts: list[Prompt]) -> str:
    """sha256 of what the run generates from: keys, prompts and GenEval's metadata lines, in order."""
    data = json.dumps([[p.key, p.prompt, p.record] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def image_seeds(cfg: GenBenchConfig, prompt: Prompt) -> list[int]:
    """The seed of each of the prompt's images (see SEED_POLICY)."""
    return [cfg.seed + prompt.index * cfg.images_per_prompt + k for k in range(cfg.images_per_prompt)]


# ----------------------------------------------------------------------------- layouts

def geneval_sample(out: Path, p: Prompt, k: int) -> Path:
    return out / p.key / "samples" / f"{k:05d}.png"


def dpg_image(out: Path, p: Prompt) -> Path:
    return out / f"{p.key}.png"


def images_to_make(cfg: GenBenchConfig, out: Path, p: Prompt) -> list[int] | None:
    """None when the prompt's output is complete, else the indices k of its images still to make
    (DPG-Bench: all or none, one tiled file; GenEval: the missing samples, possibly none when only
    metadata.jsonl, written last, is missing)."""
    if cfg.benchmark == "dpg":
        return None if dpg_image(out, p).is_file() else list(range(cfg.images_per_prompt))
    meta = out / p.key / "metadata.jsonl"
    if meta.is_file() and meta.read_text(encoding="utf-8") != p.record:
        raise UAEError(f"{meta} holds another prompt than prompt {p.index} (line {p.index + 1} of the non-blank "
                       f"lines) of --prompts: {out} holds another run's outputs; use a fresh --output_dir")
    missing = [k for k in range(cfg.images_per_prompt) if not geneval_sample(out, p, k).is_file()]
    return None if not missing and meta.is_file() else missing


def dpg_grid(images: list, width: int, height: int):
    """The images of one prompt where compute_dpg_bench.py crops them: image k in cell
    (k % 2, k // 2) of a grid of width x height cells, one row for up to 2 images; an empty cell
    (3 images) stays black."""
    from PIL import Image

    n = len(images)
    grid = Image.new("RGB", ((1 if n == 1 else 2) * width, (1 if n <= 2 else 2) * height))
    for k, im in enumerate(images):
        if im.size != (width, height):
            raise ValueError(f"image {k} is {im.size}, not {(width, height)}")
        grid.paste(im.convert("RGB"), ((k % 2) * width, (k // 2) * height))
    return grid


def write_outputs(cfg: GenBenchConfig, out: Path, p: Prompt, ks: list[int], images: list) -> None:
    if cfg.benchmark == "dpg":
        save_image(dpg_grid(images, cfg.width, cfg.height), dpg_image(out, p))
        return
    for k, im in zip(ks, images):
        save_image(im, geneval_sample(out, p, k))
    # Last: a folder with its metadata.jsonl is complete; the line exactly, no newline added (as
    # GenEval's generation/diffusers_generate.py writes it with json.dump).
    atomic_write_text(out / p.key / "metadata.jsonl", p.record)


def evaluator_command(cfg: GenBenchConfig) -> str:
    out = Path(cfg.output_dir).resolve()
    if cfg.benchmark == "geneval":
        return (f'python evaluation/evaluate_images.py "{out}" --outfile "<RESULTS>/results.jsonl" '
                '--model-path "<OBJECT_DETECTOR_FOLDER>" && python evaluation/summary_scores.py '
                '"<RESULTS>/results.jsonl"   # in a clone of djghosh13/geneval')
    return (f'PIC_NUM={cfg.images_per_prompt} bash dpg_bench/dist_eval.sh "{out}" {cfg.height}   '
            '# in a clone of TencentQQGYLab/ELLA')


# ----------------------------------------------------------------------------- the run

def settings(cfg: GenBenchConfig, prompts: list[Prompt]) -> dict:
    """What the images depend on (RESUME_KEYS) and everything else worth recording."""
    import diffusers
    import torch
    import transformers

    ckpt = Path(cfg.checkpoint)
    return {
        "benchmark": cfg.benchmark,
        "prompts": str(Path(cfg.prompts).resolve()),
        "prompts_sha256": prompts_digest(prompts),
        "num_prompts": len(prompts),
        "model": cfg.model,
        "checkpoint": str(ckpt.resolve()) if cfg.checkpoint != "tiny" and ckpt.exists() else cfg.checkpoint,
        "lora": str(Path(cfg.lora).resolve()) if cfg.lora else None,
        "generator": cfg.generator,
        "generator_lora": str(Path(cfg.generator_lora).resolve()) if cfg.generator_lora else None,
        "images_per_prompt": cfg.images_per_prompt,
        "seed": cfg.seed,
        "seed_policy": SEED_POLICY,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "height": cfg.height,
        "width": cfg.width,
        "dit_batching": cfg.dit_batching,
        "dtype": str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).removeprefix("torch."),
        "device_type": resolve_device(cfg.device).type,
        "evaluator": evaluator_command(cfg),
        "config": dataclasses.asdict(cfg),
        "versions": {"uae": uae.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }


def check_resumable(out: Path, current: dict) -> None:
    """An output folder made with other settings is not added to: its images would be mixed."""
    check_same_settings(out / MANIFEST, current, RESUME_KEYS)


def janus_settings(cfg: GenBenchConfig) -> GenBenchConfig:
    """--model janus: `tiny` resolved, and the image size the checkpoint fixes (the DPG grid's
    cells and the evaluator's --resolution), read from its config before any weights load."""
    checkpoint = resolve_model(cfg.checkpoint, "janus")
    side = janus_image_side(load_config(checkpoint, "--checkpoint", "a Janus checkpoint"))
    if (cfg.height, cfg.width) != (side, side):
        logger.info("janus: images are %dx%d (fixed by the checkpoint): --height / --width do not apply", side, side)
    return dataclasses.replace(cfg, checkpoint=checkpoint, height=side, width=side)


def load_generator(cfg: GenBenchConfig, device: str):
    """generate(texts, seeds) -> PIL images, image i from seeds[i] alone: UAE's, Janus's with --lora
    on the side(s) its run trained, or a diffusers pipeline's with --generator_lora (at the run's
    steps and guidance, each image its own CPU generator: uae.unified.pipeline)."""
    if cfg.model == "uae":
        model = UAE.from_pretrained(resolve_checkpoint(cfg.checkpoint), device=device, dtype=cfg.dtype,
                                    attn_implementation=cfg.attn_implementation, offload=cfg.offload)
        return lambda texts, seeds: model.generate(texts, seed=seeds, progress=False, **cfg.generate_kwargs())
    dev = resolve_device(device)
    settings = RunSettings(device=str(dev), dtype=str(resolve_dtype(cfg.dtype, dev)).removeprefix("torch."),
                           guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width)
    if cfg.model == "pipeline":  # the runner's adapter and LoRA loader: every LoRA tensor must find its place
        model = PipelineAdapter(None, cfg.generator, settings)
        if cfg.generator_lora:
            apply_generator_lora(model, cfg.generator_lora)
        return model.generate
    model = JanusAdapter(cfg.checkpoint, settings)
    if cfg.lora:
        apply_captioner_lora(model, cfg.lora)
    return model.generate


def run(cfg: GenBenchConfig) -> dict | None:
    """Generate every missing output. Under torchrun / `accelerate launch` the prompts are dealt out
    round-robin by rank (prompt i to process i % N), each process skipping what is complete; the
    images depend only on the prompt index and k, never on the split. Returns the manifest on the
    main process, None on the others."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    prompts = read_prompts(cfg.benchmark, cfg.prompts)  # every input checked before any model loads
    out = writable_dir(cfg.output_dir, "--output_dir")
    if cfg.model == "janus":
        cfg = janus_settings(cfg)
    if cfg.model == "pipeline":
        cfg = dataclasses.replace(cfg, generator=resolve_model(cfg.generator, "generator"))
    manifest = settings(cfg, prompts)
    check_resumable(out, manifest)
    state = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
    world, rank = state.num_processes, state.process_index
    if state.is_main_process:
        atomic_write_json(out / MANIFEST, {**manifest, "status": "running"})
    # Every process checks every prompt before any writes (a stale folder fails on all of them);
    # outputs appearing meanwhile are the other processes' own prompts, so the split is unaffected.
    todo = {p.key: images_to_make(cfg, out, p) for p in prompts}
    mine = [p for p in prompts[rank::world] if todo[p.key] is not None]
    logger.info("%s: %d prompt(s) x %d image(s), %d complete already; process %d/%d: %d prompt(s) to generate",
                cfg.benchmark, len(prompts), cfg.images_per_prompt, sum(v is None for v in todo.values()), rank,
                world, len(mine))
    if mine:
        generate = load_generator(cfg, str(state.device) if world > 1 else cfg.device)
        for p in tqdm(mine, desc=f"{cfg.benchmark} prompts" + (f" (process {rank})" if world > 1 else ""),
                      unit="prompt"):
            ks, seeds = todo[p.key], image_seeds(cfg, p)
            images = generate([p.prompt] * len(ks), [seeds[k] for k in ks]) if ks else []
            write_outputs(cfg, out, p, ks, images)
        del generate
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    left = [p.key for p in prompts if images_to_make(cfg, out, p) is not None]
    if left:  # another process failed without raising here; a rerun completes them
        raise UAEError(f"{len(left)} prompt(s) have no complete output in {out} (first: {left[0]}): rerun to "
                       "complete them")
    manifest["status"] = "complete"
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


@script_main
def main(argv: list[str] | None = None, description: str | None = None) -> int:
    cfg = parse_config(GenBenchConfig, argv, description=description or __doc__)
    setup_logging(cfg.log_level)
    manifest = run(cfg)
    if manifest is not None:
        logger.info("%s: %d prompt(s) x %d image(s) in %s; evaluate with: %s", cfg.benchmark, manifest["num_prompts"],
                    cfg.images_per_prompt, cfg.output_dir, manifest["evaluator"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
