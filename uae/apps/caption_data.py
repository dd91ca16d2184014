"""uae-caption-data (also `python -m uae.caption_data`): caption an image set into webdataset shards,
for decoder pre-training on long captions (docs/training-sft.md, "Making long-caption data").

    uae-caption-data --input photos/ --output_dir shards/ --captioner tiny
    uae-caption-data --input 'in/{000000..000009}.tar' --output_dir shards/ --captioner Qwen/Qwen2.5-VL-7B-Instruct
    uae-caption-data --input photos/ --output_dir shards/ --captioner openai:http://127.0.0.1:8000/v1 --remote_model M
    torchrun --nproc_per_node 8 -m uae.caption_data --input photos/ --output_dir shards/ --captioner uae:zhiyuanyan1/UAE
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from uae.caption_data import (CaptionSettings, Plan, RemoteCaptioner, UserCaptioner, caption_data, captioner_kind,
                              open_source, process_rank, transformers_captioner, uae_captioner)
from uae.cli import local_rank, script_main, setup_logging
from uae.config import check_fields, field, parse_config, read_yaml
from uae.errors import UAEError
from uae.files import writable_dir
from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION
from uae.paths import CONFIG_DIR
from uae.runtime import resolve_device, resolve_dtype

logger = logging.getLogger("uae.caption_data")

DEFAULT_INSTRUCTION_CONFIG = CONFIG_DIR / "data" / "longcap.yaml"


@dataclass
class CaptionDataConfig:
    """Caption an image set into webdataset shards (image bytes as given, .txt caption, .json record)."""

    input: str = field(help="a folder of images (searched recursively), a dataset saved with save_to_disk, "
                            "webdataset tar shards or parquet files (brace patterns {000000..000009} and globs)")
    output_dir: str = field(help="folder of the shards NNNNNN.tar, manifest.json, stats/ (a rerun resumes it)")
    captioner: str = field(help="uae:CHECKPOINT (UAE's encoder; uae:tiny), a transformers image-text-to-text model "
                                "(hub id, folder, or tiny), openai:http://HOST:PORT/v1 (an OpenAI-compatible "
                                "server, with --remote_model), or module:Class (a class of yours)")
    instruction: str = field("longcap", help="the caption instruction: longcap (ours, in configs/data/longcap.yaml: "
                                             "a detailed caption of 250+ words), release (UAE's own), or the text")
    image_column: str = field("image", help="the image column of a dataset or parquet --input")
    shard_size: int = field(1000, min=1, help="unique images per output shard")
    max_new_tokens: int = field(1024, min=1, help="caption length limit in tokens (a caption that reaches it is "
                                                  "flagged truncated)")
    temperature: float = field(0.7, min=0, help="caption sampling temperature")
    do_sample: bool = field(True, help="sample captions (false: greedy decoding)")
    seed: int = field(0, help="sample n (the n-th unique image) is captioned with seed + n")
    min_words: int = field(0, min=0, help="skip captions with fewer words (counted)")
    drop_truncated: bool = field(False, help="skip captions that reached --max_new_tokens (else kept, flagged)")
    dedupe: bool = field(True, help="skip exact duplicate images (same bytes), counted")
    max_bad_fraction: float = field(0.01, min=0, max=1, run_only=True,
                                    help="stop with an error when more than this share of a process's images are "
                                         "not decodable or get an empty caption (fewer are skipped and counted)")
    remote_model: str | None = field(None, help="the served model's name (openai: captioner; default: the server's "
                                                "only model)")
    remote_concurrency: int = field(8, min=1, run_only=True, help="requests in flight (openai: captioner)")
    remote_timeout_s: float = field(300.0, min=0, run_only=True, help="seconds a request may take")
    remote_retries: int = field(3, min=0, run_only=True, help="retries of a failed request, with exponential backoff")
    remote_backoff_s: float = field(1.0, min=0, run_only=True, help="first retry's wait; doubled each retry")
    remote_max_side: int | None = field(None, min=1, help="downscale images sent to a server to this longest side "
                                                          "(default: as they are)")
    device: str = field("auto", run_only=True, help="auto (GPU if present), cpu, cuda, cuda:N")
    dtype: str = field("auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="model precision (auto: bf16 on GPU, fp32 on CPU)")
    progress: bool = field(True, run_only=True, help="show the progress bar (images/s, ETA)")
    log_level: str = field("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), run_only=True, help="logging level")

    def __post_init__(self):
        check_fields(self)
        kind = captioner_kind(self.captioner)
        if self.remote_model and kind != "openai":
            raise UAEError(f"--remote_model applies to an openai: captioner, not --captioner {self.captioner}")


def instruction_text(value: str) -> str:
    """--instruction: a name (longcap, release) or the text itself."""
    if value == "release":
        return RELEASE_CAPTION_INSTRUCTION
    if value == "longcap":
        text = read_yaml(str(DEFAULT_INSTRUCTION_CONFIG)).get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise UAEError(f"{DEFAULT_INSTRUCTION_CONFIG} has no instruction: text")
        return text
    if not value.strip():
        raise UAEError("--instruction is empty: give longcap, release, or the text")
    return value


def make_captioner(cfg: CaptionDataConfig, cs: CaptionSettings):
    kind = captioner_kind(cfg.captioner)
    if kind == "uae":
        return uae_captioner(cfg.captioner.removeprefix("uae:"), cs)
    if kind == "openai":
        return RemoteCaptioner(cfg.captioner.removeprefix("openai:"), cfg.remote_model, cs,
                               concurrency=cfg.remote_concurrency, timeout_s=cfg.remote_timeout_s,
                               retries=cfg.remote_retries, backoff_s=cfg.remote_backoff_s, max_side=cfg.remote_max_side)
    if kind == "module":
        return UserCaptioner(cfg.captioner, cs)
    return transformers_captioner(cfg.captioner, cs)


def run(cfg: CaptionDataConfig) -> int:
    out = writable_dir(cfg.output_dir, "--output_dir")
    rank, world = process_rank()
    source = open_source(cfg.input, cfg.image_column)
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    cs = CaptionSettings(instruction_text(cfg.instruction), cfg.max_new_tokens, cfg.temperature, cfg.do_sample,
                         str(device), dtype)
    plan = Plan(out, cfg.shard_size, cfg.seed, cfg.min_words, cfg.drop_truncated, cfg.dedupe, cfg.max_bad_fraction,
                rank, world, progress=cfg.progress and local_rank() == 0)
    spec = "openai" if cfg.captioner.startswith("openai:") else cfg.captioner  # a server's address may change
    settings = {"captioner_spec": spec, "remote_model": cfg.remote_model, "instruction": cs.instruction,
                "max_new_tokens": cs.max_new_tokens, "temperature": cs.temperature, "do_sample": cs.do_sample,
                "dtype": dtype, "image_column": cfg.image_column, "remote_max_side": cfg.remote_max_side}
    s = caption_data(source, lambda: make_captioner(cfg, cs), plan, settings)
    c = s.counts
    rate = s.captioned / s.seconds if s.seconds else 0.0
    logger.info("%s: %d input(s), %d unique, %d duplicate(s), %d without an image; %d shard(s) in all, this process "
                "(rank %d of %d) wrote %d and found %d complete; its samples: %d, not decodable %d, empty captions %d, "
                "under --min_words %d, truncated %d (dropped %d); %d caption(s) in %.1f s (%.2f images/s)",
                out, s.inputs, s.unique, s.duplicates, s.non_image, s.shards, rank, world, s.written, s.skipped,
                c["samples"], c["corrupt"], c["empty"], c["short"], c["truncated"], c["dropped_truncated"],
                s.captioned, s.seconds, rate)
    return 0


@script_main
def main(argv=None, description: str | None = None) -> int:
    cfg = parse_config(CaptionDataConfig, argv, description=description or __doc__, prog="uae-caption-data")
    setup_logging(cfg.log_level)
    return run(cfg)
