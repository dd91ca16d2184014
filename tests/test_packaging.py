"""The toolkit as a user installs it: `pip install <checkout>` (a wheel, not editable) into a fresh
virtual environment, then the console scripts from another directory, on the tiny model and the
sample photos that ship inside the package (uae/_data/, setup.py), with a shipped config by name
and by path. The dependencies come from this environment (a .pth file), so only the toolkit itself
is installed: the test takes about a minute, not a 6 GB install."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh virtual environment and an installed copy

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (cmd, proc.stderr[-3000:])
    return proc


def test_the_installed_wheel_works_from_any_directory(tmp_path):
    src = tmp_path / "src"  # a copy of the checkout: the build writes nothing into the repository
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "runs",
                                                             "output", "__pycache__", "results"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "toolkit_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", UAE_CACHE=str(tmp_path / "cache"))
    _run([py, "-m", "pip", "install", "--no-deps", "--quiet", src], tmp_path, env)
    shutil.rmtree(src)  # nothing may be read from the checkout now

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import uae, uae.paths as p; print(uae.__file__); print(p.CONFIG_DIR)"], work, env).stdout
    assert str(site) in where and "_data" in where  # the wheel's package and data, not a checkout's
    bin_ = venv / "bin"
    _run([bin_ / "uae-demo", "--input_text", "a red cube", "--output_path", "cube.png", "--height", 32, "--width", 32,
          "--steps", 2], work, env)
    assert (work / "cube.png").stat().st_size > 0
    samples = site / "uae" / "_data" / "Unified-Bench" / "UniBench" / "sample"
    _run([bin_ / "uae-score", "--weights", "tiny", "--image_path", samples, "--ref_path", samples, "--models", "clip",
          "--num_workers", 0, "--output_file", "scores.json"], work, env)
    assert (work / "scores.json").exists()
    _run([bin_ / "uae-unibench", "--steps", 2, "--height", 32, "--width", 32, "--max_new_tokens", 4, "--models", "clip",
          "--scorer_weights", "tiny", "--num_workers", 0], work, env)
    assert (work / "Unified-Bench" / "results" / "run" / "results.json").exists()
    _run([bin_ / "uae-train-grpo", "--config", "tiny_u4g", "--max_steps", 1, "--output_dir", "by_name"], work, env)
    _run([bin_ / "uae-train-grpo", "--config", site / "uae" / "_data" / "configs" / "grpo" / "tiny_g4u.yaml",
          "--max_steps", 1, "--output_dir", "by_path"], work, env)
    assert (work / "by_name" / "final" / "uae_checkpoint.json").exists()
    assert (work / "by_path" / "final" / "uae_checkpoint.json").exists()
