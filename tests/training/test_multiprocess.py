"""Two CPU processes (torchrun, gloo): every stage ends with identical weights on both ranks, a
GRPO group that spans the ranks gets the advantages of a one-process run with the same seed and
global batch, and the Unified-Bench runner split over two processes writes the JSON of one
process. Also: every accelerate launch config in configs/accelerate/ parses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # two processes (torchrun, gloo) per test

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "ddp_worker.py"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env=None, ok=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def torchrun(nproc, script, *args, env=None, ok=True):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, "--master_addr",
                 "127.0.0.1", "--master_port", _free_port(), script, *args], env=env, ok=ok)


def accelerate_launch(config_file, nproc, script, *args, ok=True):
    return _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes",
                 nproc, "--main_process_port", _free_port(), script, *args], ok=ok)


def launch(nproc, stage, out, ckpt, data, *extra, env=None):
    torchrun(nproc, WORKER, stage, out, ckpt, data, *extra, env=env)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("mp")
    caps = {"astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee", "rocket": "a rocket"}
    for name in caps:
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.jpg")
    (d / "pairs.jsonl").write_text("".join(json.dumps({"image": f"{n}.jpg", "caption": c}) + "\n" for n, c in caps.items()))
    return d / "pairs.jsonl"


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("stage, extra", [
    ("sft", ["--max_train_steps", 2, "--train_batch_size", 1]),
    ("cold_start", ["--max_steps", 2]),
    ("g4u", ["--max_iterations", 2]),
    ("u4g", ["--max_iterations", 2]),
])
def test_two_ranks_end_with_identical_weights(tiny_ckpt, pairs, tmp_path, stage, extra):
    r0, r1 = launch(2, stage, tmp_path / "run", tiny_ckpt, pairs, *extra)
    assert r0["params"] and _same(r0["params"], r1["params"])


def test_janus_end_to_end_two_ranks_end_with_identical_weights(pairs, tmp_path):
    """Stage 2 on Janus with its image tokens in the loss: the LoRA's gradient (caption and image
    log-probs, two forwards of the prepared policy per micro-batch) is all-reduced like any other."""
    r0, r1 = launch(2, "g4u", tmp_path / "run", "tiny", pairs, "--model", "janus", "--max_iterations", 2,
                    "--prompts_per_iteration", 2, "--group_size", 2, "--max_new_tokens", 4, "--learning_rate", 0.05)
    assert r0["params"] and _same(r0["params"], r1["params"])
    assert any(float(a.abs().max()) > 0 for a in r0["advantages"])  # a signal to train on (lora_A is never zero)


def test_all_stages_over_two_processes_hand_every_rank_the_previous_final(tiny_ckpt, pairs, tmp_path):
    """--stage all: each stage starts on every rank from the previous stage's final/, written in
    full before any rank reads it (the non-main ranks once started stage 2 from "None")."""
    out = tmp_path / "all"
    torchrun(2, ROOT / "train_grpo.py", "--stage", "all", "--config", "tiny_all", "--checkpoint", tiny_ckpt,
             "--data", pairs, "--output_dir", out, "--scorer_weights", "tiny", "--max_steps", 1, "--group_size", 2,
             "--sample_batch_size", 2, "--image_log_steps", 0, "--checkpointing_steps", 0)
    for stage, source in (("g4u", "cold_start"), ("u4g", "g4u")):
        manifest = json.loads((out / stage / "final" / "uae_checkpoint.json").read_text())
        assert manifest["config"]["checkpoint"] == str(out / source / "final"), stage


def test_group_spanning_ranks_gets_the_one_process_advantages(tiny_ckpt, pairs, tmp_path):
    # One prompt per iteration, group of 4: with 2 processes each rank holds half of the group.
    extra = ["--max_iterations", 2, "--prompts_per_iteration", 1, "--group_size", 4, "--sample_batch_size", 2]
    one = launch(1, "u4g", tmp_path / "one", tiny_ckpt, pairs, *extra)[0]
    two = launch(2, "u4g", tmp_path / "two", tiny_ckpt, pairs, *extra)
    assert len(one["advantages"]) == 2
    for a2, a2b in zip(two[0]["advantages"], two[1]["advantages"]):
        assert torch.equal(a2, a2b)                    # both ranks see the whole group's advantages
    # Iteration 1 (same weights): the same rollouts, rewards and advantages as one process.
    assert torch.allclose(one["advantages"][0], two[0]["advantages"][0], atol=1e-5)
    # Iteration 2 follows one optimizer step whose gradient was summed in another order (two
    # ranks' all-reduce vs one process): float differences, not different samples.
    assert torch.allclose(one["advantages"][1], two[0]["advantages"][1], atol=1e-2)


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("stage, one, two, tol", [
    # SFT, every DiT weight trained: a global batch of 2 on one process, or 1 per process on two.
    # Captions padded to a fixed length: padded to the batch's longest, a caption's pad rows (which
    # reach the DiT) would depend on the other captions of its batch.
    ("sft", ["--dit_mode", "full", "--max_steps", 2, "--train_batch_size", 2, "--adam_epsilon", 1e-4,
             "--text_padding", "max_length", "--max_caption_tokens", 96],
     ["--dit_mode", "full", "--max_steps", 2, "--train_batch_size", 1, "--adam_epsilon", 1e-4,
      "--text_padding", "max_length", "--max_caption_tokens", 96], 2e-5),
    # Stage 3: one prompt x 4 rollouts, two optimizer steps on shares that take one sample of each
    # block of 2 consecutive ones: each process's own samples, and the union of the two processes'
    # shares is the one process's share (uae.methods.u4g.update_shares).
    ("u4g", ["--max_steps", 1, "--prompts_per_iteration", 1, "--group_size", 4, "--sample_batch_size", 2,
             "--updates_per_iteration", 2],
     ["--max_steps", 1, "--prompts_per_iteration", 1, "--group_size", 4, "--sample_batch_size", 2,
      "--updates_per_iteration", 2], 2e-5),
    # The same on a diffusers pipeline's transformer (--model pipeline): tiny SD3 and tiny FLUX, whose
    # LoRA B weights (from 0) move by ~6e-3 in the two steps. Measured: 2.6e-5 apart on the tiny SD3
    # (AdamW's g / sqrt(v) turns the batching noise of gradients near 0 into moves of up to lr).
    *[("u4g", flags, flags, 1e-4) for flags in (
        ["--model", "pipeline", "--generator", generator, "--use_data_captions", "--max_steps", 1,
         "--prompts_per_iteration", 1, "--group_size", 4, "--sample_batch_size", 2, "--updates_per_iteration", 2]
        for generator in ("tiny", "tiny-flux"))],
])
def test_two_processes_train_the_weights_of_one(tiny_ckpt, pairs, tmp_path, stage, one, two, tol):
    """Data-parallel training (the launch that runs on a CPU: accelerate has no FSDP without GPUs)
    takes the optimizer steps of one process: every sample's randomness is a function of its
    global index, and each step's loss is the mean over the whole global batch. (AdamW's first
    steps move a weight by about lr * sign(gradient): for weights whose gradient is ~1e-10, float
    noise flips the sign; SFT's larger epsilon keeps the comparison about the gradients.)"""
    a = launch(1, stage, tmp_path / "one", tiny_ckpt, pairs, *one)[0]
    b = launch(2, stage, tmp_path / "two", tiny_ckpt, pairs, *two)[0]
    if stage != "sft":  # the first iteration's advantages come before any step: the same, to batching's rounding
        assert torch.allclose(a["advantages"][0], b["advantages"][0], atol=1e-4)
    assert _max_diff(a["params"], b["params"]) < tol   # float noise of batching and all-reduce order only
    moved = max(float(p.abs().max()) for p in a["params"])
    assert moved > 50 * tol  # the weights moved far more than that noise


