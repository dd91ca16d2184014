"""Stage 3 on a diffusers pipeline (`train_grpo.py --stage u4g --model pipeline`), on the tiny SD3
and the tiny FLUX: the trained LoRA loads into a plain diffusers pipeline (and the runner) and
changes its images, a toy reward rises, a run killed with SIGKILL resumes bit-identically, the
held-out evaluation runs from the kept conditioning, and bad settings are one-line errors.
(2 processes = 1: tests/training/test_multiprocess.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REFS, ROOT, read_metrics, timeless
from rewards import TargetImageReward

GENERATORS = ["tiny", "tiny-flux"]
STEPS = 4  # denoising steps of the images compared


def u4g(out, generator, *flags, reward=None) -> int:
    """train_grpo.py --stage u4g on a tiny pipeline, from the tiny YAML, on the tiny scorers, quietly."""
    import train_grpo

    argv = ["--config", "tiny_u4g", "--model", "pipeline", "--generator", generator, "--output_dir", out,
            "--scorer_weights", "tiny", "--checkpointing_steps", 0, "--image_log_steps", 0, *flags]
    return train_grpo.main([str(a) for a in argv], reward=reward)


def _images(pipe, prompt="a red cube on a table"):
    out = pipe(prompt=prompt, num_inference_steps=STEPS, height=64, width=64, output_type="np",
               generator=torch.Generator("cpu").manual_seed(0)).images
    return np.asarray(out, dtype=np.float64) * 255


def _plain(generator):
    from uae.random_weights.unified import resolve
    from uae.unified.pipeline import load_text_to_image

    pipe = load_text_to_image(resolve(generator, "generator"), torch.float32, "--generator")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# FLUX's run is slow (~50 s on 2 cores): the fast tier trains the SD3 one.
@pytest.mark.parametrize("generator", ["tiny", pytest.param("tiny-flux", marks=pytest.mark.slow)])
def test_the_trained_lora_loads_into_plain_diffusers_and_changes_the_images(generator, tmp_path, capsys):
    out = tmp_path / "run"
    # Captioned by the tiny captioner; a larger learning rate so that 2 iterations move the images.
    assert u4g(out, generator, "--captioner", "tiny", "--max_steps", 2, "--learning_rate", 0.05,
               "--eval_steps", 2) == 0, capsys.readouterr().err
    final = out / "final"
    manifest = json.loads((final / "uae_checkpoint.json").read_text())
    assert manifest["model"] == "pipeline" and manifest["generator_lora"] == "generator_lora"
    assert manifest["backend"]["backend"] == ("flux" if generator == "tiny-flux" else "sd3")
    captions = [json.loads(line)["caption"] for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == len(list(REFS.iterdir())) and all(captions)
    rec = read_metrics(out)
    assert [r["step"] for r in rec if "eval/overall" in r] == [0, 2]  # evaluated from the kept conditioning
    # The training forward recomputes the rollout's log-probs exactly: the first update's ratio is 1.
    assert all(r["first_ratio_min"] == r["first_ratio_max"] == 1.0 for r in rec if "first_ratio_min" in r)
    assert len([r for r in rec if "first_ratio_min" in r]) == 2

    base = _images(_plain(generator))
    pipe = _plain(generator)
    pipe.load_lora_weights(str(final / "generator_lora"))  # what a user of plain diffusers does
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)  # the run's rank and alpha (tiny_u4g.yaml), not alpha = rank
    trained = _images(pipe)
    assert np.abs(trained - base).mean() > 0.5, np.abs(trained - base).mean()  # levels of 0..255

    # uae-export fuses it into the transformer: a plain pipeline folder, the same images without a LoRA.
    from uae.apps import export, gen_bench
    from uae.unified.pipeline import load_text_to_image

    assert export.main(["--checkpoint", str(final), "--output_dir", str(tmp_path / "exported")]) == 0
    fused = load_text_to_image(str(tmp_path / "exported"), torch.float32, "--generator")
    fused.set_progress_bar_config(disable=True)
    assert not getattr(fused.transformer, "peft_config", None)
    assert np.abs(_images(fused) - trained).max() < 1.0  # the fuse's rounding only

    # uae-gen-bench --model pipeline --generator_lora: GenEval's layout, other images than the base's.
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"tag": "single_object", "include": [{"class": "cube", "count": 1}],
                                "prompt": "a photo of a cube"}) + "\n")
    for name, extra in (("bench_with", ["--generator_lora", final / "generator_lora"]), ("bench_without", [])):
        assert gen_bench.main([str(a) for a in ["--benchmark", "geneval", "--prompts", meta, "--output_dir",
                                                tmp_path / name, "--model", "pipeline", "--generator", generator,
                                                "--images_per_prompt", 1, "--steps", 2, "--height", 64, "--width",
                                                64, *extra]]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "00000" / "samples" / "00000.png"), dtype=np.float64)
            for n in ("bench_with", "bench_without"))
    assert np.abs(a - b).mean() > 0.5

    # The runner loads it too (--generator_lora) and generates other images than without it.
    from uae.apps import unibench

    caps = tmp_path / "caps"
    caps.mkdir()
    for p in REFS.iterdir():
        (caps / f"{p.stem}.txt").write_text(f"a photo of {p.stem}")
    for name, extra in (("with", ["--generator_lora", final / "generator_lora"]), ("without", [])):
        assert unibench.main([str(a) for a in ["--model", "pipeline", "--generator", generator, "--captions_from", caps,
                                               "--ref_path", REFS, "--output_dir", tmp_path / name, "--steps", 2,
                                               "--height", 64, "--width", 64, "--scorer_weights", "tiny", *extra]]) == 0
    moved = [np.abs(np.asarray(Image.open(tmp_path / "with" / "recon" / p.name), dtype=np.float64)
                    - np.asarray(Image.open(p), dtype=np.float64)).mean()
             for p in (tmp_path / "without" / "recon").iterdir()]
    assert len(moved) == len(list(REFS.iterdir())) and min(moved) > 0.5, moved


@pytest.mark.slow  # measured ~1.5 s (SD3) / ~2 s (FLUX) per iteration on 2 cores
@pytest.mark.parametrize("generator, iterations", [("tiny", 60), ("tiny-flux", 30)])
def test_a_toy_reward_rises(generator, iterations, tmp_path):
    """Reward = similarity to a white image. The tiny SD3's reward rises more slowly (measured: +0.010
    in 30 iterations against a within-batch std of 0.004; FLUX passed at 30)."""
    out = tmp_path / "learn"
    white = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    assert u4g(out, generator, "--use_data_captions", "--max_steps", iterations, "--learning_rate", 0.03,
               "--group_size", 8, "--sample_batch_size", 8, "--noise_level", 1.0, "--beta", 0,
               reward=TargetImageReward(white)) == 0
    rec = read_metrics(out)
    first = np.mean([r["reward_mean"] for r in rec[:5]])
    last = np.mean([r["reward_mean"] for r in rec[-5:]])
    noise = np.mean([r["reward_std"] for r in rec[:5]])
    assert last - first > 3 * noise, (first, last, noise)


def _launch(out, generator, *flags):
    cmd = [sys.executable, str(ROOT / "train_grpo.py"), "--config", "tiny_u4g", "--model", "pipeline", "--generator",
           generator, "--use_data_captions", "--output_dir", str(out), "--scorer_weights", "tiny", "--image_log_steps",
           "0", "--max_steps", "4", "--checkpointing_steps", "2", "--use_ema", "--ema_every", "1", *map(str, flags)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # three runs in subprocesses
@pytest.mark.parametrize("generator", GENERATORS)
def test_a_run_killed_with_sigkill_resumes_bit_identically(generator, tmp_path):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    straight = _launch(a, generator)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]
    killed = _launch(b, generator)
    deadline = time.time() + 600
    while not (b / "checkpoint-2").is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (b / "final").exists()
    resumed = _launch(b, generator, "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    x, y = (load_file(str(d / "final" / "generator_lora" / "pytorch_lora_weights.safetensors")) for d in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert timeless(read_metrics(a)) == timeless(read_metrics(b))


def test_bad_settings_are_one_line_errors(tmp_path, capsys, tiny_ckpt):
    def err(*flags, generator="tiny"):
        err.n = getattr(err, "n", 0) + 1
        assert u4g(tmp_path / f"bad{err.n}", generator, *flags) != 0
        text = capsys.readouterr().err.strip()
        assert "Traceback" not in text
        return text.splitlines()[-1]

    assert "give --captioner" in err()  # no prompts: neither a captioner nor the data's captions
    assert "guides by its guidance embedding" in err("--use_data_captions", "--negative_prompt", "blurry",
                                                     generator="tiny-flux")
    assert "is a UAE checkpoint" in err("--use_data_captions", generator=str(tiny_ckpt))
    assert "no diffusers pipeline there" in err("--use_data_captions", generator=str(tmp_path))
    assert "multiple of" in err("--use_data_captions", "--resolution", 60)
    # --model uae takes none of a pipeline's settings.
    import train_grpo

    assert train_grpo.main(["--config", "tiny_u4g", "--generator", "tiny", "--output_dir", str(tmp_path / "u")]) != 0
    assert "--model pipeline's settings" in capsys.readouterr().err.strip().splitlines()[-1]
    # uae-gen-bench: a pipeline needs --generator; --generator_lora is a pipeline's.
    from uae.apps import gen_bench

    common = ["--benchmark", "geneval", "--prompts", str(tmp_path / "m.jsonl"), "--output_dir", str(tmp_path / "g")]
    for flags, message in ((["--model", "pipeline"], "give --generator"),
                           (["--generator_lora", str(tmp_path)], "--model pipeline's")):
        assert gen_bench.main(common + flags) != 0
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
