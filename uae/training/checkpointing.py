"""Resumable checkpoints (`checkpoint-<step>/`, written atomically, rotated) and the run's result,
`final/` in the official layout."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from uae.errors import UAEError
from uae.files import atomic_write_json, remove_path

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class Checkpoints:
    """`output_dir/checkpoint-<step>/` written atomically via accelerate's save_state, plus
    `uae_state.json` (step, resolved config); the oldest are removed past `limit`."""

    def __init__(self, output_dir: Path, limit: int | None):
        self.dir, self.limit = Path(output_dir), limit

    def all(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.dir.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))
                 and (p / "uae_state.json").exists()]
        return [p for _, p in sorted(found)]

    def resolve(self, what: str | None) -> Path | None:
        if not what:
            return None
        if what == "latest":
            found = self.all()
            if not found:
                logger.info("no checkpoint in %s: starting from scratch", self.dir)
            return found[-1] if found else None
        p = Path(what)
        if not (p / "uae_state.json").exists():
            raise UAEError(f"--resume_from_checkpoint {what}: not a checkpoint folder (no uae_state.json); "
                           f"use 'latest' or one of {[c.name for c in self.all()]}")
        return p

    def save(self, accelerator, step: int, config: dict) -> Path:
        final = self.dir / f"checkpoint-{step}"
        tmp = self.dir / f".checkpoint-{step}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        tmp.mkdir(parents=True, exist_ok=True)  # every rank writes its RNG state there
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
        if accelerator.is_main_process:
            atomic_write_json(tmp / "uae_state.json", {"step": step, "config": config})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            if self.limit:
                for old in self.all()[:-self.limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(accelerator, path: Path) -> int:
        accelerator.load_state(str(path))
        return int(json.loads((path / "uae_state.json").read_text())["step"])


def link_or_copy(src: str | Path, dst: Path, link: bool) -> None:
    """Unchanged parts of a checkpoint: a symlink (no multi-GB copies) or a copy."""
    src = Path(src).resolve()
    if dst.exists() or dst.is_symlink():
        remove_path(dst)
    if link:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def final_dir(out_dir) -> Path:
    """Where a run's result goes: <out_dir>/final/."""
    return Path(out_dir) / "final"


def write_final(out_dir: Path, paths, link: bool, keep: tuple[str, ...], manifest: dict) -> Path:
    """`<out_dir>/final/` in the official layout: the parts in `keep` linked (or copied) from the
    source checkpoint, the manifest written; the caller then writes the parts it trained."""
    from uae.checkpoints import MANIFEST

    final = final_dir(out_dir)
    final.mkdir(exist_ok=True)
    for part in keep:
        if getattr(paths, part):
            link_or_copy(getattr(paths, part), final / part, link)
    if "dit_lora" in keep and not paths.dit_lora:
        manifest = {**manifest, "dit_lora": None}
    atomic_write_json(final / MANIFEST, manifest)
    return final
