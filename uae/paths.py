"""Where the repository's data lives (presets, configs). No machine-specific paths."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
MODEL_PRESETS = CONFIG_DIR / "models"


def cache_dir() -> Path:
    """Folder for built-on-demand artefacts (the embedded tiny checkpoint). `UAE_CACHE` overrides
    it; otherwise it follows XDG_CACHE_HOME / ~/.cache."""
    if os.environ.get("UAE_CACHE"):
        return Path(os.environ["UAE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "uae"


def preset_path(name_or_path: str) -> Path:
    """A model preset by name (`tiny`, `full`, `release`) or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = MODEL_PRESETS / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    from uae.errors import UAEError

    known = sorted(q.stem for q in MODEL_PRESETS.glob("*.yaml"))
    raise UAEError(f"unknown model preset {name_or_path!r}: use one of {known} or a path to a YAML file")