def test_u4g_ranks_make_the_same_forward_calls_in_every_optimizer_step(tiny_ckpt, pairs, tmp_path):
    """Every optimizer step of stage 3 waits for the process with the most training forwards: the
    shares give each process the same count of its own samples (before, one permutation of both
    ranks' samples gave rank 0 three samples of the first share and one of the second, with seed 0
    in iteration 0). Two prompts x 4 rollouts, one sample per forward, 5 trained steps: 2 samples x
    5 = 10 forwards per rank and optimizer step, 20 per iteration."""
    out = tmp_path / "run"
    launch(2, "u4g", out, tiny_ckpt, pairs, "--max_iterations", 2, "--prompts_per_iteration", 2, "--group_size", 4,
           "--sample_batch_size", 2, "--train_batch_size", 1, "--updates_per_iteration", 2, "--seed", 0)
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_forwards_slowest"], r["train_forwards_mean"]) for r in rec] == [(20.0, 20.0)] * 2


def test_two_process_run_resumes_bit_identically(tiny_ckpt, pairs, tmp_path):
    """Stopped after 2 iterations and resumed for a third, a 2-process stage-3 run ends where the
    uninterrupted one does (trained weights, optimizer, RNG and EMA from the checkpoint)."""
    common = ["--prompts_per_iteration", 2, "--group_size", 2, "--sample_batch_size", 2, "--use_ema", "--ema_every", 1]
    straight = launch(2, "u4g", tmp_path / "a", tiny_ckpt, pairs, "--max_steps", 3, *common)
    launch(2, "u4g", tmp_path / "b", tiny_ckpt, pairs, "--max_steps", 2, *common)
    resumed = launch(2, "u4g", tmp_path / "b", tiny_ckpt, pairs, "--max_steps", 3, "--resume_from_checkpoint", "latest",
                     *common)
    assert _same(straight[0]["params"], resumed[0]["params"]) and _same(resumed[0]["params"], resumed[1]["params"])


def test_g4u_process_without_signal_keeps_step_with_the_other(tiny_ckpt, pairs, tmp_path):
    """Two ranks, one group each; one reference's reward is flat. In the iterations where a rank
    holds only that group it has no token to train on: it must still join the gradient
    all-reduce (a zero loss), or the run would hang or crash."""
    extra = ["--max_iterations", 4, "--prompts_per_iteration", 2, "--group_size", 2, "--max_new_tokens", 6]
    r0, r1 = launch(2, "g4u", tmp_path / "run", tiny_ckpt, pairs, *extra, env={"UAE_TEST_REWARD": "one_flat_image"})
    assert _same(r0["params"], r1["params"])
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 4 and any(r["skipped_groups"] == 1 for r in rec)  # a rank without signal happened


