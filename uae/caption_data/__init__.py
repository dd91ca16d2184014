"""Long-caption data: caption an image set into webdataset shards (`uae-caption-data`).

The paper pre-trains its decoder on LongCap-700k (images with captions over 250 words, written by a
large VLM) and did not release it; this makes such data from any image set with any captioner.

Order, keys and seeds. The inputs are read in one deterministic order (a folder tree by relative
path, tar shards in the order given and each in its member order, a dataset by row). Exact
duplicates (same bytes, SHA-256) are skipped; the n-th unique image gets the key `%09d` % n and the
seed `seed + n`, and belongs to output shard n // shard_size. Shard k is written by process
k % world_size (RANK / WORLD_SIZE, as torchrun and `accelerate launch` set them): no coordination
service, and 1 or N processes write the same samples. Every process reads every input once (bytes
only, to number the unique images); it decodes and captions only its own shards' images.

Resume. A shard is written to a hidden temporary file and renamed when complete, so `DIR/NNNNNN.tar`
is always whole; a rerun skips the shards that exist and redoes the others. Captions of an
unfinished shard are appended to `DIR/partial/NNNNNN.jsonl` as they arrive, so a redo (after a
SIGKILL, or a server that went down) captions only what is missing. `DIR/manifest.json` records
the inputs and every setting a caption depends on: a rerun into the same folder with other inputs
or settings is refused.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import inspect
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from tqdm import tqdm

from uae.errors import UAEError
from uae.files import atomic_write_json, check_same_settings
from uae.hashing import fingerprint
from uae.images import IMAGE_EXTENSIONS, to_rgb
from uae.models.uae import UAE
from uae.random_weights.embedded import resolve_checkpoint
from uae.random_weights.unified import resolve
from uae.remote import ChatClient, Completion, RemoteError, image_part, text_part
from uae.unified.captioner import TransformersCaptioner
from uae.unified.loading import import_class
from uae.unified.protocol import RunSettings

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PARTIAL = "partial"   # journals of captions of unfinished shards
STATS = "stats"       # per-shard counts, written just before the shard is renamed into place
KEY_DIGITS = 9
SHARD_DIGITS = 6
PIL_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class Item:
    """One input: its source key, its bytes and extension; `data` None for a sample without an image."""

    source: str
    data: bytes | None
    ext: str = ""


class Source(Protocol):
    def describe(self) -> dict:
        """What the outputs depend on: the kind, the spec and a fingerprint of the listing."""

    def count(self) -> int | None:
        """How many items, when known without reading them."""

    def items(self) -> Iterator[Item]:
        """Every item, in the one deterministic order."""


class FolderSource:
    """Every image file under a folder (recursively), ordered by relative path."""

    def __init__(self, folder: Path):
        self.root = folder
        self.files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                            key=lambda p: p.relative_to(folder).as_posix())
        if not self.files:
            raise UAEError(f"--input {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)}), in any sub-folder")

    def describe(self) -> dict:
        listing = [(p.relative_to(self.root).as_posix(), p.stat().st_size) for p in self.files]
        return {"kind": "folder", "path": str(self.root.resolve()), "files": len(listing),
                "listing": fingerprint(listing)}

    def count(self) -> int:
        return len(self.files)

    def items(self) -> Iterator[Item]:
        for p in self.files:
            yield Item(p.relative_to(self.root).as_posix(), p.read_bytes(), p.suffix.lower())


def expand_shards(pattern: str) -> list[Path]:
    """Tar files from brace patterns (`{000000..000009}`, `{a,b}`) and globs, in the order the
    braces give them (each glob sorted); every expansion must name at least one file."""
    from braceexpand import braceexpand

    out: list[Path] = []
    for part in braceexpand(pattern):
        found = sorted(glob.glob(part)) if glob.has_magic(part) else [part] if Path(part).is_file() else []
        if not found:
            raise UAEError(f"--input {pattern}: no file matches {part}")
        out += [Path(f) for f in found]
    return out


class TarSource:
    """Webdataset shards: each sample (members sharing a key: the name up to the first dot of its
    base name) gives its first image member; a sample without one is skipped and counted."""

    def __init__(self, pattern: str):
        self.pattern, self.tars = pattern, expand_shards(pattern)

    def describe(self) -> dict:
        listing = [(str(p.resolve()), p.stat().st_size) for p in self.tars]
        return {"kind": "webdataset", "pattern": self.pattern, "tars": len(listing), "listing": fingerprint(listing)}

    def count(self) -> None:
        return None

    def items(self) -> Iterator[Item]:
        for tar in self.tars:
            try:
                with tarfile.open(tar, "r:*") as tf:
                    yield from self._samples(tar, tf)
            except tarfile.TarError as e:
                raise UAEError(f"--input {tar} is not a readable tar file ({e})") from None

    @staticmethod
    def _samples(tar: Path, tf: tarfile.TarFile) -> Iterator[Item]:
        key, members = None, []
        for m in [*tf, None]:
            k = None if m is None else wds_key(m.name)
            if members and k != key:
                image = next((x for x in members if Path(x.name).suffix.lower() in IMAGE_EXTENSIONS), None)
                source = f"{tar.name}:{key}"
                if image is None:
                    yield Item(source, None)
                else:
                    yield Item(source, tf.extractfile(image).read(), Path(image.name).suffix.lower())
                members = []
            if m is not None and m.isfile():
                key = k
                members.append(m)


def wds_key(name: str) -> str:
    """webdataset's sample key of a member: its path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


