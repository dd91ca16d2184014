"""Typed configs: a dataclass is the CLI (one flag per field, help from field metadata) and is
also readable from YAML (`--config file.yaml`; flags given on the command line win).

A field declares its `choices` and bounds (`min`, `max`, inclusive); `check_fields(cfg)` (called
from `__post_init__`) enforces them with a UAEError naming the flag, and argparse lists the
choices in --help. Checks that involve several fields stay in the dataclass's `__post_init__`.

A field without a default is required: from the command line or the YAML, else a UAEError in
argparse's words. A `positional` field is read from the command line by position (a list takes one
or more values), as `uae-report compare RUN_DIR... --output_dir DIR` reads its run folders."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from uae.errors import UAEError
from uae.files import atomic_write_text

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, aliases: Sequence[str] = (),
          choices: Sequence[Any] | None = None, min: float | None = None, max: float | None = None,
          run_only: bool = False, positional: bool = False, metavar: str | None = None, **kw) -> Any:
    """A dataclass field with help text, extra flag spellings, and its allowed values for the CLI.
    `run_only`: the setting changes how a run goes (logging, checkpoint cadence, placement, the
    held-out evaluation), not what it trains, so a resumed run may change it (`result_settings`).
    `positional`: a command-line argument without a flag (`metavar` names it in --help); one
    without a default must be given there."""
    meta = {"help": help, "aliases": tuple(aliases), "choices": tuple(choices) if choices else None,
            "min": min, "max": max, "run_only": run_only, "positional": positional, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _base_type(tp):
    """(scalar type, is_list) of an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


class _Parser(argparse.ArgumentParser):
    """Bad flags become a UAEError (one line, exit code 2 through the scripts' wrapper) instead of
    argparse's SystemExit, which an in-process caller would not get a return code from. No prefix
    matching: `--model` is not read as `--models`, nor `--input_te` as `--input_text` (the declared
    aliases are the only other spellings)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UAEError(f"{message} (see --help)")


def _fields(classes) -> list[dataclasses.Field]:
    """The union of the classes' fields, each name once (the first class's definition)."""
    seen: dict[str, dataclasses.Field] = {}
    for c in classes:
        for f in dataclasses.fields(c):
            seen.setdefault(f.name, f)
    return list(seen.values())


_SAYS_DEFAULT = re.compile(r"\(default|default:|; default ")  # "(default: x)", not "by default" or "TRL's default"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as people read it: the description's lines as written (usage examples one per line,
    not reflowed into a paragraph) and "(default: X)" after each option that has a default.

    The default shown is the action's `shown_default` where set (the dataclass CLI's flags have
    `argparse.SUPPRESS` as their argparse default, so that YAML values survive unset flags), else
    its argparse default. Nothing is added for None (no default), for an off switch, or where the
    help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = getattr(action, "shown_default", action.default)
        if (not action.option_strings or default is None or default is argparse.SUPPRESS or _SAYS_DEFAULT.search(text)
                or (action.nargs == 0 and default is False)):
            return text
        return f"{text} (default: {_shown(default).replace('%', '%%')})".lstrip()


def _shown(value) -> str:
    if isinstance(value, _PerClass):
        return ", ".join(f"{label} {_shown(v)}" for label, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value) if value != "" else "''"


class _PerClass(dict):
    """Defaults that differ between the classes of one command line: {class label: default}."""


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _shown_name(f: dataclasses.Field) -> str:
    """The field as the command line names it: its flag, or its metavar if it is positional."""
    return (f.metadata.get("metavar") or f.name) if f.metadata.get("positional") else "--" + f.name


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown_default(name: str, classes: dict[str, type]):
    """The default of field `name` for --help: one value, or {label: value} where classes differ."""
    per = {label: _default(fl) for label, c in classes.items() for fl in dataclasses.fields(c) if fl.name == name}
    values = list(per.values())
    return values[0] if all(v == values[0] for v in values) else _PerClass(per)


def build_parser(cls, description: str | None = None, no_default: Sequence[str] = (),
                 prog: str | None = None) -> argparse.ArgumentParser:
    """The CLI of a config class (or of several, a list or {label: class}: the union of their
    fields; --help shows each class's default, by label, where they differ, and none for the
    fields in `no_default`). `prog`: the command as --help's usage line names it (a sub-command:
    "uae-report compare"); argparse's default, the script's file name, otherwise."""
    if isinstance(cls, dict):
        labelled = dict(cls)
    else:
        labelled = {c.__name__: c for c in (cls if isinstance(cls, (list, tuple)) else [cls])}
    classes = list(labelled.values())
    parser = _Parser(prog=prog, description=description or classes[0].__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with any of the settings below")
    hints: dict[str, Any] = {}
    for c in classes:
        hints.update({k: v for k, v in typing.get_type_hints(c).items() if k not in hints})
    for f in _fields(classes):
        tp, is_list = _base_type(hints[f.name])
        if f.metadata.get("positional"):
            _add_positional(parser, f, tp, is_list)
            continue
        names = ["--" + f.name] + list(f.metadata.get("aliases", ()))
        kw: dict[str, Any] = {"help": f.metadata.get("help", "") + (" (required)" if _required(f) else ""),
                              "dest": f.name, "default": argparse.SUPPRESS}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if tp is bool:
            if f.default is False:
                kw["action"] = "store_true"
            else:
                kw.update(type=_bool, metavar="BOOL")
        else:
            kw["type"] = tp if tp in (int, float, str) else str
            if is_list:
                kw["nargs"] = "+"
        if f.metadata.get("choices") and len(classes) == 1:
            kw["choices"] = f.metadata["choices"]
        action = parser.add_argument(*names, **kw)
        action.shown_default = None if f.name in no_default else _shown_default(f.name, labelled)
    return parser


def _add_positional(parser: argparse.ArgumentParser, f: dataclasses.Field, tp, is_list: bool) -> None:
    """A positional field: required by argparse when it has no default (its usage line and error
    are argparse's own), else optional and, when absent, left to the YAML or the default."""
    required = _required(f)
    convert = tp if tp in (int, float, str) else str
    kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "metavar": f.metadata.get("metavar") or f.name,
                          "nargs": ("+" if required else "*") if is_list else (None if required else "?")}
    if required:
        kw.update(type=convert, choices=f.metadata.get("choices"))
    else:  # argparse converts and checks an absent one's default too: SUPPRESS passes, check_fields checks choices
        kw.update(default=argparse.SUPPRESS, type=lambda s: s if s == argparse.SUPPRESS else convert(s))
    parser.add_argument(f.name, **kw)


