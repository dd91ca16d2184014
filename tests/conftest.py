"""Shared fixtures: everything runs on CPU, offline, on tiny random checkpoints built here."""

import contextlib
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The embedded default checkpoint is built into a per-session cache, not ~/.cache."""
    os.environ["UAE_CACHE"] = str(tmp_path_factory.mktemp("uae-cache"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from uae.random_weights import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_uae(tiny_ckpt):
    """A loaded tiny UAE shared by read-only tests."""
    from uae.models.uae import UAE

    return UAE.from_pretrained(str(tiny_ckpt), device="cpu")


@pytest.fixture(scope="session")
def photo(tmp_path_factory) -> Path:
    """A real photograph (scikit-image ships it), non-square after a crop."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "astronaut.jpg"
    Image.fromarray(data.astronaut()[:, 64:]).save(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Every test starts (and leaves) with no accelerate state: trainers create their Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------- shared helpers

ROOT = Path(__file__).resolve().parent.parent
REFS = ROOT / "Unified-Bench" / "UniBench" / "sample"            # six reference photos
PAIRS = ROOT / "Unified-Bench" / "UniBench" / "sample.jsonl"     # the same with long captions
TINY_GRPO = {"cold_start": "tiny_cold_start.yaml", "g4u": "tiny_g4u.yaml", "u4g": "tiny_u4g.yaml"}


def read_metrics(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_g4u(out, *flags, reward=None) -> int:
    """train_grpo.py's stage 2 from the tiny YAML into `out` on the tiny scorers, quietly (no
    checkpoints, no image grids unless `flags` ask: a later flag wins); returns the exit code."""
    import train_grpo

    argv = ["--config", "tiny_g4u", "--output_dir", out, "--scorer_weights", "tiny", "--checkpointing_steps", 0,
            "--image_log_steps", 0, *flags]
    return train_grpo.main([str(a) for a in argv], reward=reward)


def timeless(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock ones (the only values two identical runs may differ in)."""
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "seconds_per_step"} for r in records]


def grpo_config(stage: str, ckpt, out, *extra):
    """A stage's config from its tiny YAML, on `ckpt`, the sample photos and the tiny scorers."""
    from uae.train import parse

    return parse(["--config", str(ROOT / "configs" / "grpo" / TINY_GRPO[stage]), "--stage", stage, "--checkpoint",
                  str(ckpt), "--data", str(REFS), "--output_dir", str(out), "--scorer_weights", "tiny",
                  *map(str, extra)])[0]


@pytest.fixture
def grpo_recipe(tmp_path):
    """recipe(stage, ckpt, *flags, reward=None, setup=True): a stage's recipe on a fresh Run (set up:
    `run.set_up(recipe)`, its setup prepared and attached)."""
    def make(stage, ckpt, *extra, reward=None, setup=True, out=None):
        from accelerate.state import AcceleratorState

        from uae.methods.cold_start import ColdStartRecipe
        from uae.methods.g4u import G4URecipe
        from uae.methods.u4g import U4GRecipe
        from uae.training.run import Run

        AcceleratorState._reset_state(reset_partial_state=True)
        # A test may set up several recipes in one folder: each starts it afresh (--overwrite_output_dir).
        fresh = () if "--resume_from_checkpoint" in map(str, extra) else ("--overwrite_output_dir",)
        run = Run(grpo_config(stage, ckpt, out or tmp_path / f"run-{stage}", *extra, *fresh), "test")
        recipe = ColdStartRecipe(run) if stage == "cold_start" else \
            {"g4u": G4URecipe, "u4g": U4GRecipe}[stage](run, reward=reward)
        if setup:
            run.set_up(recipe)
        return recipe
    return make


@pytest.fixture
def interrupt_and_resume(tmp_path, monkeypatch):
    """check(train, crash_at, compare): `train(out, *flags)` (returning an exit code) runs once straight into a/, once
    into b/ interrupted right after the checkpoint of step `crash_at` and then resumed with
    --resume_from_checkpoint latest. The files `compare` (paths relative to final/) must be equal
    bit for bit, and the metrics equal but for wall-clock times. Returns (a, b)."""
    from accelerate.state import AcceleratorState

    from uae.training.checkpointing import Checkpoints

    def check(train, crash_at: int, compare: list[str]):
        import torch
        from safetensors.torch import load_file

        a, b = tmp_path / "a", tmp_path / "b"
        assert train(a) == 0
        real_save = Checkpoints.save

        def crash(self, acc, step, config):
            path = real_save(self, acc, step, config)
            if step == crash_at:
                raise KeyboardInterrupt("simulated interruption")
            return path

        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setattr(Checkpoints, "save", crash)
        with pytest.raises(KeyboardInterrupt):
            train(b)
        monkeypatch.setattr(Checkpoints, "save", real_save)
        assert not (b / "final").exists()
        AcceleratorState._reset_state(reset_partial_state=True)
        assert train(b, "--resume_from_checkpoint", "latest") == 0
        for rel in compare:
            x, y = load_file(str(a / "final" / rel)), load_file(str(b / "final" / rel))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
        assert timeless(read_metrics(a)) == timeless(read_metrics(b))
        return a, b
    return check


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is faster than two contended ones
    (measured 5-10x for the tiny Janus / captioner / pipeline); restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Two of the sample photos, as held-out references."""
    import shutil

    d = tmp_path_factory.mktemp("held_out")
    for name in ("camera.jpg", "coffee.jpg"):
        shutil.copy(REFS / name, d / name)
    return d



@contextlib.contextmanager
def cpu_server(model, folder):
    """A real OpenAI-compatible server: `transformers serve` of the local `model` on CPU, offline, one
    torch thread (uae.remote.transformers_serve), its log in folder/serve.log; yields its base URL."""
    from uae.remote import transformers_serve

    env = {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    with transformers_serve(model, Path(folder) / "serve.log", device="cpu", env=env) as url:
        yield url


def pytest_collection_modifyitems(items):
    """A resume test trains twice (interrupted, then resumed) and once more in one go: it is slow,
    whatever file it is in."""
    for item in items:
        if "interrupt_and_resume" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
