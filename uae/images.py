"""Images in and out: opening with clear errors (as the release's captioning path reads them, or
converted to 8-bit RGB), listing a folder's images, saving atomically, and the uint8 tensors the
scorers take."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from uae.errors import UAEError
from uae.files import atomic_write_bytes

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def save_image(image, path: Path) -> None:
    """Save a PIL image atomically; the format follows the extension (PNG if none is known)."""
    import io

    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


def open_image(path: str | os.PathLike, *, exif_transpose: bool = False):
    """Open and decode an image file as PIL gives it (mode unchanged, first frame), or raise
    UAEError saying why not. This is what the release's captioning path reads (qwen_vl_utils
    opens the file with PIL and converts it itself): no EXIF rotation unless asked."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise UAEError(f"image {path} does not exist")
    if path.is_dir():
        raise UAEError(f"image {path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise UAEError(f"image {path} is an empty (zero-byte) file")
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            return ImageOps.exif_transpose(im) if exif_transpose else im.copy()
    except UnidentifiedImageError:
        raise UAEError(f"{path} is not an image PIL can read (wrong extension or corrupt file)") from None
    except Image.DecompressionBombError as e:
        raise UAEError(f"image {path} is larger than PIL's decompression-bomb limit ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UAEError(f"image {path} is corrupt or truncated ({e})") from None


def load_image(path: str | os.PathLike):
    """Open an image as RGB, or raise UAEError saying why not.

    Conversions (documented): EXIF orientation is applied; palette, grey, CMYK and 16-bit images
    are converted to 8-bit RGB; transparency is composited on white; animated images use their
    first frame."""
    return to_rgb(open_image(path, exif_transpose=True))


def to_rgb(im):
    """8-bit RGB from any PIL mode (see `load_image`)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr / scale * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def to_uint8(images) -> list[torch.Tensor]:
    """PIL images or float (B, 3, H, W) in [0, 1] -> list of uint8 (3, H, W), as the scorers take them."""
    import numpy as np
    import torch  # lazy: torch takes seconds to import, and opening or saving an image needs none

    if isinstance(images, torch.Tensor):
        return list((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous() for im in images]


def list_images(folder: str | os.PathLike, role: str = "image") -> list[Path]:
    """The images directly in `folder`, sorted by name, or a UAEError naming the `role` (e.g.
    "reference (--ref_path)") and what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise UAEError(f"{role} folder {folder} does not exist")
    if not folder.is_dir():
        raise UAEError(f"{role} folder {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UAEError(f"{role} folder {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    return files