def check_fields(cfg) -> None:
    """Every field's declared choices and bounds (a list is checked item by item; None passes)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
        for v in items:
            if choices and v not in choices:
                raise UAEError(f"{_shown_name(f)} {v}: choose from {', '.join(map(str, choices))}")
            if lo is not None and v < lo:
                raise UAEError(f"{_shown_name(f)} must be at least {lo} (got {v})")
            if hi is not None and v > hi:
                raise UAEError(f"{_shown_name(f)} must be at most {hi} (got {v})")


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UAEError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
    missing = [_shown_name(f) for f in dataclasses.fields(cls) if _required(f) and f.name not in values]
    if missing:  # argparse's words, as for a required flag (the YAML may give it, so argparse cannot check)
        raise UAEError(f"the following arguments are required: {', '.join(missing)} (see --help)")
    return cls(**values)


def read_yaml(cfg_path: str) -> dict[str, Any]:
    path = Path(cfg_path)
    if not path.is_file():
        raise UAEError(f"--config {cfg_path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UAEError(f"--config {cfg_path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise UAEError(f"--config {cfg_path} must hold a mapping of setting: value")
    return loaded


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
                 prog: str | None = None) -> T:
    """CLI flags over YAML (`--config`) over the dataclass defaults."""
    parser = build_parser(cls, description, prog=prog)
    args = vars(parser.parse_args(argv))
    cfg_path = args.pop("config", None)
    values = read_yaml(cfg_path) if cfg_path else {}
    values.update(args)
    return from_dict(cls, values, source=cfg_path or "command line")


def parse_configs(classes: dict[str, type], argv: Sequence[str] | None = None, description: str | None = None,
                  drop: Sequence[str] = ()) -> dict[str, Any]:
    """One config per named class from one command line: a flag or top-level YAML key goes to every
    class that has the field (an error if none has it); a YAML section named after a class
    (`cold_start: {...}`) goes to that class only, above the top level and below the flags. Keys in
    `drop` (e.g. the `stage: all` that chose this mode) are not passed on."""
    parser = build_parser(classes, description, no_default=drop)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if k not in drop}
    cfg_path = args.pop("config", None)
    loaded = read_yaml(cfg_path) if cfg_path else {}
    sections = {name: loaded.pop(name) for name in classes if isinstance(loaded.get(name), dict)}
    loaded = {k: v for k, v in loaded.items() if k not in drop}
    known = {f.name for c in classes.values() for f in dataclasses.fields(c)}
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise UAEError(f"{cfg_path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    out = {}
    for name, cls in classes.items():
        mine = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in loaded.items() if k in mine}
        values.update(sections.get(name, {}))
        values.update({k: v for k, v in args.items() if k in mine})
        out[name] = from_dict(cls, values, source=f"{cfg_path or 'command line'} ({name})")
    return out


def result_settings(cfg) -> list[str]:
    """The names of the settings that change what a run computes (every field not `run_only`)."""
    return [f.name for f in dataclasses.fields(cfg) if not f.metadata.get("run_only")]


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config next to results (YAML, atomically)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
