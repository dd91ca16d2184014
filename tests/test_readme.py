"""The documentation runs as written.

Every command of a ```bash block of README.md and docs/*.md, and of the comment header of each file
in configs/, either runs as written on a CPU (the venv active, from the checkout's root, on the tiny
model and the sample photos) or ends with a mark, `# needs: GPU, real weights, data, tool, time`
(docs/testing.md). The default suite parses every command with its script's own parser and checks
what an unmarked one reads; `-m slow` runs them. Every flag table lists exactly the flags that exist;
every `accelerate launch` of a trainer fits the memory plan (bench/results/cpu/memory_plan.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.yaml"))
MARKS = ("GPU", "real weights", "data", "tool", "time")
PYTHONS = ("python", "python3", ".venv/bin/python")
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]  # uae-demo -> uae.apps.demo:main
PLAN = json.loads((ROOT / "bench" / "results" / "cpu" / "memory_plan.json").read_text())
GIB = 2 ** 30


# ----------------------------------------------------------------------------- reading the commands

@dataclasses.dataclass
class Command:
    source: str                 # README.md:42
    page: str                   # the page (or config file) whose earlier commands it may rely on
    text: str                   # as a shell reads it (continuations joined), without the trailing comment
    marks: tuple[str, ...]
    env: dict
    argv: list[str]

    def __str__(self):
        return f"{self.source}: `{self.text}`"


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the comment starts at the first # outside quotes after a blank."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def _split_simple(code: str) -> list[str]:
    """A command line cut at `&&` and `;` outside quotes."""
    parts, quote, cur, i = [], None, "", 0
    while i < len(code):
        c = code[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif code.startswith("&&", i) or c == ";":
            parts.append(cur)
            cur, i = "", i + (2 if c == "&" else 1)
            continue
        cur += c
        i += 1
    return [p.strip() for p in [*parts, cur] if p.strip()]


def _marks(comment: str, source: str) -> tuple[str, ...]:
    m = re.match(r"#\s*needs:\s*(.*)$", comment)
    if not m:
        return ()
    items = tuple(i.strip() for i in re.sub(r"\([^)]*\)", "", m.group(1)).split(",") if i.strip())
    unknown = [i for i in items if i not in MARKS]
    assert items and not unknown, f"{source}: unknown mark(s) {unknown or comment!r}; marks: {', '.join(MARKS)}"
    return items


def _commands(lines: list[tuple[int, str]], page: str, label: str) -> list[Command]:
    out, buf, start = [], "", None
    for n, line in lines:
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        code, comment = _split_comment(buf)
        src = f"{label}:{start}"
        if code.strip():
            marks = _marks(comment, src)
            for simple in _split_simple(code):
                tokens = shlex.split(simple)
                env = {}
                while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
                    k, v = tokens.pop(0).split("=", 1)
                    env[k] = v
                out.append(Command(src, page, simple, marks, env, tokens))
        buf, start = "", None
    return out


def page_commands(path: Path) -> list[Command]:
    text = path.read_text()
    out = []
    for m in re.finditer(r"```bash\n(.*?)\n```", text, flags=re.S):
        first = text[:m.start(1)].count("\n") + 1
        lines = [(first + i, l) for i, l in enumerate(m.group(1).split("\n"))]
        out += _commands(lines, path.name, str(path.relative_to(ROOT)))
    return out


def header_commands(path: Path) -> list[Command]:
    """The commands in a config's leading comment lines (`#   accelerate launch ...`)."""
    lines, started = [], False
    for n, line in enumerate(path.read_text().split("\n"), 1):
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if started or re.match(r"(accelerate|python3?|uae-[a-z-]+|bash) ", body):
            lines.append((n, body))
            started = body.endswith("\\")
    return _commands(lines, str(path.relative_to(ROOT)), str(path.relative_to(ROOT)))


DOC_COMMANDS = [c for p in PAGES for c in page_commands(p)]
HEADER_COMMANDS = [c for p in CONFIG_FILES for c in header_commands(p)]
ALL_COMMANDS = DOC_COMMANDS + HEADER_COMMANDS


# ----------------------------------------------------------------------------- what a command is

class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


