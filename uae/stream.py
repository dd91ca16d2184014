"""Webdataset shards, streamed: training reads them sample by sample through the `webdataset`
library, never materialised, in memory flat in the number of samples.

A source is a brace pattern (`shards/{000000..000123}.tar`), a glob, one `.tar` or a folder of
them. A sample is the members of one key: its image is any member whose extension is an image's
(jpg, jpeg, png, webp, ...; one shard may mix them), its caption the `.txt` member or the
`"caption"` of the `.json` member (the layout `uae-caption-data` writes).

The stream is split by shard across every data-loading worker of every process (node x rank x
DataLoader worker: part `rank * workers + worker` of `world * workers`); each part reads, per
epoch, its slice of a permutation of the shards seeded by (seed, epoch), through a shuffle buffer
seeded by (seed, epoch, part), and cuts what it reads into batches of one aspect bucket. So a
part's batches are a pure function of (seed, world, workers, the shards): a run resumed at step k
reads its parts again from the start and drops the batches steps 0..k-1 consumed, and goes on
exactly as the uninterrupted run did, with no saved data state (the cost: see `ShardStream`).

Bad samples (an image that does not decode, an empty caption, no image member) are skipped and
counted as they stream, per part; a part whose share of bad samples passes `max_bad_fraction`
(once it has seen `bad_check_after` samples) stops the run with one line that names the data,
the counts and the setting.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds

from uae.errors import UAEError
from uae.images import IMAGE_EXTENSIONS, to_rgb

logger = logging.getLogger(__name__)

IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
# The defaults of the bad-sample threshold (SFTConfig's max_bad_fraction and bad_check_after;
# the GRPO stages' references use them as they are).
MAX_BAD_FRACTION = 0.01
BAD_CHECK_AFTER = 1000
PROBLEMS = ("undecodable image", "empty caption", "no image member")


def is_shards(source: str | Path) -> bool:
    """Whether a data source names webdataset shards: a brace pattern or glob, a .tar file, or a
    folder that holds .tar files (and is not a `datasets` folder)."""
    s = str(source)
    if any(ch in s for ch in "{*?["):
        return True
    p = Path(s)
    if p.is_file():
        return p.suffix == ".tar"
    return p.is_dir() and not (p / "dataset_info.json").exists() and not (p / "state.json").exists() \
        and any(p.glob("*.tar"))


def shard_files(source: str | Path, setting: str = "--data") -> list[str]:
    """The shard files of a source (module docstring), sorted; braces expand as webdataset does."""
    s = str(source)
    if Path(s).is_dir():
        files = sorted(str(p) for p in Path(s).glob("*.tar"))
    else:
        files = sorted({f for url in wds.shardlists.expand_urls(s) for f in glob.glob(url)})
    if not files:
        raise UAEError(f"{setting} {source}: no webdataset shard (.tar) matches; give a brace pattern "
                       "('shards/{000000..000009}.tar'), a glob, a .tar file or a folder of them")
    return files


def decode_image(data: bytes):
    """Image bytes -> 8-bit RGB PIL, with uae.images.load_image's conversions (EXIF orientation,
    palettes, alpha on white, 16-bit); raises whatever PIL raises on a bad image."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


@dataclass
class Decoded:
    """One sample of a shard, decoded; `problem` (one of PROBLEMS) when it cannot be used."""

    key: str
    image: object = None       # PIL RGB
    caption: str | None = None
    problem: str | None = None
    detail: str = ""


def caption_of(sample: dict) -> str | None:
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace")
    if "json" in sample:
        try:
            return (json.loads(sample["json"]) or {}).get("caption")
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def image_member(sample: dict) -> str | None:
    """The first (by name) member of a raw sample whose extension is an image's."""
    return next((k for k in sorted(sample) if k.rsplit(".", 1)[-1].lower() in IMAGE_KEYS), None)


def sample_name(sample: dict) -> str:
    return f"{Path(sample.get('__url__', '')).name}:{sample.get('__key__', '?')}"


