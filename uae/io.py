"""Files: atomic writes, image loading with clear errors, listing inputs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from uae.errors import UAEError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def fingerprint(*parts: Any, files=()) -> str:
    """A short stable id of settings and weight files (path, size, mtime: cheap, no hashing of
    gigabytes); caches keyed by it are invalidated when either changes."""
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    for f in sorted(Path(f) for f in files):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def content_key(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


def build_once(path: Path, build, timeout_s: float = 3600.0) -> Path:
    """`build(path)` unless `path` exists, under an exclusive file lock, so that concurrent
    processes build a cached artefact once and never see half of it. In a distributed job only the
    node's first process (LOCAL_RANK 0) builds; the others wait for the artefact to appear:
    transformers' save_pretrained writes nothing on a process whose torch.distributed rank is not 0,
    so an artefact built there would be silently incomplete."""
    import fcntl
    import time

    path = Path(path)
    if path.exists():
        return path
    if not _builds_here():
        t0 = time.monotonic()
        while not path.exists():
            if time.monotonic() - t0 > timeout_s:
                raise UAEError(f"waited {timeout_s:.0f} s for {path} to be built by the node's first process")
            time.sleep(0.5)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            build(path)
    return path


def _builds_here() -> bool:
    """Whether this process may build cached artefacts: a single process, or a node's first one."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"]) == 0
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except ImportError:
        return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UAEError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UAEError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files
