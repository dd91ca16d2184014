"""Keys for caches: of settings and weight files (cheap: path, size, mtime) and of contents."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
