"""demo.py: text -> image, image -> caption, image -> caption -> image, one at a time or in batches
(the command line is `DemoConfig`; docs/demo.md)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from uae.apps.settings import InferenceConfig
from uae.cli import script_main, setup_logging
from uae.config import field, parse_config, save_config
from uae.errors import UAEError
from uae.files import atomic_write_text, writable_dir, writable_file
from uae.images import list_images, open_image, save_image
from uae.models.uae import UAE
from uae.random_weights import resolve_checkpoint

logger = logging.getLogger("uae.apps.demo")


@dataclass
class DemoConfig(InferenceConfig):
    """UAE demo: text-to-image, captioning and reconstruction (docs/demo.md)."""

    input_text: str | None = field(None, help="prompt to generate one image from")
    input_img: str | None = field(None, help="image to caption (or reconstruct), or a folder of images")
    prompt_file: str | None = field(None, help="batch text-to-image: a .txt file (one prompt a line) or "
                                               ".jsonl file (one {\"prompt\": ...} a line)")
    prompt_only: bool = field(False, help="with --input_img: only caption, do not regenerate the image")
    output_path: str = field("output/generated_image.png", help="image written for --input_text / a single --input_img")
    output_dir: str = field("output/demo", help="folder written in batch mode (--prompt_file or a folder --input_img)")
    checkpoint: str = field("tiny", help="folder in the official layout, a hub id (zhiyuanyan1/UAE), or "
                                         "'tiny' for the embedded random checkpoint")
    sd3: str | None = field(None, help="override: SD3 pipeline folder or hub id (VAE, scheduler, CLIP encoders)")
    dit: str | None = field(None, help="override: DiT (SD3Transformer2DModel) folder")
    dit_lora: str | None = field(None, help="override: DiT PEFT adapter folder, or 'none'")
    llm: str | None = field(None, help="override: Qwen2.5-VL + projector folder")
    llm_lora: str | None = field(None, help="override: LLM LoRA folder (three shards), or 'none'")
    llm_processor: str | None = field(None, help="override: Qwen2.5-VL processor folder or hub id")
    batch_size: int = field(1, min=1, help="images or prompts processed together in batch mode (images and captions "
                                           "are the same at any batch size unless --dit_batching / --caption_batching)")
    offload: bool = field(False, help="keep the models in CPU memory and bring each to the GPU only while it runs "
                                      "(the LLM, then the DiT, then the VAE): for GPUs of 24 GB")
    attn_implementation: str = field("auto", help="auto (flash_attention_2 if installed and supported, else sdpa), sdpa, eager")

    def __post_init__(self):
        given = [n for n in ("input_text", "input_img", "prompt_file") if getattr(self, n)]
        if len(given) != 1:
            what = "none" if not given else " and ".join("--" + g for g in given)
            raise UAEError(f"give exactly one of --input_text, --input_img, --prompt_file (got {what})")
        if self.prompt_only and not self.input_img:
            raise UAEError("--prompt_only needs --input_img (it captions an image)")
        super().__post_init__()
        self.check_sd3_size()

    @property
    def overrides(self) -> dict[str, str | None]:
        return {"SD3": self.sd3, "dit": self.dit, "dit_lora": self.dit_lora, "llm": self.llm,
                "llm_lora": self.llm_lora, "llm_processor": self.llm_processor}


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UAEError(f"--prompt_file {path}: no such file")
    prompts = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                rec = json.loads(line)
                prompts.append(str(rec["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UAEError(f"--prompt_file {path} line {i}: expected a JSON object with a \"prompt\" key") from None
        else:
            prompts.append(line.strip())
    if not prompts:
        raise UAEError(f"--prompt_file {path} holds no prompts")
    return prompts


def _batches(items: list, size: int, bar):
    """(start, items) of each batch; `bar` (tqdm) advanced by a batch's items once it is done: the
    bar counts images or prompts, whatever the batch size. The bar is closed when the loop ends,
    however it ends (an error is then the last line, not a redrawn bar)."""
    with bar:
        for i in range(0, len(items), size):
            yield i, items[i:i + size]
            bar.update(len(items[i:i + size]))


@script_main
def main(argv: list[str] | None = None, description: str | None = None) -> int:
    cfg = parse_config(DemoConfig, argv, description=description or __doc__)
    setup_logging(cfg.log_level)
    from tqdm.auto import tqdm

    # Read and check every input, and where the outputs go, before loading any model.
    batch_mode = bool(cfg.prompt_file) or (cfg.input_img and Path(cfg.input_img).is_dir())
    if batch_mode:
        writable_dir(cfg.output_dir, "--output_dir")
    elif not cfg.prompt_only:
        writable_file(cfg.output_path, "--output_path")
    image_paths: list[Path] = []
    prompts: list[str] = []
    if cfg.input_img:
        image_paths = list_images(cfg.input_img) if Path(cfg.input_img).is_dir() else [Path(cfg.input_img)]
        images = [open_image(p, exif_transpose=cfg.exif_transpose) for p in image_paths]
    elif cfg.prompt_file:
        prompts = read_prompts(cfg.prompt_file)
    else:
        prompts = [cfg.input_text]

    model = UAE.from_pretrained(resolve_checkpoint(cfg.checkpoint), overrides=cfg.overrides, load_decoder=not cfg.prompt_only,
                                device=cfg.device, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                                offload=cfg.offload)
    gen_kwargs, cap_kwargs = cfg.generate_kwargs(), cfg.caption_kwargs()
    out_dir = Path(cfg.output_dir)

    def seeds(start: int, n: int) -> list[int]:
        return cfg.seeds(range(start, start + n))

    if cfg.input_img:
        records = []
        for start, chunk in _batches(images, cfg.batch_size,
                                     tqdm(total=len(images), desc="images", unit="image", disable=not batch_mode)):
            caps = model.caption(chunk, seed=seeds(start, len(chunk)), progress=True, **cap_kwargs)
            recons = [None] * len(chunk) if cfg.prompt_only else \
                model.generate(caps, seed=seeds(start, len(chunk)), progress=not batch_mode, **gen_kwargs)
            for j, (cap, recon) in enumerate(zip(caps, recons)):
                src = image_paths[start + j]
                if batch_mode:
                    atomic_write_text(out_dir / f"{src.stem}.txt", cap)
                    rec = {"image": str(src), "caption": cap}
                    if recon is not None:
                        save_image(recon, out_dir / f"{src.stem}.png")
                        rec["reconstruction"] = str(out_dir / f"{src.stem}.png")
                    records.append(rec)
                else:
                    sys.stdout.write(cap + "\n")
                    if recon is not None:
                        save_image(recon, Path(cfg.output_path))
                        atomic_write_text(Path(cfg.output_path).with_suffix(".txt"), cap)
                        logger.info("wrote %s (caption beside it, .txt)", cfg.output_path)
        if batch_mode:
            atomic_write_text(out_dir / "captions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            save_config(cfg, out_dir / "demo_config.yaml")
            logger.info("wrote %d caption(s)%s to %s", len(records),
                        "" if cfg.prompt_only else " and reconstruction(s)", out_dir)
        return 0

    written = []
    for start, chunk in _batches(prompts, cfg.batch_size,
                                 tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=not batch_mode)):
        for j, image in enumerate(model.generate(chunk, seed=seeds(start, len(chunk)), progress=not batch_mode,
                                                 **gen_kwargs)):
            path = out_dir / f"{start + j:05d}.png" if batch_mode else Path(cfg.output_path)
            save_image(image, path)
            written.append({"prompt": chunk[j], "image": str(path)})
    if batch_mode:
        atomic_write_text(out_dir / "prompts.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written))
        save_config(cfg, out_dir / "demo_config.yaml")
        logger.info("wrote %d image(s) to %s", len(written), out_dir)
    else:
        logger.info("wrote %s", cfg.output_path)
    return 0


