"""Writing files so that nothing is ever half-written: atomic writes (temporary sibling, then
rename) and cached artefacts built once under a file lock."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from uae.errors import UAEError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's are 0600): read at import
DIR_MODE = 0o777 & ~_umask()   # what mkdir would give a new folder (mkdtemp's are 0700)


def remove_path(path: Path) -> None:
    """A file, a symlink (not what it points to) or a folder tree."""
    path = Path(path)
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def link_or_copy(src: str | Path, dst: Path, link: bool) -> None:
    """`dst` as a symlink to `src` (an unchanged part of a checkpoint: no multi-GB copy) or a copy
    of it; whatever was at `dst` goes."""
    src = Path(src).resolve()
    if dst.exists() or dst.is_symlink():
        remove_path(dst)
    if link:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def share_files(root: Path) -> None:
    """The files and folders under `root` get the permissions a plain write would give (the
    umask's): libraries that write atomically (safetensors) leave their files 0600, which others on
    a shared machine cannot read. Symlinks (linked parts) are left alone."""
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), DIR_MODE)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), FILE_MODE)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A folder written whole or not at all: the block writes into a temporary sibling of `out`,
    which then takes `out`'s place (an `out` that exists is replaced only then) with the
    permissions mkdir would give. If the block fails, the temporary folder goes and `out` is as
    it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        share_files(tmp)
        if out.is_symlink() or out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.rmdir(old)
            out.rename(old)
            tmp.rename(out)
            remove_path(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a folder this process can write into (made if missing), checked before any work
    starts, so that a run never ends its compute on a FileNotFoundError: else a one-line error
    naming `flag`."""
    return _writable(Path(path), Path(path), flag)


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` as a file this process can write (its folder made if missing), checked before any work
    starts; a one-line error naming `flag` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UAEError(f"{flag} {path} is a folder: give a file name")
    _writable(path.parent, path, flag)
    return path


def _writable(folder: Path, given: Path, flag: str) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check."):
            pass
    except OSError as e:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else f"{e.strerror or e} ({folder})"
        raise UAEError(f"{flag} {given}: cannot write there: {why}; choose a location you can write") from None
    return folder


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


def check_same_settings(path: Path, current: dict, keys: Iterable[str]) -> None:
    """A folder's outputs made with other settings are not added to (they would be mixed): the
    settings `keys` recorded in the JSON file `path`, when it exists, must equal `current`'s."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UAEError(f"{path} is not a readable record of settings ({e}): remove it, or use a fresh "
                       "--output_dir") from None
    diff = [f"{k} {before.get(k)!r} then, {current[k]!r} now" for k in keys if before.get(k) != current[k]]
    if diff:
        raise UAEError(f"{path.parent} holds outputs made with other settings ({'; '.join(diff)}): use a fresh "
                       "--output_dir, or the same settings to resume")
