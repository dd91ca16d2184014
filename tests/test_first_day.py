"""A new user's first day: run folders that cannot mix, outputs checked before the work, settings
that cannot work refused before anything loads, one-line errors where tracebacks were."""

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from conftest import PAIRS, REFS, ROOT


# ----------------------------------------------------------------------------- run folders

def _sft(out, ckpt, *extra):
    import train_sft

    return train_sft.main(["--config", str(ROOT / "configs/sft/tiny.yaml"), "--checkpoint", str(ckpt),
                           "--output_dir", str(out), "--validation_steps", "0", *map(str, extra)])


def the_error(capsys) -> str:
    """The command's one error line; nothing else it printed is an error or a traceback (warnings,
    such as the embedded tiny checkpoint's, may stand above it)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if " ERROR " in line]
    # One line, and the last: nothing (a traceback, a message's second line) comes after it.
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-3000:]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links followed to their targets' names, not contents)."""
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_ckpt, tmp_path_factory):
    """A finished 2-step SFT run, copied afresh for each test that changes it."""
    out = tmp_path_factory.mktemp("sft") / "run"
    assert _sft(out, tiny_ckpt, "--max_steps", 2) == 0
    return out


@pytest.fixture
def used_folder(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


def test_a_fresh_run_into_a_used_folder_is_refused(used_folder, tiny_ckpt, capsys):
    before = _snapshot(used_folder)
    assert _sft(used_folder, tiny_ckpt, "--max_steps", 1) == 2
    err = the_error(capsys)
    assert "holds a run" in err and "--overwrite_output_dir" in err and \
        "--resume_from_checkpoint latest" in err
    assert _snapshot(used_folder) == before


def test_overwrite_output_dir_starts_again_and_keeps_the_cache(used_folder, tiny_ckpt):
    (used_folder / "cache").mkdir(exist_ok=True)
    (used_folder / "cache" / "kept").write_text("keyed by content")
    (used_folder / "grids").mkdir()
    (used_folder / "grids" / "iter_000099.png").write_bytes(b"an older run's grid")
    assert _sft(used_folder, tiny_ckpt, "--max_steps", 1, "--overwrite_output_dir") == 0
    names = sorted(p.name for p in used_folder.iterdir())
    assert "checkpoint-1" in names and "checkpoint-2" not in names and "grids" not in names
    assert (used_folder / "cache" / "kept").read_text() == "keyed by content"
    assert [r["step"] for r in map(json.loads, (used_folder / "metrics.jsonl").read_text().splitlines())] == [1]


def test_a_resume_with_other_settings_is_refused_naming_them(used_folder, tiny_ckpt, capsys):
    """The issue's case: --learning_rate changed on a resume trained 0 steps and overwrote final/."""
    before = _snapshot(used_folder)
    assert _sft(used_folder, tiny_ckpt, "--max_steps", 4, "--learning_rate", 0.01, "--lora_rank", 2,
                "--resume_from_checkpoint", "latest") == 2
    err = the_error(capsys)
    assert "learning_rate 0.001 -> 0.01" in err and "lora_rank 4 -> 2" in err, err
    assert _snapshot(used_folder) == before


def test_a_resume_at_or_past_max_steps_changes_nothing(used_folder, tiny_ckpt, capsys):
    before = _snapshot(used_folder)
    assert _sft(used_folder, tiny_ckpt, "--max_steps", 1, "--resume_from_checkpoint", "latest") == 0
    assert "at step 2, at or past --max_steps 1: nothing to train" in capsys.readouterr().err
    assert _snapshot(used_folder) == before


def test_a_resume_may_change_what_only_runs_the_run(used_folder, tiny_ckpt):
    """Cadence, logging and a longer max_steps (constant schedule) may change on a resume."""
    assert _sft(used_folder, tiny_ckpt, "--max_steps", 3, "--checkpointing_steps", 7, "--log_level", "WARNING",
                "--resume_from_checkpoint", "latest") == 0
    steps = [r["step"] for r in map(json.loads, (used_folder / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3] and (used_folder / "checkpoint-3").is_dir()


def test_max_steps_counts_as_a_setting_under_a_decaying_schedule():
    from uae.training.checkpointing import changed_settings
    from uae.methods.sft import SFTConfig

    for schedule, refused in (("constant_with_warmup", []), ("cosine", ["max_steps 10 -> 20"])):
        before = SFTConfig(data="x", lr_scheduler=schedule, max_steps=10)
        now = SFTConfig(data="x", lr_scheduler=schedule, max_steps=20, log_level="DEBUG", report_to="none")
        assert changed_settings(now, vars(before), vars(now)) == refused


def test_a_stage_into_another_stages_folder_is_refused(used_folder, capsys):
    """The issue's g4u --model pipeline case: a run into tiny_g4u.yaml's used folder would have left
    the old UAE parts beside its captioner_lora in final/."""
    from uae.training.checkpointing import claim_output_dir
    from uae.train import parse

    cfg = parse(["--config", str(ROOT / "configs/grpo/tiny_g4u.yaml"), "--model", "pipeline", "--captioner", "tiny",
                 "--generator", "tiny", "--output_dir", str(used_folder)])[0]
    with pytest.raises(Exception, match="holds a run"):
        claim_output_dir(cfg, vars(cfg))


def test_final_is_written_whole_with_nothing_of_an_earlier_one(used_folder, tiny_ckpt):
    (used_folder / "final" / "stale_part").mkdir()
    assert _sft(used_folder, tiny_ckpt, "--max_steps", 3, "--resume_from_checkpoint", "latest") == 0
    assert not (used_folder / "final" / "stale_part").exists()
    assert not [p for p in used_folder.iterdir() if p.name.startswith(".final")]


def test_written_weights_are_readable_by_others(used_folder):
    """safetensors writes its files 0600; outputs get the umask's permissions like any plain write."""
    from uae.files import FILE_MODE

    files = [p for p in used_folder.rglob("*") if p.is_file() and not p.is_symlink()
             and not any(part.is_symlink() for part in p.parents)]
    assert any(p.suffix == ".safetensors" and "final" in p.parts for p in files)
    assert {str(p.relative_to(used_folder)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
            if stat.S_IMODE(p.stat().st_mode) != FILE_MODE} == {}


# ----------------------------------------------------------------------------- --stage all

def test_stage_all_refuses_a_one_stage_config(capsys):
    """The README once ran `--stage all --config configs/grpo/u4g.yaml`: stages 1 and 2 got stage 3's
    learning rate, group size, clip range and KL weight."""
    from uae.train import grpo_main as main

    assert main(["--stage", "all", "--config", str(ROOT / "configs/grpo/u4g.yaml"), "--data", "x"]) == 2
    err = the_error(capsys)
    assert "one-stage config (stage: u4g)" in err and "configs/grpo/all.yaml" in err


def test_all_yaml_gives_each_stage_its_own_published_settings():
    """configs/grpo/all.yaml's sections equal the one-stage configs, but for the run folder."""
    import dataclasses

    from uae.train import parse

    for cfg in parse(["--config", str(ROOT / "configs/grpo/all.yaml"), "--data", "x"]):
        one = parse(["--config", str(ROOT / f"configs/grpo/{cfg.stage}.yaml"), "--data", "x"])[0]
        differ = {k for k, v in dataclasses.asdict(cfg).items() if v != getattr(one, k)}
        assert differ == {"output_dir"}, (cfg.stage, differ)


# ----------------------------------------------------------------------------- outputs checked first

@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model or scorer load fails the test: the command must stop before."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    import sys

    import uae.apps.demo, uae.apps.score_i2i, uae.apps.unibench, uae.train  # noqa: E401,F401  (the commands tested)
    from uae.models.uae import UAE
    from uae.scoring import scorers

    monkeypatch.setattr(UAE, "from_pretrained", refuse)
    # Every module that imported load_scorer by name holds its own reference: replace each.
    for module in [m for name, m in sys.modules.items() if name.startswith("uae")]:
        if getattr(module, "load_scorer", None) is scorers.load_scorer:
            monkeypatch.setattr(module, "load_scorer", refuse)
    monkeypatch.setattr(scorers, "load_scorer", refuse)


@pytest.mark.parametrize("command", [
    ["demo", "--input_text", "a cube", "--output_path", "/proc/nope/x.png"],
    ["demo", "--input_text", "a cube", "--output_path", "README.md/x.png"],
    ["demo", "--prompt_file", "PROMPTS", "--output_dir", "/proc/nope"],
    ["unibench", "--output_dir", "/proc/nope"],
    ["sft", "--output_dir", "/proc/nope"],
    ["score", "--image_path", str(REFS), "--ref_path", str(REFS), "--output_file", "/proc/nope/s.json"],
    ["grpo", "--stage", "u4g", "--output_dir", "README.md/run"],
], ids=lambda c: " ".join(c[:1] + c[-2:]))
def test_an_output_that_cannot_be_written_is_found_before_the_work(command, nothing_loads, tmp_path, monkeypatch,
                                                                   capsys):
    import importlib

    monkeypatch.chdir(ROOT)
    (tmp_path / "p.txt").write_text("a cube\n")
    module, main = {"demo": ("uae.apps.demo", "main"), "unibench": ("uae.apps.unibench", "main"),
                    "sft": ("uae.train", "sft_main"), "score": ("uae.apps.score_i2i", "main"),
                    "grpo": ("uae.train", "grpo_main")}[command[0]]
    argv = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in command[1:]]
    if command[0] in ("sft", "grpo"):
        argv = ["--data", str(PAIRS), *argv]
    assert getattr(importlib.import_module(module), main)(argv) == 2
    err = the_error(capsys)
    assert "cannot write there" in err and argv[-1] in err, err
    assert "is a file, not a folder" in err if "README.md" in argv[-1] else "No such file" in err


# ----------------------------------------------------------------------------- settings refused before loading

def test_score_i2i_with_no_matched_pair_exits_2_naming_the_files(tmp_path, nothing_loads, capsys):
    from PIL import Image

    from uae.apps.score_i2i import main

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert main(["--image_path", str(tmp_path), "--ref_path", str(REFS), "--output_file", str(tmp_path / "s.json"),
                 "--weights", "tiny"]) == 2
    err = the_error(capsys)
    assert "no reconstruction" in err and "a.png" in err and "astronaut.jpg" in err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("stage", ["g4u", "u4g"])
def test_more_prompts_than_references_is_refused_before_any_model_loads(stage, nothing_loads, tmp_path, capsys):
    """The issue's case: --prompts_per_iteration 48 with 6 references failed after captioning them all."""
    from uae.train import grpo_main as main

    assert main(["--config", str(ROOT / f"configs/grpo/tiny_{stage}.yaml"), "--prompts_per_iteration", "48",
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = the_error(capsys)
    assert "--prompts_per_iteration 48 is more than the 6 reference(s)" in err


@pytest.mark.parametrize("flag", ["--height", "--width"])
def test_demo_refuses_a_size_sd3_cannot_make_before_loading(flag, nothing_loads, tmp_path, capsys):
    from uae.apps.demo import main

    assert main(["--input_text", "a cube", flag, "100", "--output_path", str(tmp_path / "x.png")]) == 2
    err = the_error(capsys)
    assert f"{flag} 100 must be a multiple of 16" in err


def test_demo_on_a_run_folder_points_to_its_final(finished_run, tmp_path, capsys):
    from uae.apps.demo import main

    assert main(["--checkpoint", str(finished_run), "--input_text", "a cube", "--output_path",
                 str(tmp_path / "x.png")]) == 2
    err = the_error(capsys)
    assert "training run's folder" in err and f"--checkpoint {finished_run / 'final'}" in err


# ----------------------------------------------------------------------------- offline

def test_offline_official_scorers_fail_at_once_saying_what_to_do(tmp_path, monkeypatch, capsys):
    """Without the network and without HF_HUB_OFFLINE, the libraries retried for about a minute and
    never mentioned the offline options."""
    import time

    from huggingface_hub import constants

    from uae import hub
    from uae.apps.score_i2i import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout_s=3.0: False)
    t0 = time.monotonic()
    assert main(["--image_path", str(REFS), "--ref_path", str(REFS), "--output_file", str(tmp_path / "s.json"),
                 "--models", "clip"]) == 2
    assert time.monotonic() - t0 < 30
    err = the_error(capsys)
    assert "cannot be reached" in err, err
    assert "--weights tiny" in err and "--scorer_weights tiny" in err and "HF_HUB_OFFLINE=1" in err


def test_offline_mode_without_the_files_says_what_to_do(tmp_path, capsys):
    """HF_HUB_OFFLINE=1 (as in these tests) with no cached copy: the libraries' error, on one line,
    with the offline options."""
    from uae.apps.score_i2i import main

    assert main(["--image_path", str(REFS), "--ref_path", str(REFS), "--output_file", str(tmp_path / "s.json"),
                 "--models", "clip"]) == 2
    err = the_error(capsys)
    assert "could not load scorer clip" in err and "--weights tiny" in err


def test_a_cached_repo_is_used_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from uae import hub

    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--name" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--name" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout_s=3.0: False)
    assert Path(hub.local_or_cached("org/name", "scorer x")) == snapshot
    with pytest.raises(Exception, match="cannot be reached"):
        hub.local_or_cached("org/other", "scorer x")


def test_a_mistyped_lr_scheduler_is_refused_when_parsed():
    """It was a free string, found only by diffusers' get_scheduler after the models had loaded."""
    from uae.config import parse_config
    from uae.errors import UAEError
    from uae.methods.sft import SFTConfig

    with pytest.raises(UAEError, match="--lr_scheduler.*'cosin'.*constant_with_warmup"):
        parse_config(SFTConfig, ["--data", "x", "--lr_scheduler", "cosin"])
    with pytest.raises(UAEError, match="--lr_scheduler cosin: choose from constant, constant_with_warmup, linear"):
        SFTConfig(data="x", lr_scheduler="cosin")  # from a YAML file


def test_the_grpo_bar_shows_the_reward(tmp_path, capsys):
    from uae.train import grpo_main as main

    assert main(["--config", str(ROOT / "configs/grpo/tiny_u4g.yaml"), "--max_steps", "1",
                 "--output_dir", str(tmp_path / "run")]) == 0
    bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("u4g")]
    assert any("reward=" in line and "loss=" in line for line in bar), bar[-3:]


def test_a_model_trained_from_the_tiny_checkpoint_gets_the_tiny_scorers(tmp_path):
    """--scorer_weights auto: a run's final/ trained from `tiny` (followed through the manifests'
    recorded sources) is no real model; the README's chained tiny commands needed the official
    scorers, from the hub, before."""
    from uae.models.layout import MANIFEST
    from uae.random_weights import embedded_checkpoint, from_tiny

    tiny = embedded_checkpoint()
    sft, grpo, other = tmp_path / "sft" / "final", tmp_path / "grpo" / "final", tmp_path / "other" / "final"
    for folder, source in ((sft, str(tiny)), (grpo, str(sft)), (other, "zhiyuanyan1/UAE")):
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text(json.dumps({"trained_by": "test", "config": {"checkpoint": source}}))
    assert from_tiny("tiny") and from_tiny(str(tiny)) and from_tiny(str(sft)) and from_tiny(str(grpo))
    assert not from_tiny(str(other)) and not from_tiny("zhiyuanyan1/UAE") and not from_tiny(str(tmp_path))