def test_u4g_captions_each_reference_once_when_ranks_sample_differently(tiny_ckpt, pairs, tmp_path):
    """Stage 3's prompts: each reference is captioned by one process, and every process trains on
    the same captions, even when rank 1's sampler gives other texts than rank 0's would (before,
    every rank captioned every reference, and a prompt that only rank 1 had sampled was never
    embedded by rank 0's share of the cache: a crash)."""
    out = tmp_path / "run"
    r0, r1 = launch(2, "u4g", out, tiny_ckpt, pairs, "--max_iterations", 1, "--prompts_per_iteration", 2,
                    env={"UAE_TEST_CAPTION_SKEW": "1"})
    assert (r0["captioned"], r1["captioned"]) == (2, 2)          # 4 references, each captioned once
    captions = [json.loads(line)["caption"] for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and sum(c.endswith("(sampled on rank 1)") for c in captions) == 2
    assert _same(r0["params"], r1["params"])


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_grpo_refuses_sharded_launches_on_every_rank(tiny_ckpt, pairs, tmp_path, kind):
    """FSDP through accelerate's own launcher and config file (on CPU accelerate would otherwise
    fall back to DDP silently); DeepSpeed as its launcher sets it (accelerate launch itself stops
    on a machine without deepspeed installed). The ranks stop with the one-line error before
    loading anything."""
    args = ["train_grpo.py", "--config", "configs/grpo/tiny_u4g.yaml", "--checkpoint", tiny_ckpt, "--data", pairs,
            "--output_dir", tmp_path / "run"]
    if kind == "fsdp":
        proc = accelerate_launch(ROOT / "configs/accelerate/fsdp.yaml", 2, *args, ok=False)
    else:
        proc = torchrun(2, *args, env={"ACCELERATE_USE_DEEPSPEED": "true"}, ok=False)
    assert proc.returncode != 0
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[kind]
    errors = [line for line in proc.stderr.splitlines() if f"{name} launches are not supported" in line]
    # The launcher stops the other rank once one has failed, so it may not get to print its line.
    assert errors and "multi_gpu_ddp.yaml" in errors[0], proc.stderr[-3000:]
    # The scripts' exit code for a UAEError; the only traceback is the launcher's report of its
    # failed children, no frame of ours; nothing was set up.
    assert "exitcode  : 2" in proc.stderr and f'File "{ROOT / "uae"}' not in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()
    # The launcher's summary, printed last, names our error as the root cause (its error file).
    root_cause = proc.stderr[proc.stderr.rindex("Root Cause"):]
    assert f"{name} launches are not supported" in root_cause, proc.stderr[-3000:]


def test_sft_still_launches_with_the_fsdp_config(tiny_ckpt, pairs, tmp_path):
    """SFT of the whole DiT needs FSDP on real GPUs: the refusal is GRPO's only. (On CPU accelerate
    runs it data-parallel; what this shows is that nothing of ours stops it.)"""
    out = tmp_path / "sft"
    accelerate_launch(ROOT / "configs/accelerate/fsdp.yaml", 2, "train_sft.py", "--config", "configs/sft/tiny.yaml",
                      "--checkpoint", tiny_ckpt, "--data", pairs, "--output_dir", out, "--max_steps", 1,
                      "--validation_steps", 0, "--train_batch_size", 1)
    assert (out / "final" / "uae_checkpoint.json").exists()


def test_unibench_over_two_processes_writes_the_one_process_json(tiny_ckpt, tmp_path):
    # 6 references in batches of 2: rank 0 captions and regenerates batches 0 and 2, rank 1 batch 1.
    flags = ["--checkpoint", tiny_ckpt, "--height", 64, "--width", 64, "--steps", 2, "--max_new_tokens", 8,
             "--batch_size", 2, "--models", "clip", "dinov2", "--scorer_weights", "tiny", "--num_workers", 0,
             "--no_cache", "--allow_failures"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        proc = torchrun(n, ROOT / "Unified-Bench" / "run_unibench.py", *flags, "--output_dir", out)
        if n == 2:
            # One log per node: the first process's info lines only (the other logs warnings and errors).
            assert "process 0/2: 2 batch(es)" in proc.stderr and "process 1/2" not in proc.stderr
        runs[n] = json.loads((out / "results.json").read_text())
        runs[n].pop("meta")
        assert (out / "report.html").exists()
    assert runs[1]["summary"]["valid"] == 6 and all(isinstance(c, str) for c in runs[1]["captions"].values())
    assert runs[1] == runs[2]
    for png in (tmp_path / "p1" / "recon").iterdir():  # the same images, byte for byte
        assert png.read_bytes() == (tmp_path / "p2" / "recon" / png.name).read_bytes()


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        cfg = load_config_from_file(str(f))
        assert cfg.num_processes >= 1, f.name
