"""Every shipped config parses into its typed config, and the tiny ones run as written (the
embedded tiny checkpoint, the captioned sample photos, no --data)."""

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GRPO = sorted((ROOT / "configs" / "grpo").glob("*.yaml"))
SFT = sorted((ROOT / "configs" / "sft").glob("*.yaml"))


@pytest.mark.parametrize("path", GRPO + SFT, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_parses(path):
    from uae.config import parse_config
    from uae.train import parse
    from uae.methods.sft import SFTConfig

    data = [] if "data" in yaml.safe_load(path.read_text()) else ["--data", "x"]
    if path.parent.name == "sft":
        cfg = parse_config(SFTConfig, ["--config", str(path), *data])
        assert cfg.max_steps >= 1
    else:
        configs = parse(["--config", str(path), *data])
        stage = yaml.safe_load(path.read_text())["stage"]
        assert [c.stage for c in configs] == (["cold_start", "g4u", "u4g"] if stage == "all" else [stage])


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
@pytest.mark.parametrize("name", ["tiny_u4g", "tiny_g4u", "tiny_cold_start", "tiny_all"])
def test_tiny_grpo_configs_run_as_written(name, tmp_path, monkeypatch):
    import train_grpo

    monkeypatch.chdir(ROOT)
    out = tmp_path / name
    assert train_grpo.main(["--config", f"configs/grpo/{name}.yaml", "--output_dir", str(out), "--max_steps", "1"]) == 0
    finals = [out / "u4g" / "final"] if name == "tiny_all" else [out / "final"]
    assert all((f / "uae_checkpoint.json").exists() for f in finals)


def test_tiny_sft_config_runs_as_written(tmp_path, monkeypatch):
    import train_sft

    monkeypatch.chdir(ROOT)
    out = tmp_path / "sft"
    assert train_sft.main(["--config", "configs/sft/tiny.yaml", "--output_dir", str(out), "--max_steps", "2",
                           "--validation_steps", "0"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_sample_captions_cover_the_sample_photos():
    lines = [json.loads(l) for l in (ROOT / "Unified-Bench" / "UniBench" / "sample.jsonl").read_text().splitlines()]
    photos = sorted(p.name for p in (ROOT / "Unified-Bench" / "UniBench" / "sample").iterdir())
    assert sorted(Path(r["image"]).name for r in lines) == photos and all(len(r["caption"].split()) > 20 for r in lines)


@pytest.mark.parametrize("module, argv, flag", [
    ("uae.apps.demo:main", ["--input_te", "a cube", "--output_pa", "x.png"], "--input_te"),
    ("uae.apps.unibench:main", ["--model_arg", "{}"], "--model_arg"),
    ("uae.train:grpo_main", ["--data", "x", "--max_iter", "2"], "--max_iter"),
    ("uae.apps.score_i2i:main", ["--image", "a", "--ref_path", "b"], "--image"),
    ("uae.apps.report:main", ["run", "--conf", "c.yaml"], "--conf"),
    ("uae.apps.report:main", ["compare", "a", "b", "--output_dir", "o", "--pape"], "--pape"),
    ("uae.apps.build_checkpoint:main", ["--ou", "x"], "--ou"),
])
def test_a_mistyped_flag_is_an_error_not_an_abbreviation(module, argv, flag, capsys):
    """argparse's prefix matching would read `--model_arg` as `--model_args` and `--input_te` as
    `--input_text`; only the declared aliases are other spellings."""
    import importlib

    module, main = module.split(":")
    assert getattr(importlib.import_module(module), main)(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and flag in err and len(err.strip().splitlines()) == 1


def test_declared_aliases_still_work():
    from uae.train import parse

    cfg = parse(["--data", "x", "--max_iterations", "3", "--adv_std_scope", "group"])[0]
    assert (cfg.max_steps, cfg.scale_rewards) == (3, "group")


def test_positional_and_required_fields(tmp_path):
    """A positional field is read without a flag (a list takes one or more values, anywhere among
    the flags); a field without a default is required, from the command line or the YAML."""
    from dataclasses import dataclass

    from uae.config import build_parser, check_fields, field, parse_config
    from uae.errors import UAEError

    @dataclass
    class Cfg:
        inputs: list[str] = field(positional=True, metavar="IN", help="folders to read")
        out: str = field(help="folder to write")
        n: int = field(1, min=1, help="how many")

    assert parse_config(Cfg, ["a", "b", "--out", "o"]) == Cfg(["a", "b"], "o", 1)
    assert parse_config(Cfg, ["--out", "o", "--n", "2", "a"]) == Cfg(["a"], "o", 2)
    given = tmp_path / "c.yaml"
    given.write_text("out: from_yaml\nn: 3\n")
    assert parse_config(Cfg, ["a", "--config", str(given)]) == Cfg(["a"], "from_yaml", 3)
    assert parse_config(Cfg, ["a", "--config", str(given), "--out", "o"]).out == "o"
    with pytest.raises(UAEError, match="the following arguments are required: --out"):
        parse_config(Cfg, ["a"])
    with pytest.raises(UAEError, match="the following arguments are required: IN"):
        parse_config(Cfg, ["--out", "o"])
    text = build_parser(Cfg, prog="tool sub").format_help()
    assert text.startswith("usage: tool sub") and "IN [IN ...]" in text and "folder to write (required)" in text

    @dataclass
    class WithDefaults:
        n: int = field(3, positional=True, help="a number")
        kinds: list[str] = field(["a"], positional=True, choices=["a", "b"], help="kinds")

        def __post_init__(self):
            check_fields(self)

    assert parse_config(WithDefaults, []) == WithDefaults(3, ["a"])
    assert parse_config(WithDefaults, ["5", "b", "a"]) == WithDefaults(5, ["b", "a"])
    given.write_text("n: 7\n")
    assert parse_config(WithDefaults, ["--config", str(given)]) == WithDefaults(7, ["a"])
    with pytest.raises(UAEError, match="^kinds c: choose from a, b"):
        parse_config(WithDefaults, ["5", "c"])
