"""Image + caption datasets for training, and their validation.

Sources: a .jsonl file ({"image": path, "caption": text} per line, paths relative to the file),
a folder of images with .txt sidecars (same stem), a Hugging Face `datasets` dataset saved with
`save_to_disk` (columns `image` and `caption`), or webdataset shards (`.tar` files: a folder of
them, one file, a brace pattern or a glob; read through the `webdataset` library, see uae.stream).
Dataset rows are decoded lazily. `validate` reports missing, unreadable and caption-less items up
front. Training from shards streams them instead (uae.stream.ShardStream): `read_items` holds a
source's samples in memory, for the small data of the cold start and of `--validate_data`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from uae.errors import UAEError
from uae.hashing import content_key
from uae.images import IMAGE_EXTENSIONS, load_image, to_rgb
from uae.paths import data_source
from uae.stream import (MAX_BAD_FRACTION, BadCounter, caption_of, decode_image, decode_sample, image_member, is_shards,
                        nearest_bucket, raw_samples, sample_name, shard_files)

logger = logging.getLogger(__name__)


@dataclass
class Item:
    image: Path | None
    caption: str | None
    source: str  # where it came from, for messages (file:line or path)
    ds: object = None  # a `datasets` dataset and the row of this item (image decoded on access)
    row: int = -1
    column: str = "image"
    data: bytes | None = None  # the image bytes of a webdataset sample

    def open(self):
        """The image as 8-bit RGB PIL (see uae.images.load_image for the conversions)."""
        if self.data is not None:
            try:
                return decode_image(self.data)
            except Exception as e:  # PIL raises many types on a corrupt file
                raise UAEError(f"{self.source}: the image does not decode ({type(e).__name__}: {e})") from None
        if self.ds is None:
            return load_image(self.image)
        return to_rgb(self.ds[self.row][self.column])

    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, read from the header when possible."""
        if self.ds is not None or self.data is not None:
            return self.open().size
        from PIL import Image

        with Image.open(self.image) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


@dataclass
class Validation:
    ok: list[Item] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    no_caption: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return len(self.missing) + len(self.unreadable) + len(self.no_caption)

    def report(self) -> str:
        lines = [f"{len(self.ok)} usable item(s); {len(self.missing)} missing image(s), "
                 f"{len(self.unreadable)} unreadable image(s), {len(self.no_caption)} without a caption"]
        for what, items in (("missing", self.missing), ("unreadable", self.unreadable), ("no caption", self.no_caption)):
            for s in items[:5]:
                lines.append(f"  {what}: {s}")
            if len(items) > 5:
                lines.append(f"  ... and {len(items) - 5} more {what}")
        return "\n".join(lines)