def decode_sample(sample: dict, need_caption: bool = True) -> Decoded:
    """A raw webdataset sample (member extension -> bytes) decoded: the first image member, the
    caption (module docstring); an empty caption is a problem when `need_caption`."""
    key = sample_name(sample)
    image_key = image_member(sample)
    if image_key is None:
        members = ", ".join(k for k in sorted(sample) if not k.startswith("__")) or "none"
        return Decoded(key, problem="no image member", detail=f"members: {members}")
    caption = caption_of(sample)
    if need_caption and not (caption or "").strip():
        return Decoded(key, problem="empty caption")
    from PIL import UnidentifiedImageError

    try:
        image = decode_image(sample[image_key])
    except UnidentifiedImageError:
        return Decoded(key, problem="undecodable image", detail=f"{image_key}: not an image PIL can read")
    except Exception as e:  # PIL raises many types on a corrupt file; the sample is counted, never fatal
        return Decoded(key, problem="undecodable image", detail=f"{image_key}: {type(e).__name__}: {e}")
    return Decoded(key, image, caption)


def raw_samples(shards: list[str]) -> Iterator[dict]:
    """The samples of these shards, in order, through the webdataset library; a tar that cannot be
    read is an error naming it (a truncated shard is not a bad sample but a bad file)."""
    def fail(exn):  # webdataset appends the shard's url to the exception's args
        reason = getattr(exn, "strerror", None) or (exn.args[0] if exn.args else type(exn).__name__)
        raise UAEError(f"webdataset shard {exn.args[-1] if exn.args else '?'} cannot be read ({reason}): "
                       "rewrite or remove it") from None
    return iter(wds.tarfile_to_samples(handler=fail)([{"url": s} for s in shards]))


@dataclass
class BadCounter:
    """Bad samples of one stream, counted as they pass; `error` is the message once their share
    passes `max_fraction` after `check_after` samples were seen."""

    source: str
    max_fraction: float = MAX_BAD_FRACTION
    check_after: int = BAD_CHECK_AFTER
    fix: str = "fix or drop those samples, or raise --max_bad_fraction"
    seen: int = 0
    counts: dict = field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    examples: list = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def add(self, d: Decoded) -> None:
        self.seen += 1
        if d.problem:
            self.counts[d.problem] += 1
            if len(self.examples) < 3:
                self.examples.append(f"{d.key} ({d.problem}{': ' + d.detail if d.detail else ''})")
            logger.debug("skipping %s: %s %s", d.key, d.problem, d.detail)

    def summary(self) -> str:
        parts = ", ".join(f"{n} {what}" for what, n in self.counts.items() if n) or "none"
        return f"{self.bad} bad of {self.seen} sample(s) seen ({parts})"

    def error(self) -> str | None:
        """The one-line error once the share of bad samples passes the threshold, else None."""
        if self.seen < self.check_after or self.bad <= self.max_fraction * self.seen:
            return None
        return (f"{self.source}: {self.summary()}, a share over {self.max_fraction:g} "
                f"(e.g. {'; '.join(self.examples)}): {self.fix}")


def epoch_shards(shards: list[str], seed: int, epoch: int, part: int, parts: int) -> list[str]:
    """Part `part`'s shards in epoch `epoch`: its slice of a permutation seeded by (seed, epoch)."""
    order = list(shards)
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)  # str seeds hash the same in every process
    return order[part::parts]