class DatasetSource:
    """A Hugging Face dataset saved with save_to_disk, or parquet files: the `column` of images
    (image features or raw bytes), ordered by row."""

    def __init__(self, spec: str, column: str):
        import datasets

        self.spec, self.column = spec, column
        try:
            if Path(spec).is_dir():
                ds = datasets.load_from_disk(spec)
            else:
                files = [str(p) for p in expand_shards(spec)]
                ds = datasets.Dataset.from_parquet(files)
        except UAEError:
            raise
        except Exception as e:
            raise UAEError(f"--input {spec}: not a dataset datasets can read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise UAEError(f"--input {spec} holds the splits {', '.join(ds)}: give one split's folder")
            ds = next(iter(ds.values()))
        if column not in ds.column_names:
            raise UAEError(f"--image_column {column}: --input {spec} has the columns {', '.join(ds.column_names)}")
        if isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        self.ds = ds

    def describe(self) -> dict:
        return {"kind": "dataset", "spec": self.spec, "column": self.column, "rows": len(self.ds),
                "listing": self.ds._fingerprint}

    def count(self) -> int:
        return len(self.ds)

    def items(self) -> Iterator[Item]:
        for i, value in enumerate(self.ds[self.column]):
            data, name = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
            if data is None and name and Path(name).is_file():
                data = Path(name).read_bytes()
            if not isinstance(data, (bytes, bytearray)):
                yield Item(f"row {i}", None)
                continue
            ext = Path(name).suffix.lower() if name and Path(name).suffix.lower() in IMAGE_EXTENSIONS else ""
            yield Item(f"row {i}", bytes(data), ext)


def open_source(spec: str, image_column: str = "image") -> Source:
    """The input named by --input: a folder of images, a dataset folder (save_to_disk), tar shards
    or parquet files (brace patterns and globs)."""
    p = Path(spec)
    if p.is_dir():
        if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return DatasetSource(spec, image_column)
        return FolderSource(p)
    if spec.endswith((".tar", ".tar}", ".tgz", ".tar.gz")) or ".tar" in Path(spec).name:
        return TarSource(spec)
    if ".parquet" in Path(spec).name:
        return DatasetSource(spec, image_column)
    if not p.exists() and not glob.has_magic(spec) and "{" not in spec:
        raise UAEError(f"--input {spec}: no such file or folder")
    raise UAEError(f"--input {spec}: expected a folder of images, a dataset folder (save_to_disk), tar shards "
                   "(.tar, brace patterns and globs) or parquet files")


def decode(data: bytes):
    """(RGB image, PIL format) of image bytes, or (None, why) for bytes PIL cannot decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            im.load()
            return to_rgb(im.copy()), im.format
    except UnidentifiedImageError:
        return None, "not a format PIL can identify"
    except Exception as e:  # any other decoder failure: truncated data, decompression bombs
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ----------------------------------------------------------------------------------------- captioners
@dataclass
class Caption:
    """A caption and what the captioner knows of it: its token count and whether it stopped at the
    token limit (None: the captioner cannot tell)."""

    text: str
    tokens: int | None = None
    truncated: bool | None = None


class Captioner(Protocol):
    name: str

    def caption(self, images: Sequence, seeds: Sequence[int]) -> list:
        """One Caption (or plain str) per image, each seeded with its seed where the captioner can."""

    def settings(self) -> dict:
        """Everything a caption depends on besides the image and the seed."""


@dataclass(frozen=True)
class CaptionSettings:
    instruction: str
    max_new_tokens: int
    temperature: float = 0.7
    do_sample: bool = True
    device: str = "cpu"
    dtype: str = "float32"


class LocalCaptioner:
    """A transformers model captioning one image per generate() call after torch.manual_seed(its
    seed) (a caption depends on neither its neighbours nor the number of processes), with its exact
    token count and whether it hit max_new_tokens (no end-of-sequence token among its tokens)."""

    def __init__(self, name: str, model, processor, inputs: Callable, generate_kwargs: dict, settings: dict):
        self.name, self.model, self.processor, self.inputs = name, model, processor, inputs
        self.generate_kwargs, self._settings = generate_kwargs, settings
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])

    @torch.no_grad()
    def caption(self, images: Sequence, seeds: Sequence[int]) -> list[Caption]:
        out = []
        for im, seed in zip(images, seeds):
            batch = self.inputs([im])
            torch.manual_seed(seed)
            ids = self.model.generate(**batch, **self.generate_kwargs)[0, batch["input_ids"].shape[1]:].tolist()
            end = next((i for i, t in enumerate(ids) if t in self.eos), None)
            tokens = len(ids) if end is None else end
            text = self.processor.batch_decode([ids[:tokens]], skip_special_tokens=True)[0]
            out.append(Caption(text, tokens, end is None and tokens >= self.generate_kwargs["max_new_tokens"]))
        return out

    def settings(self) -> dict:
        return self._settings


def transformers_captioner(source: str, cs: CaptionSettings) -> LocalCaptioner:
    """Any transformers image-text-to-text model (a hub id, a folder, or `tiny`) through
    uae.unified.captioner.TransformersCaptioner: its chat template, processor and sampling."""
    path = resolve(source, "captioner")
    run = RunSettings(device=cs.device, dtype=cs.dtype, caption_instruction=cs.instruction,
                      max_new_tokens=cs.max_new_tokens, temperature=cs.temperature, do_sample=cs.do_sample)
    tc = TransformersCaptioner(path, run, setting="--captioner", label=source)
    info = tc.settings_dict()
    info["seeded"] = "torch.manual_seed(seed) before each image's generate()"
    return LocalCaptioner(tc.name, tc.model, tc.processor, tc.inputs, dict(tc.sampling), info)


def uae_captioner(checkpoint: str, cs: CaptionSettings) -> LocalCaptioner:
    """UAE's encoder (Qwen2.5-VL + its LoRA; the decoder is not loaded), prompted as the release
    prompts it (uae.models.encoder.UAEEncoder.caption_inputs) with this run's instruction."""
    uae = UAE.from_pretrained(resolve_checkpoint(checkpoint), load_decoder=False, device=cs.device, dtype=cs.dtype)
    enc = uae.encoder
    enc.prompts = dataclasses.replace(enc.prompts, caption_instruction=cs.instruction)
    kwargs = dict(max_new_tokens=cs.max_new_tokens, **enc.caption_sampling(cs.temperature, cs.do_sample))
    gen = enc.llm.generation_config
    effective = {**{k: getattr(gen, k, None) for k in ("top_k", "top_p", "repetition_penalty")}, **kwargs}
    info = {"captioner": f"uae:{checkpoint}", "instruction": cs.instruction, "dtype": str(uae.dtype),
            "sampling": effective, "seeded": "torch.manual_seed(seed) before each image's generate()"}
    return LocalCaptioner(f"uae:{Path(checkpoint).name or checkpoint}", enc.llm, enc.processor, enc.caption_inputs,
                          kwargs, info)


class RemoteCaptioner:
    """An OpenAI-compatible server (uae.remote.ChatClient): one user turn [instruction, image] per
    request, `concurrency` in flight, retried with backoff, each sent its image's seed. The token
    count is the server's usage.completion_tokens and `truncated` its finish_reason "length" (cut
    by max_tokens); None where the server does not say."""

    def __init__(self, url: str, model: str | None, cs: CaptionSettings, *, concurrency: int, timeout_s: float,
                 retries: int, backoff_s: float, max_side: int | None):
        sampling = {"max_tokens": cs.max_new_tokens, "temperature": cs.temperature if cs.do_sample else 0.0}
        self.client = ChatClient(url, model, sampling=sampling, concurrency=concurrency, timeout_s=timeout_s,
                                 retries=retries, backoff_s=backoff_s, setting="--captioner")
        self.instruction, self.max_side = cs.instruction, max_side
        self.name = f"openai:{self.client.model}"
        self.chunk = max(1, concurrency) * 2  # images per journal write: a failure loses at most this many answers

    def caption(self, images: Sequence, seeds: Sequence[int]) -> list[Caption]:
        convs = [[{"role": "user", "content": [text_part(self.instruction), image_part(im, self.max_side)]}]
                 for im in images]
        return [remote_caption(c) for c in self.client.chat_many(convs, seeds=list(seeds))]

    def settings(self) -> dict:
        # Not the server's address: a rerun may reach the same model elsewhere (a restarted server).
        own = {k: v for k, v in self.client.settings().items() if k != "server"}
        return {**own, "instruction": self.instruction, "max_side": self.max_side,
                "seeded": "each request sends its image's seed (vLLM and transformers serve read it; "
                          "transformers serve seeds its one global generator, so only at --remote_concurrency 1)"}


def remote_caption(c: Completion) -> Caption:
    return Caption(c.text, c.tokens, c.truncated)


class UserCaptioner:
    """`module:Class`: a class of the user's (module: a dotted name or a .py path) constructed with
    the run's caption settings its constructor names (instruction, max_new_tokens, temperature,
    do_sample, device, dtype); its caption(images, seeds) returns str or Caption per image."""

    def __init__(self, spec: str, cs: CaptionSettings):
        cls = import_class(spec, "--captioner")
        values = dataclasses.asdict(cs)
        try:
            params = inspect.signature(cls).parameters
            kwargs = {k: v for k, v in values.items() if k in params}
        except (TypeError, ValueError):
            kwargs = {}
        self.obj = cls(**kwargs)
        if not callable(getattr(self.obj, "caption", None)):
            raise UAEError(f"--captioner {spec}: {type(self.obj).__name__} has no caption(images, seeds) method")
        self.name = getattr(self.obj, "name", spec)
        self.spec, self.kwargs = spec, kwargs

    def caption(self, images: Sequence, seeds: Sequence[int]) -> list[Caption]:
        out = self.obj.caption(list(images), list(seeds))
        if len(out) != len(images):
            raise UAEError(f"--captioner {self.spec} returned {len(out)} caption(s) for {len(images)} image(s)")
        return [c if isinstance(c, Caption) else Caption(str(c)) for c in out]

    def settings(self) -> dict:
        own = self.obj.settings() if callable(getattr(self.obj, "settings", None)) else {}
        return {"captioner": self.spec, "constructed_with": self.kwargs, **own}


def captioner_kind(spec: str) -> str:
    """"uae", "openai", "module" (module:Class) or "transformers" (a hub id, a folder or tiny)."""
    if spec.startswith("uae:"):
        return "uae"
    if spec.startswith("openai:"):
        return "openai"
    module, _, name = spec.rpartition(":")
    if module and name.isidentifier() and not Path(spec).exists():
        return "module"
    return "transformers"


# ----------------------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """Where and how: the settings of the outputs (`settings`, recorded and checked on rerun) and of
    the run only (the rest)."""

    output_dir: Path
    shard_size: int
    seed: int
    min_words: int
    drop_truncated: bool
    dedupe: bool
    max_bad_fraction: float
    rank: int = 0
    world_size: int = 1
    progress: bool = True

    def settings(self) -> dict:
        return {"shard_size": self.shard_size, "seed": self.seed, "min_words": self.min_words,
                "drop_truncated": self.drop_truncated, "dedupe": self.dedupe}

    def shard_path(self, k: int) -> Path:
        return self.output_dir / f"{k:0{SHARD_DIGITS}d}.tar"


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun and accelerate set RANK and
    WORLD_SIZE on every node); (0, 1) for a plain run."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UAEError("RANK / WORLD_SIZE in the environment are not integers") from None
    if not 0 <= rank < world:
        raise UAEError(f"RANK {rank} is not below WORLD_SIZE {world}")
    return rank, world


def check_manifest(plan: Plan, record: dict) -> None:
    """Refuse an output folder made from other inputs or with other settings (the keys of `record`)."""
    check_same_settings(plan.output_dir / MANIFEST, record, list(record))


def journal_path(plan: Plan, k: int) -> Path:
    return plan.output_dir / PARTIAL / f"{k:0{SHARD_DIGITS}d}.jsonl"


def read_journal(path: Path) -> dict[int, Caption]:
    """Captions kept of an unfinished shard, by index (a last line cut by a kill is ignored)."""
    out: dict[int, Caption] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                out[int(d["index"])] = Caption(d["text"], d.get("tokens"), d.get("truncated"))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def empty_counts() -> dict:
    return {"samples": 0, "corrupt": 0, "empty": 0, "short": 0, "truncated": 0, "dropped_truncated": 0}


@dataclass
class Pending:
    index: int
    key: str
    source: str
    data: bytes
    sha: str
    ext: str  # the input's extension ("" when it had none)


class ShardWriter:
    """Captions and writes the shards this process owns, keeping its counts."""

    def __init__(self, plan: Plan, captioner, sample_settings: dict, bar):
        self.plan, self.captioner, self.sample_settings, self.bar = plan, captioner, sample_settings, bar
        self.totals = empty_counts()
        self.done = 0  # images captioned by this process in this run (for the error of a server that went down)
        for k in self.own_complete():
            counts = json.loads((plan.output_dir / STATS / f"{k:0{SHARD_DIGITS}d}.json").read_text())["counts"]
            for name in self.totals:
                self.totals[name] += counts.get(name, 0)

    def own_complete(self) -> list[int]:
        return sorted(int(p.stem) for p in (self.plan.output_dir / STATS).glob("*.json")
                      if int(p.stem) % self.plan.world_size == self.plan.rank
                      and self.plan.shard_path(int(p.stem)).is_file())

    def write(self, k: int, items: list[Pending]) -> None:
        plan = self.plan
        counts = empty_counts()
        journal = journal_path(plan, k)
        kept = read_journal(journal)
        decoded = []
        for it in items:
            image, fmt = decode(it.data)
            if image is None:
                counts["corrupt"] += 1
                logger.warning("skipped %s: not a decodable image (%s)", it.source, fmt)
            else:
                decoded.append((it, image, fmt))
        self.it_done(counts["corrupt"], captioned=False)
        todo = [(it, im) for it, im, _ in decoded if it.index not in kept]
        chunk = getattr(self.captioner, "chunk", 1)
        journal.parent.mkdir(parents=True, exist_ok=True)
        with open(journal, "a", encoding="utf-8") as log:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                try:
                    caps = self.captioner.caption([im for _, im in part], [plan.seed + it.index for it, _ in part])
                except RemoteError as e:
                    got = {i: remote_caption(c) for i, c in e.done.items()}
                    self._log(log, [(part[i][0], c) for i, c in sorted(got.items())])
                    raise UAEError(f"{e}; {self.done + len(got)} image(s) captioned by this process in this run and "
                                   f"kept ({len(kept) + len(got)} of shard {k:0{SHARD_DIGITS}d} in {journal}, "
                                   "the rest in its finished shards): rerun the same command to continue") from None
                self._log(log, [(it, c) for (it, _), c in zip(part, caps)])
                for (it, _), c in zip(part, caps):
                    kept[it.index] = c
        samples = []
        for it, _, fmt in decoded:
            c = kept[it.index]
            words = len(c.text.split())
            if not c.text.strip():
                counts["empty"] += 1
                logger.warning("skipped %s: the captioner returned an empty caption", it.source)
                continue
            if words < plan.min_words:
                counts["short"] += 1
                continue
            if c.truncated:
                counts["truncated"] += 1
                if plan.drop_truncated:
                    counts["dropped_truncated"] += 1
                    continue
            ext = it.ext or PIL_EXTENSIONS.get(fmt, ".img")  # the input's own, else that of the format PIL read
            meta = {"key": it.key, "source": it.source, "index": it.index, "seed": plan.seed + it.index,
                    "sha256": it.sha, "captioner": self.captioner.name, "settings": self.sample_settings,
                    "words": words, "tokens": c.tokens, "truncated": c.truncated}
            samples.append({"__key__": it.key, ext.lstrip("."): it.data, "txt": c.text.encode("utf-8"),
                            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        counts["samples"] = len(samples)
        for name in self.totals:
            self.totals[name] += counts[name]
        self.check_bad()
        self._finish(k, samples, counts)
        journal.unlink(missing_ok=True)

    def it_done(self, n: int, captioned: bool = True) -> None:
        self.done += n if captioned else 0
        self.bar.update(n)

    def _log(self, log, pairs) -> None:
        for it, c in pairs:
            log.write(json.dumps({"index": it.index, "text": c.text, "tokens": c.tokens,
                                  "truncated": c.truncated}, ensure_ascii=False) + "\n")
        log.flush()
        os.fsync(log.fileno())
        self.it_done(len(pairs))

    def check_bad(self) -> None:
        """Corrupt images and empty captions are skipped; past --max_bad_fraction of this process's
        images they stop the run (a wrong input or a broken captioner, not a few bad files)."""
        t = self.totals
        seen = t["samples"] + t["corrupt"] + t["empty"] + t["short"] + t["dropped_truncated"]
        bad = t["corrupt"] + t["empty"]
        if seen and bad / seen > self.plan.max_bad_fraction:
            raise UAEError(f"{bad} of {seen} image(s) were bad ({t['corrupt']} not decodable, {t['empty']} empty "
                           f"caption(s)), above --max_bad_fraction {self.plan.max_bad_fraction}: check --input and "
                           "--captioner (the log names each), or raise --max_bad_fraction")

    def _finish(self, k: int, samples: list[dict], counts: dict) -> None:
        """The shard whole or not at all: a hidden temporary file, synced, then renamed into place."""
        import webdataset as wds

        plan = self.plan
        final = plan.shard_path(k)
        tmp = final.with_name(f".{final.name}.partial")
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for s in samples:
                writer.write(s)
            writer.close()
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(plan.output_dir / STATS / f"{k:0{SHARD_DIGITS}d}.json", {"shard": final.name, "counts": counts})
        os.replace(tmp, final)
        logger.info("wrote %s: %d sample(s)%s", final, counts["samples"],
                    "".join(f", {v} {n}" for n, v in counts.items() if n != "samples" and v))


@dataclass
class Summary:
    inputs: int = 0
    unique: int = 0
    duplicates: int = 0
    non_image: int = 0
    shards: int = 0
    written: int = 0       # shards written by this process in this run
    skipped: int = 0       # shards of this process already complete
    counts: dict = dataclasses.field(default_factory=empty_counts)
    seconds: float = 0.0
    captioned: int = 0


def caption_data(source: Source, captioner_factory: Callable[[], Any], plan: Plan, settings: dict) -> Summary:
    """Caption `source` into `plan.output_dir` (see the module's docstring); `settings`: what the
    captions depend on besides the plan (instruction, captioner spec, sampling), recorded in the
    manifest and in every sample's JSON."""
    out = plan.output_dir
    # Flat, so that a refusal names the setting; checked before the captioner loads, written after
    # it loaded (a captioner that fails to load leaves no record to refuse its correction with).
    record = json.loads(json.dumps({"format": 1, "inputs": source.describe(), **plan.settings(), **settings}))
    check_manifest(plan, record)
    captioner = captioner_factory()
    # what the loaded captioner says of itself (its class, dtype, sampling) is part of the record too
    record["captioner"] = json.loads(json.dumps(captioner.settings(), default=str))
    check_manifest(plan, record)
    if not (out / MANIFEST).is_file():
        atomic_write_json(out / MANIFEST, record)  # any process may write it: every one writes the same
    (out / STATS).mkdir(exist_ok=True)
    total = source.count()
    bar = tqdm(total=None if total is None else -(-total // plan.world_size), unit="img", desc="captions",
               disable=not plan.progress, dynamic_ncols=True)
    writer = ShardWriter(plan, captioner, settings, bar)
    summary = Summary()
    seen: set[bytes] = set()
    buffer: list[Pending] = []
    current = 0
    start = time.perf_counter()

    def flush(k: int) -> None:
        if buffer:
            writer.write(k, buffer)
            summary.written += 1
            buffer.clear()

    for item in source.items():
        summary.inputs += 1
        if item.data is None:
            summary.non_image += 1
            logger.warning("skipped %s: no image in this sample", item.source)
            continue
        digest = hashlib.sha256(item.data).digest()
        if plan.dedupe and digest in seen:
            summary.duplicates += 1
            continue
        seen.add(digest)
        n = summary.unique
        summary.unique += 1
        k = n // plan.shard_size
        if k != current:
            flush(current)
            current = k
        if k % plan.world_size != plan.rank:
            continue
        if plan.shard_path(k).is_file():
            if n % plan.shard_size == 0:
                summary.skipped += 1
            bar.update(1)
            continue
        buffer.append(Pending(n, f"{n:0{KEY_DIGITS}d}", item.source, item.data, digest.hex(), item.ext))
    flush(current)
    bar.close()
    if (out / PARTIAL).is_dir() and not any((out / PARTIAL).iterdir()):
        (out / PARTIAL).rmdir()  # nothing unfinished (another process may be writing one: then it stays)
    summary.shards = -(-summary.unique // plan.shard_size)
    summary.counts, summary.captioned = writer.totals, writer.done
    summary.seconds = time.perf_counter() - start
    return summary