@contextmanager
def _parse_only():
    """argparse-based mains stop right after parsing their arguments (no work done)."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real


def _module_of_script(script: str) -> str | None:
    """The module whose main a top-level script calls (`from uae.apps.demo import ... main`)."""
    src = (ROOT / script).read_text()
    m = re.search(r"^from (uae[\w.]*) import .*?\b(\w*main)\b", src, flags=re.M)
    if m:
        return m.group(1) if m.group(2) in ("main", "scorer_main") else f"{m.group(1)}:{m.group(2)}"
    if script.startswith("bench/") and re.search(r"^def main\(", src, flags=re.M):
        return Path(script).stem  # bench/ is on the tests' path (pytest.ini)
    return None


def parse(module: str, argv: list[str]):
    """The config(s) (or argparse namespace) `module`'s command line makes of `argv`, through the
    script's own parser and config checks, without running it. Raises UAEError / AssertionError."""
    from uae.cli import with_named_config
    from uae.config import parse_config

    if module == "uae.train:grpo_main":
        from uae.train import parse as grpo_parse

        return grpo_parse(argv)
    if module == "uae.train:sft_main":
        from uae.methods.sft import SFTConfig

        return [parse_config(SFTConfig, with_named_config(argv, "sft"))]
    classes = {"uae.apps.demo": "DemoConfig", "uae.apps.unibench": "UniBenchConfig", "uae.apps.score_i2i": "ScoreConfig",
               "uae.apps.gen_bench": "GenBenchConfig", "uae.apps.export": "ExportConfig"}
    if module in classes:
        return [parse_config(getattr(importlib.import_module(module), classes[module]), argv)]
    if module in ("uae.random_weights", "uae.apps.build_checkpoint"):
        module = "uae.apps.build_checkpoint"
    main = importlib.import_module(module).main
    err = None
    with _parse_only():
        try:
            main(argv)
        except _Parsed as p:
            return [p.namespace]
        except SystemExit as e:
            err = f"exit {e.code}"
    raise AssertionError(f"{module} did not accept its arguments ({err or 'returned without parsing'})")


@dataclasses.dataclass
class Target:
    kind: str                        # setup | suite | toolkit | script | bash | external
    module: str | None = None
    argv: list[str] = dataclasses.field(default_factory=list)
    launch: argparse.Namespace | None = None
    path: str | None = None


def target(cmd: Command) -> Target:
    a = cmd.argv
    if not a:
        return Target("external")
    if a[:2] == ["source", ".venv/bin/activate"]:
        return Target("setup")
    if a[0] in ("pip", ".venv/bin/pip") or (a[0] in PYTHONS and a[1:3] == ["-m", "venv"]):
        return Target("setup", argv=a)
    if a[0] in PYTHONS and a[1:3] == ["-m", "pytest"]:
        return Target("suite", argv=a[3:])
    if a[0] in SCRIPTS:
        return Target("toolkit", SCRIPTS[a[0]].removesuffix(":main"), a[1:])
    if a[0] == "accelerate" and a[1:2] == ["launch"]:
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(a[2:])
        inner = ["python", *(["-m"] if launch.module else []), launch.training_script, *launch.training_script_args]
        t = target(dataclasses.replace(cmd, argv=inner))
        return dataclasses.replace(t, launch=launch)
    if a[0] in PYTHONS and a[1:2] == ["-m"]:
        mod = a[2]
        spec = importlib.util.find_spec(mod) if mod.startswith("uae") else None
        return Target("toolkit", mod, a[3:]) if spec else Target("external", mod)
    if a[0] in PYTHONS and len(a) > 1:
        script = a[1]
        if not (ROOT / script).is_file():
            return Target("external", path=script)
        module = _module_of_script(script)
        return Target("toolkit", module, a[2:], path=script) if module else Target("script", argv=a[2:], path=script)
    if a[0] == "bash" and len(a) > 1:
        return Target("bash", argv=a[2:], path=a[1])
    return Target("external", path=a[0])


# ----------------------------------------------------------------------------- reads and writes

INPUTS = ("data", "eval_data", "input_img", "prompt_file", "ref_path", "image_path", "recon_from", "captions_from",
          "checkpoint", "captioner", "generator", "captioner_lora", "prompts", "sd3", "dit", "dit_lora", "llm",
          "llm_lora", "llm_processor", "model_args", "model", "resume_from_checkpoint")
