"""Image + caption datasets for training, and their validation.

Sources: a .jsonl file ({"image": path, "caption": text} per line, paths relative to the file),
a folder of images with .txt sidecars (same stem), or a Hugging Face `datasets` dataset saved with
`save_to_disk` (columns `image` and `caption`). `validate` reports missing, unreadable and
caption-less items up front.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uae.errors import UAEError
from uae.io import IMAGE_EXTENSIONS, load_image

logger = logging.getLogger(__name__)


@dataclass
class Item:
    image: Path | None
    caption: str | None
    source: str  # where it came from, for messages (file:line or path)
    pil: object = None  # in-memory image (datasets source)


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
    src = Path(source)
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
        return [Item(None, r["caption"], f"{src.name}[{i}]", pil=r["image"]) for i, r in enumerate(ds)]
    images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UAEError(f"data folder {source} holds no images")
    return [Item(p, p.with_suffix(".txt").read_text(encoding="utf-8") if p.with_suffix(".txt").exists() else None,
                 str(p)) for p in images]


def validate(items: list[Item]) -> Validation:
    v = Validation()
    for it in items:
        if not (it.caption or "").strip():
            v.no_caption.append(it.source)
            continue
        if it.pil is None:
            if it.image is None or not it.image.exists():
                v.missing.append(f"{it.source} ({it.image})")
                continue
            try:
                load_image(it.image)
            except UAEError as e:
                v.unreadable.append(f"{it.source}: {e}")
                continue
        v.ok.append(it)
    return v


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


def item_key(it: Item) -> str:
    """Content key of an item's image (file bytes, or pixels for in-memory images)."""
    from uae.io import content_key

    if it.pil is not None:
        return content_key(it.pil.convert("RGB").tobytes() + repr(it.pil.size).encode())
    return content_key(it.image.read_bytes())


class CaptionImageDataset(torch.utils.data.Dataset):
    """Validated items -> {"pixels": (3, H, W) in [-1, 1], "caption": str, "index": int}; with a
    latent cache, {"latent_mean", "latent_std"} replace the pixels (no image is decoded)."""

    def __init__(self, items: list[Item], height: int, width: int, latent_cache=None):
        self.items, self.height, self.width, self.latent_cache = items, height, width, latent_cache

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, i: int) -> torch.Tensor:
        it = self.items[i]
        pil = it.pil.convert("RGB") if it.pil is not None else load_image(it.image)
        return center_crop_tensor(pil, self.height, self.width)

    def __getitem__(self, i: int) -> dict:
        out = {"caption": self.items[i].caption.strip(), "index": i}
        if self.latent_cache is not None:
            cached = self.latent_cache.get(item_key(self.items[i]))
            out.update(latent_mean=cached["mean"], latent_std=cached["std"])
        else:
            out["pixels"] = self.pixels(i)
        return out


def collate(batch: list[dict]) -> dict:
    out = {"caption": [b["caption"] for b in batch], "index": torch.tensor([b["index"] for b in batch])}
    for key in ("pixels", "latent_mean", "latent_std"):
        if key in batch[0]:
            out[key] = torch.stack([b[key] for b in batch])
    return out
