"""Resumable checkpoints (`checkpoint-<step>/`, written atomically, rotated) and the run's result,
`final/` in the official layout."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import yaml

from uae.config import result_settings
from uae.errors import UAEError
from uae.files import atomic_write_json, link_or_copy, remove_path, share_files
from uae.models.layout import MANIFEST

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
            share_files(tmp)
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
        return Checkpoints.state(path)["step"]

    @staticmethod
    def state(path: Path) -> dict:
        """A checkpoint's record: {"step": its step, "config": the run's resolved config}."""
        state = json.loads((Path(path) / "uae_state.json").read_text())
        return {"step": int(state["step"]), "config": state.get("config", {})}


# ---------------------------------------------------------------------- whose folder is it
RUN_RECORDS = ("config.yaml", "metrics.jsonl", "final")  # beside checkpoint-<step>/: what marks a run folder
KEPT_ON_OVERWRITE = ("cache",)  # keyed by content and settings: valid for any run


def run_contents(out: Path) -> list[str]:
    """What in `out` shows that it holds a run (sorted names; [] for none)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name in RUN_RECORDS or CHECKPOINT_RE.match(p.name))


def changed_settings(cfg, before: dict, now: dict) -> list[str]:
    """The settings that change what the run trains and differ between the record `before` (a
    checkpoint's or config.yaml's resolved config) and `now`, as 'name old -> new'. Settings a
    config marks `run_only` may change (unless its `extra_result_settings()` names them for this
    run); so may max_steps, unless a decaying learning-rate schedule is stretched by it. A setting the record does not hold (written by an older version) is not
    compared."""
    names = result_settings(cfg) + list(getattr(cfg, "extra_result_settings", list)())
    if not str(getattr(cfg, "lr_scheduler", "constant")).startswith("constant"):
        names.append("max_steps")
    return [f"{n} {before[n]!r} -> {now[n]!r}" for n in names if n in before and before[n] != now[n]]


def claim_output_dir(cfg, config: dict) -> tuple[Path | None, bool]:
    """Whether this run may use `cfg.output_dir`, decided before anything is written or loaded (on
    every process: it only reads). Returns (the checkpoint to resume from or None, whether the
    earlier run's files must be cleared first). Two runs' files are never mixed:

    - a fresh run into a folder that holds a run is refused, unless `overwrite_output_dir`;
    - a resume is refused if a setting that changes what it trains differs from the checkpoint's
      (or, with no checkpoint yet, from the folder's config.yaml)."""
    out = Path(cfg.output_dir)
    held = run_contents(out)
    if not cfg.resume_from_checkpoint:
        if held and not cfg.overwrite_output_dir:
            raise UAEError(f"--output_dir {out} holds a run ({', '.join(held)}): pass --resume_from_checkpoint latest "
                           "to continue it, --overwrite_output_dir to delete it and start again, or another --output_dir")
        return None, bool(held)
    resume = Checkpoints(out, None).resolve(cfg.resume_from_checkpoint)
    if resume is not None:
        before, source = Checkpoints.state(resume)["config"], resume
    elif (out / "config.yaml").is_file():  # stopped before its first checkpoint: it starts again
        before, source = yaml.safe_load((out / "config.yaml").read_text()) or {}, out / "config.yaml"
    else:
        return None, False
    changed = changed_settings(cfg, before, config)
    if changed:
        raise UAEError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: {source} was made with other settings "
                       f"({'; '.join(changed)}): resume with the same settings, or start a fresh run in another "
                       "--output_dir (or --overwrite_output_dir without --resume_from_checkpoint)")
    return resume, False


def clear_run(out: Path) -> None:
    """--overwrite_output_dir: the earlier run's files go (all but its content-keyed cache/)."""
    for p in Path(out).iterdir():
        if p.name not in KEPT_ON_OVERWRITE:
            remove_path(p)
    logger.info("--overwrite_output_dir: removed the earlier run's files from %s", out)


def final_dir(out_dir) -> Path:
    """Where a run's result goes: <out_dir>/final/."""
    return Path(out_dir) / "final"


def write_final(final: Path, paths, link: bool, keep: tuple[str, ...], manifest: dict) -> Path:
    """A run's result in the official layout, in the folder `final` (a temporary one that then
    takes final/'s place, uae.files.atomic_folder): the parts in `keep` linked (or copied) from the
    source checkpoint, the manifest written; the caller then writes the parts it trained."""
    final = Path(final)
    final.mkdir(exist_ok=True)
    for part in keep:
        if getattr(paths, part):
            link_or_copy(getattr(paths, part), final / part, link)
    if "dit_lora" in keep and not paths.dit_lora:
        manifest = {**manifest, "dit_lora": None}
    atomic_write_json(final / MANIFEST, manifest)
    return final
