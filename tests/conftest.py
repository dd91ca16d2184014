"""Shared fixtures: everything runs on CPU, offline, on tiny random checkpoints built here."""

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
    from uae.tiny import build_checkpoint

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
