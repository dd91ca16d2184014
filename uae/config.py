"""Typed configs: a dataclass is the CLI (one flag per field, help from field metadata) and is
also readable from YAML (`--config file.yaml`; flags given on the command line win).
Validation lives in each dataclass's `__post_init__` and raises UAEError naming the setting."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from uae.errors import UAEError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, aliases: Sequence[str] = (), **kw) -> Any:
    """A dataclass field with help text (and extra flag spellings) for the CLI."""
    meta = {"help": help, "aliases": tuple(aliases)}
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


def build_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or cls.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with any of the settings below")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _base_type(hints[f.name])
        names = ["--" + f.name] + list(f.metadata.get("aliases", ()))
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            if f.default is False:
                kw["action"] = "store_true"
            else:
                kw.update(type=_bool, metavar="BOOL")
        else:
            kw["type"] = tp if tp in (int, float, str) else str
            if is_list:
                kw["nargs"] = "+"
        parser.add_argument(*names, **kw)
    return parser


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UAEError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """CLI flags over YAML (`--config`) over the dataclass defaults."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    cfg_path = args.pop("config", None)
    if cfg_path:
        path = Path(cfg_path)
        if not path.is_file():
            raise UAEError(f"--config {cfg_path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UAEError(f"--config {cfg_path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise UAEError(f"--config {cfg_path} must hold a mapping of setting: value")
        values.update(loaded)
    values.update(args)
    return from_dict(cls, values, source=cfg_path or "command line")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config next to results (YAML, atomically)."""
    from uae.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
