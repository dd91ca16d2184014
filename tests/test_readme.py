"""The README documents every demo flag that exists, and none that does not."""

import dataclasses
import re
from pathlib import Path

import demo

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_demo_flags_match_the_readme_table():
    section = README.split("## demo.py", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    documented = {flag for row in rows for flag in re.findall(r"`(--\w+)`", row.split("|")[1])}
    real = {"--" + f.name for f in dataclasses.fields(demo.DemoConfig)} | {"--config"}
    assert documented == real


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    first, second = blocks[0].strip(), blocks[1].strip()
    assert "demo.py" in first and "pytest" in second
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert second in ci