OUTPUTS = ("output_dir", "output_path", "output_file", "out", "json")
NAMES = {"tiny", "tiny-flux", "sample", "none", "auto", "official", "uae", "janus", "pipeline"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _produced(value: str, written: list[Path]) -> bool:
    p = Path(os.path.normpath(value))
    return any(p == w or w in p.parents for w in written)


def missing_inputs(cmd: Command, configs: list, written: list[Path], trained: list[Path]) -> list[str]:
    """What an unmarked command reads that neither is in the checkout nor is written by an earlier
    command of its page."""
    problems = []
    for cfg in configs:
        values = vars(cfg) if isinstance(cfg, argparse.Namespace) else dataclasses.asdict(cfg)
        for field in INPUTS:
            value = values.get(field)
            if not value or not isinstance(value, str) or value in NAMES:
                continue
            if field == "resume_from_checkpoint" and value == "latest":
                if Path(os.path.normpath(values["output_dir"])) not in trained:
                    problems.append(f"--resume_from_checkpoint latest of {values['output_dir']}, which no earlier "
                                    "command of the page trains")
                continue
            if field == "model_args" and not value.endswith((".json", ".yaml", ".yml")):
                continue
            if field == "model" and ":" in value:
                mod = value.split(":")[0]
                if mod.endswith(".py"):
                    value = mod
                else:
                    places = [ROOT / p for p in cmd.env.get("PYTHONPATH", "").split(os.pathsep) if p]
                    if importlib.util.find_spec(mod) or any((d / (mod.replace(".", "/") + ".py")).exists() for d in places):
                        continue
                    problems.append(f"--model {value}: module {mod} is not importable")
                    continue
            if (ROOT / value).exists() or _produced(value, written):
                continue
            hint = " (a hub id: mark it `# needs: real weights`)" if HUB_ID.fullmatch(value) else ""
            problems.append(f"--{field} {value}, which is not in the checkout and no earlier command of the page "
                            f"writes{hint}")
    return problems


def check_page(commands: list[Command]) -> list[str]:
    """Every command of one page, in order: it parses; unmarked, it reads only what exists or what an
    earlier command of the page wrote, and it does not start a run in a folder an earlier one used."""
    from uae.errors import UAEError

    problems, written, trained = [], [], []
    for cmd in commands:
        try:
            t = target(cmd)
        except SystemExit:
            problems.append(f"{cmd}: accelerate launch does not accept these arguments")
            continue
        unmarked = not cmd.marks
        if t.kind == "external":
            if unmarked:
                problems.append(f"{cmd}: {t.path or t.module} is neither a script of the checkout nor a toolkit "
                                "command: make it runnable or mark it")
            continue
        if t.kind == "setup":
            for i, a in enumerate(t.argv):
                if a == "-r" and not (ROOT / t.argv[i + 1]).is_file():
                    problems.append(f"{cmd}: {t.argv[i + 1]} does not exist")
                if a == "-e":
                    extras = re.findall(r"\[(.*)\]", t.argv[i + 1])
                    known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                    for e in (extras[0].split(",") if extras else []):
                        if e not in known:
                            problems.append(f"{cmd}: no extra [{e}] in pyproject.toml")
            continue
        if t.kind == "suite":
            problems += [f"{cmd}: {a} does not exist" for a in t.argv
                         if a.startswith("tests/") and not (ROOT / a.split("::")[0]).exists()]
            continue
        if t.kind == "bash":
            if not (ROOT / t.path).is_file():
                if unmarked:
                    problems.append(f"{cmd}: {t.path} does not exist")
            else:
                src = (ROOT / t.path).read_text()
                problems += [f"{cmd}: {t.path} does not know {a}" for a in t.argv if a.startswith("--") and a not in src]
            continue
        if t.kind == "script":
            if t.argv:
                problems.append(f"{cmd}: {t.path} takes no arguments")
            continue
        try:
            configs = parse(t.module, t.argv)
        except (UAEError, AssertionError) as e:
            # A config that checks its input paths when parsed cannot be parsed before the command that
            # writes them has run (or, marked, before the data is there): only that is let through.
            paths = [a for a in t.argv if re.search(r"[/.]", a) and not a.startswith("-") and a in str(e)]
            if not any(not (ROOT / a).exists() and (cmd.marks or _produced(a, written)) for a in paths):
                problems.append(f"{cmd}: {e}")
            continue
        if unmarked:
            problems += [f"{cmd}: reads {p}" for p in missing_inputs(cmd, configs, written, trained)]
        runs = set()
        for cfg in configs:
            values = vars(cfg) if isinstance(cfg, argparse.Namespace) else dataclasses.asdict(cfg)
            if "overwrite_output_dir" in values and not values.get("validate_data") and unmarked:
                out = Path(os.path.normpath(values["output_dir"]))
                if out in trained and not values["resume_from_checkpoint"] and not values["overwrite_output_dir"]:
                    problems.append(f"{cmd}: a fresh run into {out}, which an earlier command of the page trained: it "
                                    "would be refused (--resume_from_checkpoint, --overwrite_output_dir or another "
                                    "--output_dir)")
                runs.add(out)
            for field in OUTPUTS:
                if isinstance(values.get(field), str):
                    written.append(Path(os.path.normpath(values[field])))
        trained += sorted(runs)
    return problems


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("page", [*PAGES, *CONFIG_FILES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_parses_and_unmarked_ones_can_run(page, at_root):
    commands = page_commands(page) if page.suffix == ".md" else header_commands(page)
    problems = check_page(commands)
    assert not problems, "\n".join(problems)


def test_the_commands_were_found():
    """The extraction itself: the README's first two blocks, continuation lines, marks, env prefixes."""
    assert DOC_COMMANDS[0].argv[:4] == ["python3", "-m", "venv", ".venv"] and DOC_COMMANDS[2].argv[1] == "demo.py"
    assert any(c.env == {"PYTHONPATH": "docs/examples"} for c in DOC_COMMANDS)
    multi = [c for c in DOC_COMMANDS if "--ref_path Unified-Bench/UniBench/Image --output_dir" in c.text]
    assert multi and all(c.marks for c in multi)
    assert len([c for c in DOC_COMMANDS if not c.marks]) > 40
    assert {c.page for c in HEADER_COMMANDS} >= {"configs/sft/paper.yaml", "configs/accelerate/fsdp.yaml"}


def test_check_catches_what_it_should(at_root):
    """The checker fails an unmarked command that reads a missing file, uses an unknown flag or
    repeats a run, and passes the same commands marked."""
    bad = _commands([(1, "python demo.py --input_img missing.jpg --prompt_only"),
                     (2, "python train_sft.py --config configs/sft/tiny.yaml --no_such_flag 1"),
                     (3, "python demo.py --checkpoint zhiyuanyan1/UAE --input_text x"),
                     (4, "python train_grpo.py --config configs/grpo/tiny_u4g.yaml"),
                     (5, "python train_grpo.py --config configs/grpo/tiny_u4g.yaml"),
                     (6, "python train_grpo.py --stage all --config configs/grpo/u4g.yaml  # needs: GPU"),
                     (7, "lmms_eval --tasks mmmu_val")], "t", "t")
    problems = check_page(bad)
    for n, what in [(1, "missing.jpg"), (2, "no_such_flag"), (3, "real weights"), (5, "would be refused"),
                    (6, "one-stage config"), (7, "neither a script")]:
        assert any(p.startswith(f"t:{n}:") and what in p for p in problems), (n, problems)
    assert not any(p.startswith("t:4:") for p in problems)


# ----------------------------------------------------------------------------- the flag tables

def _documented(page: str, section_start: str, section_end: str | None) -> set[str]:
    section = (ROOT / page).read_text().split(section_start, 1)[1]
    if section_end:
        section = section.split(section_end, 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    return {flag for row in rows for flag in re.findall(r"`(--\w+)`", row.split("|")[1])}


def _flags(*classes) -> set[str]:
    out = {"--config"}
    for cls in classes:
        for f in dataclasses.fields(cls):
            out |= {"--" + f.name, *f.metadata.get("aliases", ())}
    return out


@pytest.mark.parametrize("module, classes, page, start, end", [
    ("uae.apps.demo", ["DemoConfig"], "docs/demo.md", "## Every flag", "\n## "),
    ("uae.apps.score_i2i", ["ScoreConfig"], "docs/unified-bench.md", "## Scoring folders: eval/", "\n## "),
    ("uae.apps.unibench", ["UniBenchConfig"], "docs/unified-bench.md", "## The benchmark runner", "\n## "),
    ("uae.methods.sft", ["SFTConfig"], "docs/training-sft.md", "# Training the decoder", None),
    ("uae.methods", ["ColdStartConfig", "G4UConfig", "U4GConfig"], "docs/unified-grpo.md",
     "# Unified-GRPO", "\n## Stage 2 for any captioner"),
])
def test_flags_match_the_tables(module, classes, page, start, end):
    mod = importlib.import_module(module)
    assert _documented(page, start, end) == _flags(*(getattr(mod, c) for c in classes))


# ----------------------------------------------------------------------------- the README itself

def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    first, second = blocks[0].strip(), blocks[1].strip()
    assert "demo.py" in first and "pytest" in second
    assert second.endswith("HF_HUB_OFFLINE=1 .venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci
    assert blocks[2].strip() == "source .venv/bin/activate"


def test_readme_is_short_and_links_every_page():
    assert len(README.splitlines()) < 300
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", README))
    assert linked == {str(p.relative_to(ROOT)) for p in PAGES[1:]}


def test_the_install_check_prints_what_the_readme_says(at_root, capsys):
    """The README's 'A correct install prints this': the tiny model's caption of a sample photo."""
    from uae.apps.demo import main

    expected = re.search(r"prints the caption `([^`]+)` on stdout", README).group(1)
    cmd = next(c for c in page_commands(ROOT / "README.md") if "--prompt_only --max_new_tokens" in c.text)
    assert cmd.argv[:2] == ["python", "demo.py"] and not cmd.marks
    assert main(cmd.argv[2:]) == 0
    assert capsys.readouterr().out == expected + "\n"


# ----------------------------------------------------------------------------- the memory plan

LAUNCHES = [c for c in ALL_COMMANDS if c.argv[:2] == ["accelerate", "launch"]]
# Settings that change nothing a GPU holds: paths, optimiser and RL hyperparameters, logging, cadence.
# The held-out evaluation (eval_*) is not in the plan: docs/scaling.md says what it adds.
NEUTRAL = {"data", "checkpoint", "output_dir", "max_steps", "learning_rate", "decoder_learning_rate", "adam_beta1",
           "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm", "seed", "log_level", "report_to",
           "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "overwrite_output_dir",
           "cache_dir", "link_unchanged", "device", "lr_scheduler", "lr_warmup_steps", "ema_decay", "ema_every",
           "image_log_steps", "validation_steps", "validation_prompts", "validation_guidance_scale",
           "dataloader_num_workers", "on_bad_data", "clip_range", "beta", "kl_reference", "loss_type",
           "scale_rewards", "adv_clip", "temperature", "scorer_weights", "eval_steps", "eval_data", "eval_scorers",
           "eval_resolution", "eval_inference_steps", "eval_guidance_scale", "eval_max_new_tokens"}


def launch_kind(launch) -> tuple[str, int]:
    """(1 GPU | DDP | FSDP | DeepSpeed, processes) of an `accelerate launch`."""
    cfg = yaml.safe_load((ROOT / launch.config_file).read_text()) if launch.config_file else {}
    n = launch.num_processes or cfg.get("num_processes") or 1
    dist = cfg.get("distributed_type", "NO")
    if launch.use_fsdp or dist == "FSDP":
        return "FSDP", n
    if launch.use_deepspeed or dist == "DEEPSPEED":
        return "DeepSpeed", n
    if launch.multi_gpu or dist == "MULTI_GPU" or n > 1:
        return "DDP", n
    return "1 GPU", n


def plan_rows(cfg) -> list[str]:
    """The plan's settings whose config matches `cfg` in everything a GPU holds."""
    from memory_plan import PIPELINES, SETTINGS

    from uae.config import from_dict, read_yaml
    from uae.methods import METHODS

    stage = getattr(cfg, "stage", "sft")
    out = []
    for name, (row_stage, path, extra) in {**SETTINGS, **{k: v[:3] for k, v in PIPELINES.items()}}.items():
        if row_stage != stage or name not in PLAN["plans"]:
            continue
        row = from_dict(METHODS[stage].config,
                        {**read_yaml(str(ROOT / path)), "data": "plan", **extra})
        if all(getattr(cfg, f.name) == getattr(row, f.name) for f in dataclasses.fields(cfg) if f.name not in NEUTRAL):
            out.append(name)
    return out


@pytest.mark.parametrize("cmd", LAUNCHES, ids=lambda c: c.source)
def test_every_launch_fits_the_memory_plan(cmd, at_root):
    t = target(cmd)
    if t.module not in ("uae.train:sft_main", "uae.train:grpo_main"):
        pytest.skip("not a trainer: the plan covers training")
    kind, n = launch_kind(t.launch)
    if t.module == "uae.train:grpo_main":
        assert kind not in ("FSDP", "DeepSpeed"), f"{cmd}: train_grpo.py refuses {kind} launches"
    configs = parse(t.module, t.argv)
    if all(c.device == "cpu" for c in configs):
        assert n <= 2, f"{cmd}: a CPU launch"
        return
    worst_activations = max(a["full_size_estimate_bytes"] or 0 for a in PLAN["activations"].values())
    for cfg in configs:
        rows = plan_rows(cfg)
        assert len(rows) == 1, f"{cmd}: {len(rows)} plan rows match its {getattr(cfg, 'stage', 'sft')} config: {rows}"
        plan = PLAN["plans"][rows[0]]
        column = {"1 GPU": "1 GPU", "DDP": "8 GPUs DDP", "DeepSpeed": "8 GPUs DDP",  # ZeRO holds at most what DDP holds
                  "FSDP": "8 GPUs FSDP"}[kind]
        if kind == "FSDP":
            assert n >= 8, f"{cmd}: the plan shards over 8 GPUs, this launch over {n}"
        assert column in plan["parallel"], f"{cmd}: the plan has no {column} column for {rows[0]}"
        total = plan["parallel"][column]["total"]
        act = PLAN["activations"].get(rows[0], {}).get("full_size_estimate_bytes")
        act = worst_activations if act is None else act  # not estimated: the largest estimate stands in
        need = (total + act) / GIB
        assert need < PLAN["gpu_gib"], (f"{cmd}: {rows[0]} under {column} needs {need:.1f} GiB per GPU "
                                        f"({total / GIB:.1f} + {act / GIB:.1f} of activations) of {PLAN['gpu_gib']}")


@pytest.mark.parametrize("launch, why", [
    ("--multi_gpu --num_processes 8 train_sft.py --config configs/sft/paper.yaml", r"needs 208\.\d GiB"),
    ("--config_file configs/accelerate/fsdp.yaml train_grpo.py --config configs/grpo/u4g.yaml", "refuses FSDP"),
    ("--config_file configs/accelerate/fsdp.yaml --num_processes 4 train_sft.py --config configs/sft/paper.yaml",
     "over 4"),
    ("--config_file configs/accelerate/single_gpu.yaml train_sft.py --config configs/sft/paper.yaml --dit_mode lora "
     "--resolution 2048", "0 plan rows"),
])
def test_the_memory_check_fails_launches_that_do_not_fit(launch, why, at_root):
    """What the plan check is for: the README's old DDP launch of the whole DiT, train_grpo.py under
    FSDP, FSDP over fewer GPUs than planned, a setting the plan does not cover."""
    cmd = _commands([(1, f"accelerate launch {launch} --data /data/x  # needs: GPU")], "t", "t")[0]
    with pytest.raises(AssertionError, match=why):
        test_every_launch_fits_the_memory_plan(cmd, None)


# ----------------------------------------------------------------------------- running them (slow)

def _copy_of_the_working_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


@pytest.mark.slow
def test_every_unmarked_command_runs(tmp_path):
    """Every unmarked command of README.md and docs/*.md, in order, page by page, each page in a fresh
    copy of the working tree: exit code 0 and no Traceback. The install, the suite and the venv's
    activation are checked above, not run: .ci/run runs the first two as written; PATH activates."""
    venv_bin = Path(sys.executable).parent
    cache = tmp_path / "uae-cache"
    failures, times = [], []
    for page in PAGES:
        work = tmp_path / page.stem
        _copy_of_the_working_tree(work)
        (work / ".venv").symlink_to(venv_bin.parent)  # the README's `.venv/bin/python ...`, installed once
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "UAE_CACHE": str(cache),
               "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(work),
               "VIRTUAL_ENV": str(venv_bin.parent)}
        for cmd in page_commands(page):
            if cmd.marks or target(cmd).kind in ("setup", "suite"):
                continue
            t0 = time.perf_counter()
            proc = subprocess.run(["bash", "-c", cmd.text], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=1800)
            times.append((time.perf_counter() - t0, str(cmd)))
            if proc.returncode != 0 or "Traceback" in proc.stderr:
                failures.append(f"{cmd}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    total = sum(s for s, _ in times)
    report = "\n".join(f"{s:7.1f} s  {c}" for s, c in times) + f"\n{total:7.1f} s  in all ({len(times)} commands)"
    print(report)
    (tmp_path / "times.txt").write_text(report)
    assert not failures, "\n\n".join(failures)


def test_the_readme_lists_every_training_method_as_registered():
    """The README's table of methods is the registry (uae.methods.METHODS): name, command, summary."""
    from uae.methods import METHODS

    table = README.split("| method | run by | what it trains |\n| --- | --- | --- |\n", 1)[1].split("\n\n", 1)[0]
    rows = [tuple(c.strip().strip("`") for c in line.strip("|").split(" | ")) for line in table.splitlines()]
    expected = [(m.name, m.command if m.command == "train_sft.py" else f"{m.command} --stage {m.name}", m.summary)
                for m in METHODS.values()]
    assert rows == expected
