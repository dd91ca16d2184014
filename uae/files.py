"""Writing files so that nothing is ever half-written: atomic writes (temporary sibling, then
rename) and cached artefacts built once under a file lock."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from uae.errors import UAEError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's are 0600): read at import


def atomic_write_chunks(path: Path, chunks: Iterable[bytes | str]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.
    The pieces are written as they come (a page of thousands of rows is never whole in memory);
    str pieces as UTF-8. The file gets the permissions a plain write would (the umask's), not
    mkstemp's private 0600, so that other users' evaluators on a shared machine can read results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_chunks(path, [data])


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_chunks(path, [text.encode("utf-8")])


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


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
