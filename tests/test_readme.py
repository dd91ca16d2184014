"""The README documents every flag that exists, and none that does not."""

import dataclasses
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _documented(section_start: str, section_end: str) -> set[str]:
    section = README.split(section_start, 1)[1].split(section_end, 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    return {flag for row in rows for flag in re.findall(r"`(--\w+)`", row.split("|")[1])}


def _flags(*classes) -> set[str]:
    out = {"--config"}
    for cls in classes:
        for f in dataclasses.fields(cls):
            out |= {"--" + f.name, *f.metadata.get("aliases", ())}
    return out


@pytest.mark.parametrize("module, classes, start, end", [
    ("uae.demo", ["DemoConfig"], "## demo.py", "\n## "),
    ("uae.score_i2i", ["ScoreConfig"], "### Scoring folders: eval/", "\n## "),
    ("uae.unibench", ["UniBenchConfig"], "### The benchmark runner", "\n### "),
    ("uae.training.configs", ["SFTConfig"], "## Training the decoder: train_sft.py", "\n## "),
    ("uae.training.configs", ["ColdStartConfig", "G4UConfig", "U4GConfig"], "## Unified-GRPO: train_grpo.py", "\n## "),
])
def test_flags_match_the_readme_tables(module, classes, start, end):
    import importlib

    mod = importlib.import_module(module)
    assert _documented(start, end) == _flags(*(getattr(mod, c) for c in classes))


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    first, second = blocks[0].strip(), blocks[1].strip()
    assert "demo.py" in first and "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci
