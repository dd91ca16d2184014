"""Where the library's data lives: the model presets, the scorer specs, the shipped training
configs (configs/) and the sample references with their captions (Unified-Bench/UniBench/). In a
checkout (or an editable install) they are read where they are; an installed wheel carries copies
under uae/_data/ (setup.py puts them there), so the commands work from any directory. No
machine-specific paths."""

import os
from pathlib import Path

from uae.errors import UAEError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DATA_ROOT = PACKAGE_DIR / "_data" if (PACKAGE_DIR / "_data").is_dir() else REPO_ROOT
CONFIG_DIR = DATA_ROOT / "configs"
MODEL_PRESETS = CONFIG_DIR / "models"
SAMPLES_DIR = DATA_ROOT / "Unified-Bench" / "UniBench"
SAMPLE_DATA = "sample"  # the name of the six sample photos with their captions (SAMPLES_DIR / "sample.jsonl")


def cache_dir() -> Path:
    """Folder for built-on-demand artefacts (the embedded tiny checkpoint). `UAE_CACHE` overrides
    it; otherwise it follows XDG_CACHE_HOME / ~/.cache."""
    if os.environ.get("UAE_CACHE"):
        return Path(os.environ["UAE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "uae"


def preset_path(name_or_path: str) -> Path:
    """A model preset by name (`tiny`, `mid`, `full`) or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = MODEL_PRESETS / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in MODEL_PRESETS.glob("*.yaml"))
    raise UAEError(f"unknown model preset {name_or_path!r}: use one of {known} or a path to a YAML file")


def shipped_config(name_or_path: str, kind: str) -> Path:
    """A training config by path, or by the name of a shipped one (`tiny_u4g`, `u4g`, ... in
    configs/<kind>/, kind "grpo" or "sft"); a path that exists wins."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / kind / f"{p.stem if p.suffix in ('.yaml', '.yml') else name_or_path}.yaml"
    if p.parent == Path(".") and candidate.is_file():
        return candidate
    known = sorted(q.stem for q in (CONFIG_DIR / kind).glob("*.yaml"))
    raise UAEError(f"--config {name_or_path}: no such file, and not a shipped config name ({', '.join(known)})")


def data_source(source: str) -> str:
    """`sample` (when no such file or folder exists here): the sample photos with their captions."""
    if source == SAMPLE_DATA and not Path(source).exists():
        return str(SAMPLES_DIR / "sample.jsonl")
    return source