def read_items(source: str | Path) -> list[Item]:
    """The items of a data source (module docstring); `sample`: the six sample photos with their
    captions that ship with the toolkit (uae.paths.data_source)."""
    source = data_source(str(source))
    src = Path(source)
    if is_shards(source):
        return read_webdataset(source)
    if not src.exists():
        raise UAEError(f"data {source} does not exist: give a .jsonl file, a folder of images with .txt "
                       "captions, or a `datasets` folder saved with save_to_disk")
    if src.is_file():
        if src.suffix != ".jsonl":
            raise UAEError(f"data {source}: a file must be .jsonl with {{\"image\": ..., \"caption\": ...}} lines")
        items = []
        for i, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                img = Path(rec["image"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UAEError(f"data {source} line {i}: expected a JSON object with \"image\" and \"caption\"") from None
            items.append(Item(img if img.is_absolute() else src.parent / img, rec.get("caption"), f"{src.name}:{i}"))
        return items
    if (src / "dataset_info.json").exists() or (src / "state.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(src))
        if not {"image", "caption"} <= set(ds.column_names):
            raise UAEError(f"dataset {source} needs columns image and caption (has {ds.column_names})")
        return [Item(None, c, f"{src.name}[{i}]", ds=ds, row=i) for i, c in enumerate(ds["caption"])]
    images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UAEError(f"data folder {source} holds no images")
    return [Item(p, p.with_suffix(".txt").read_text(encoding="utf-8") if p.with_suffix(".txt").exists() else None,
                 str(p)) for p in images]


def read_webdataset(source) -> list[Item]:
    """The samples of webdataset shards, their image bytes held in memory and decoded on use
    (training streams them instead: uae.stream); a sample without an image member is an item whose
    image is missing."""
    items = []
    for sample in raw_samples(shard_files(source)):
        member = image_member(sample)
        items.append(Item(None, caption_of(sample), sample_name(sample), data=sample[member] if member else None))
    return items


def validate(items: list[Item]) -> Validation:
    v = Validation()
    for it in items:
        if not (it.caption or "").strip():
            v.no_caption.append(it.source)
            continue
        if it.ds is None and it.data is None and (it.image is None or not it.image.exists()):
            v.missing.append(f"{it.source} ({it.image})")
            continue
        try:
            it.open()
        except UAEError as e:
            v.unreadable.append(f"{it.source}: {e}")
            continue
        except Exception as e:  # a dataset row that does not decode
            v.unreadable.append(f"{it.source}: {type(e).__name__}: {e}")
            continue
        v.ok.append(it)
    return v


class Reference(NamedTuple):
    """A reference image of an RL stage or of the held-out evaluation."""

    key: str
    image: object          # PIL RGB
    caption: str | None    # the caption that came with the data, if any


def load_references(data: str, setting: str = "--data") -> list[Reference]:
    """A folder of images (captions from the encoder), a folder with .txt captions, or a .jsonl /
    datasets / webdataset source, opened; unreadable images are skipped with a warning (shards:
    counted, and more than MAX_BAD_FRACTION of them is an error)."""
    if is_shards(data):
        return shard_references(data, setting)
    refs = []
    for it in read_items(data):
        try:
            refs.append(Reference(it.image.name if it.image is not None else it.source, it.open(), it.caption))
        except Exception as e:
            logger.warning("skipping reference %s: %s", it.source, e)
    if not refs:
        raise UAEError(f"{setting} {data}: no readable reference image")
    return refs


def shard_references(data: str, setting: str = "--data") -> list[Reference]:
    """The references of webdataset shards, streamed through the webdataset library (one shard may
    mix jpg and png); a sample whose image does not decode, or that has none, is skipped and
    counted. A caption is optional (the encoder writes its own)."""
    counter = BadCounter(f"{setting} {data}", MAX_BAD_FRACTION, check_after=0,
                         fix=f"fix or drop those samples (at most {MAX_BAD_FRACTION:g} of the references may be bad)")
    refs = []
    for sample in tqdm(raw_samples(shard_files(data, setting)), desc="reading references", unit="image",
                       disable=None):
        d = decode_sample(sample, need_caption=False)
        counter.add(d)
        if d.problem is None:
            refs.append(Reference(d.key, d.image, d.caption if (d.caption or "").strip() else None))
    if counter.bad:
        logger.warning("%s %s: skipped %s", setting, data, counter.summary())
    if not refs:
        raise UAEError(f"{setting} {data}: no readable reference image ({counter.summary()})")
    message = counter.error()
    if message:
        raise UAEError(message)
    return refs


def center_crop_tensor(pil, height: int, width: int) -> torch.Tensor:
    """Resize (shortest side, bicubic) and centre-crop to height x width; float in [-1, 1], (3, H, W)."""
    import numpy as np
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    scale = max(height / x.shape[1], width / x.shape[2])
    size = [max(height, round(x.shape[1] * scale)), max(width, round(x.shape[2] * scale))]
    x = TF.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [height, width])
    return x.float() / 127.5 - 1.0


def item_key(it: Item, height: int, width: int) -> str:
    """Key of an item's image at a training size (file bytes, or the decoded pixels of a row)."""
    data = it.data if it.data is not None else it.open().tobytes() if it.ds is not None else it.image.read_bytes()
    return f"{content_key(data)}-{height}x{width}"


class CaptionImageDataset(torch.utils.data.Dataset):
    """Validated items -> {"pixels": (3, H, W) in [-1, 1], "caption": str, "index": int}; with a
    latent cache, {"latent_mean", "latent_std"} replace the pixels (no image is decoded).
    `sizes[i]` is item i's (height, width): one square size, or its aspect-ratio bucket."""

    def __init__(self, items: list[Item], sizes: list[tuple[int, int]], latent_cache=None):
        self.items, self.sizes, self.latent_cache = items, sizes, latent_cache

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, i: int) -> torch.Tensor:
        return center_crop_tensor(self.items[i].open(), *self.sizes[i])

    def __getitem__(self, i: int) -> dict:
        out = {"caption": self.items[i].caption.strip(), "index": i}
        if self.latent_cache is not None:
            cached = self.latent_cache.get(item_key(self.items[i], *self.sizes[i]))
            out.update(latent_mean=cached["mean"], latent_std=cached["std"])
        else:
            out["pixels"] = self.pixels(i)
        return out


def buckets_for(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (height, width): sides multiples of `step`, area at most
    resolution^2, aspect within [1/max_aspect, max_aspect]; the largest area per aspect."""
    area, out = resolution * resolution, set()
    for h in range(step, int(resolution * max_aspect ** 0.5) + step, step):
        w = (area // h) // step * step
        if w >= step and 1 / max_aspect <= h / w <= max_aspect:
            out.add((h, w))
    return sorted(out)


def assign_buckets(items: list[Item], buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each item's bucket: the closest aspect ratio (in log space)."""
    return [nearest_bucket(buckets, *it.size()) for it in items]


def collate(batch: list[dict]) -> dict:
    out = {"caption": [b["caption"] for b in batch], "index": torch.tensor([b["index"] for b in batch])}
    for key in ("pixels", "latent_mean", "latent_std"):
        if key in batch[0]:
            out[key] = torch.stack([b[key] for b in batch])
    return out