def part_samples(shards: list[str], seed: int, part: int, parts: int, shuffle_buffer: int,
                 epochs: int | None = None) -> Iterator[tuple[int, dict]]:
    """(epoch, raw sample) of one part, epoch after epoch (forever when `epochs` is None): its
    shards through a shuffle buffer of `shuffle_buffer` samples seeded by (seed, epoch, part),
    filled before the first sample leaves (webdataset's `shuffle`)."""
    for epoch in itertools.count() if epochs is None else range(epochs):
        mine = epoch_shards(shards, seed, epoch, part, parts)
        src = raw_samples(mine)
        if shuffle_buffer > 1:
            rng = random.Random(f"{seed}-{epoch}-{part}")
            src = wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=rng)(src)
        n = 0
        for n, sample in enumerate(src, 1):
            yield epoch, sample
        if not n:  # an endless stream would wait forever
            raise UAEError(f"webdataset shards {', '.join(Path(s).name for s in mine[:3])}: no sample in them")


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The (height, width) bucket of the closest aspect ratio (in log space)."""
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(height / width)))


class ShardStream(torch.utils.data.IterableDataset):
    """Batches of webdataset shards for training: {"pixels": (B, 3, H, W) in [-1, 1], "caption":
    [str], "bad": [seen, bad]} of one aspect bucket (or one square size), per process, with
    DataLoader(batch_size=None). Every worker of every process reads its own part of the shards
    (module docstring), forever, epoch after epoch; the DataLoader takes the workers' batches in
    turn, so micro-step m of a process is batch m // workers of worker m % workers.

    Resume: `skip` is the number of micro-steps this process has done; each worker drops its
    share of them. A dropped batch costs reading and decoding its images (to find bad samples and
    aspect buckets, as the run did), not resizing them: at resume, about the decode time of
    `skip * batch_size` images per process, spread over its workers. Resuming needs the same
    seed, shards, process count, batch size, buckets and `dataloader_num_workers`.

    A part's error (its bad samples past the threshold, or no usable sample in an epoch) arrives
    as {"error": message} for the training process to raise: an exception raised in a worker
    would reach the user wrapped in the worker's traceback."""

    def __init__(self, shards: list[str], source: str, *, batch_size: int, buckets: list[tuple[int, int]],
                 pixels: Callable, seed: int, rank: int = 0, world: int = 1, skip: int = 0,
                 shuffle_buffer: int = 1000, max_bad_fraction: float = MAX_BAD_FRACTION,
                 bad_check_after: int = BAD_CHECK_AFTER):
        self.shards, self.source, self.batch_size, self.buckets = shards, source, batch_size, buckets
        self.pixels, self.seed, self.rank, self.world, self.skip = pixels, seed, rank, world, skip
        self.shuffle_buffer, self.max_bad_fraction, self.bad_check_after = shuffle_buffer, max_bad_fraction, bad_check_after

    def check_parts(self, workers: int) -> None:
        parts = self.world * max(workers, 1)
        if len(self.shards) < parts:
            raise UAEError(f"data {self.source}: {len(self.shards)} shard(s) for {self.world} process(es) x "
                           f"{max(workers, 1)} dataloader worker(s): each reads whole shards, so give at least "
                           f"{parts} shards (write smaller ones) or lower --dataloader_num_workers")

    def part_batches(self, part: int, parts: int) -> Iterator[tuple[list[Decoded], tuple[int, int], BadCounter]]:
        """(samples, bucket, counter) of one part, forever; {"error"}-worthy conditions raise UAEError."""
        counter = BadCounter(f"data {self.source}", self.max_bad_fraction, self.bad_check_after)
        pending: dict[tuple[int, int], list[Decoded]] = {}
        epoch, usable = 0, 0
        for e, sample in part_samples(self.shards, self.seed, part, parts, self.shuffle_buffer):
            if e != epoch:
                if not usable:
                    raise UAEError(f"data {self.source}: no usable sample in the shards of part {part} of {parts} "
                                   f"({counter.summary()}): fix the shards")
                epoch, usable = e, 0
            d = decode_sample(sample)
            counter.add(d)
            message = counter.error()
            if message:
                raise UAEError(message)
            if d.problem:
                continue
            usable += 1
            bucket = nearest_bucket(self.buckets, *d.image.size)
            group = pending.setdefault(bucket, [])
            group.append(d)
            if len(group) == self.batch_size:
                yield group, bucket, counter
                pending[bucket] = []

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks its workers in turn from worker 0 on: after `skip` micro-steps, its
        # worker w serves micro-steps skip + w, skip + w + workers, ..., those of part (skip + w) % workers.
        logical = (worker + self.skip) % workers
        part, parts = self.rank * workers + logical, self.world * workers
        skip = len(range(logical, self.skip, workers))  # this part's batches among the first `skip`
        try:
            for n, (group, bucket, counter) in enumerate(self.part_batches(part, parts)):
                if n < skip:
                    continue
                yield {"pixels": torch.stack([self.pixels(d.image, *bucket) for d in group]),
                       "caption": [d.caption.strip() for d in group], "bad": [counter.seen, counter.bad]}
        except UAEError as e:
            yield {"error": str(e)}
