"""Output people can follow: --help that keeps its examples and shows defaults, only the flags that
apply, progress while captioning, one log per node, no library noise, labelled benchmark numbers,
generated files that git ignores."""

import logging
import re
import subprocess
import sys

import pytest

from conftest import REFS, ROOT


def _help(main, argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps the options at the terminal's width
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> str:
    """The options part of a --help, each option's help on one line (wrapping undone)."""
    return " ".join(text.split("options:", 1)[1].split())


# ----------------------------------------------------------------------------- --help

def test_demo_help_keeps_each_example_on_its_line_and_shows_defaults(capsys, monkeypatch):
    import demo

    out = _help(lambda a: demo.main(a, description=demo.__doc__), [], capsys, monkeypatch)
    examples = [line for line in demo.__doc__.splitlines() if line.strip().startswith("python demo.py")]
    assert len(examples) == 5
    for line in examples:  # each example whole, on a line of its own (argparse's default reflowed them)
        assert line in out.splitlines(), line
    opts = _options(out)
    assert "--seed SEED seed of every caption and image (the release generates with 42) (default: 42)" in opts
    assert "--steps STEPS denoising steps (default: the model's own: UAE's release 40" in opts
    assert "--output_dir OUTPUT_DIR folder written in batch mode (--prompt_file or a folder --input_img) " \
           "(default: output/demo)" in opts
    # No default shown where there is none to show: an off switch, None, or a help that says it already.
    assert "(default: False)" not in opts and "(default: None)" not in opts
    assert "caption sampling top-k (default: llm/generation_config.json's; 0: off) --top_p" in opts


def test_grpo_help_shows_each_stages_default_where_they_differ(capsys, monkeypatch):
    """`--stage all` reads one command line into three configs: a flag's default is per stage."""
    import train_grpo

    from uae.methods import METHODS

    out = _help(lambda a: train_grpo.main(a, description=train_grpo.__doc__), ["--stage", "all"], capsys,
                monkeypatch)
    assert "    accelerate launch --multi_gpu --num_processes 8 train_grpo.py --config configs/grpo/u4g.yaml \\\n" \
           "        --checkpoint zhiyuanyan1/UAE --data /data/images\n" in out  # a shell continuation, as written
    lr = {stage: cls.__dataclass_fields__["learning_rate"].default for stage, cls in ((n, m.config) for n, m in METHODS.items() if m.command == "train_grpo.py")}
    assert len(set(lr.values())) == 3
    opts = _options(out)
    assert "(default: " + ", ".join(f"{s} {v}" for s, v in lr.items()) + ")" in opts
    assert "--adam_beta1 ADAM_BETA1 AdamW beta1 (default: 0.9)" in opts  # the same in every stage: once
    assert "--stage STAGE this stage --" in opts  # `stage: all` chose the mode: no per-stage default


def test_gen_bench_help_lists_only_its_flags(capsys, monkeypatch):
    """It captions nothing: the captioning settings it shared with demo.py and the runner are not its."""
    import dataclasses

    from uae.apps import gen_bench
    from uae.apps.settings import InferenceConfig

    out = _help(gen_bench.main, [], capsys, monkeypatch)
    listed = set(re.findall(r"^  (--\w+)", out.split("options:", 1)[1], flags=re.M))
    assert listed == {"--" + f.name for f in dataclasses.fields(gen_bench.GenBenchConfig)} | {"--config"}
    captioning = {"increment_seed", "temperature", "max_new_tokens", "top_k", "top_p", "repetition_penalty",
                  "exif_transpose", "caption_batching"}
    assert captioning <= {f.name for f in dataclasses.fields(InferenceConfig)}  # demo and the runner keep them
    assert not captioning & {f.name for f in dataclasses.fields(gen_bench.GenBenchConfig)}


# ----------------------------------------------------------------------------- progress

def test_a_caption_counts_its_tokens_on_a_bar(tiny_uae, photo, monkeypatch):
    from PIL import Image

    from uae.models import encoder

    counted = []
    real_end = encoder.TokenBar.end
    monkeypatch.setattr(encoder.TokenBar, "end", lambda self: (counted.append(self.bar.n), real_end(self)))
    images = [Image.open(photo).convert("RGB")] * 2
    tiny_uae.caption(images, max_new_tokens=5, min_new_tokens=5, seed=0, progress=True)
    assert counted == [5, 5]  # one bar per image captioned alone, a tick per token
    tiny_uae.caption(images, max_new_tokens=5, min_new_tokens=5, seed=0)
    assert counted == [5, 5]  # no bar unless asked


def _bars(err: str, name: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith(name)]


def test_demo_batch_mode_counts_images_and_shows_caption_progress(tiny_ckpt, tmp_path, capsys):
    from uae.apps.demo import main

    assert main(["--checkpoint", str(tiny_ckpt), "--input_img", str(REFS), "--prompt_only", "--batch_size", "4",
                 "--max_new_tokens", "4", "--output_dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "6/6" in _bars(err, "images")[-1]  # six images in two batches: counted in images
    assert _bars(err, "caption tokens")


def test_the_runner_counts_images_and_shows_caption_progress(tiny_ckpt, tmp_path, capsys):
    from uae.config import parse_config
    from uae.images import list_images
    from uae.apps.unibench import UniBenchConfig, produce

    cfg = parse_config(UniBenchConfig, ["--checkpoint", str(tiny_ckpt), "--output_dir", str(tmp_path), "--steps", "1",
                                        "--height", "32", "--width", "32", "--max_new_tokens", "4"])
    captions, skipped = produce(cfg, list_images(str(REFS), "references"), tmp_path)
    assert len(captions) == 6 and not skipped
    err = capsys.readouterr().err
    last = _bars(err, "caption + regenerate")[-1]
    assert "6/6" in last and "image" in last  # batches of 4: counted in images
    assert any("captioning 4" in line for line in _bars(err, "caption + regenerate"))
    assert _bars(err, "caption tokens")


def test_stage_3_captions_its_references_one_bar_tick_an_image(grpo_recipe, tiny_ckpt, capsys):
    grpo_recipe("u4g", tiny_ckpt, "--max_new_tokens", "4")  # set-up captions the six sample photos
    err = capsys.readouterr().err
    assert "6/6" in _bars(err, "captioning references")[-1]
    assert len(_bars(err, "caption tokens")) >= 6  # a token bar per reference


# ----------------------------------------------------------------------------- logging

@pytest.fixture
def restore_logging():
    yield
    from uae.cli import setup_logging

    setup_logging()


@pytest.mark.parametrize("rank, shown", [(None, True), ("0", True), ("3", False)])
def test_only_each_nodes_first_process_logs_info(rank, shown, monkeypatch, capsys, restore_logging):
    """accelerate launch / torchrun set LOCAL_RANK: ranks other than 0 log warnings and errors only."""
    from uae.cli import setup_logging

    if rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("RANK", "11")
    setup_logging("DEBUG")
    log = logging.getLogger("uae.test")
    log.info("an info line")
    log.warning("a warning line")
    err = capsys.readouterr().err
    assert ("an info line" in err) == shown
    assert "a warning line" in err
    assert ("[rank 11]" in err) == (not shown)  # another process's warning says whose it is


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_torchaos_enum_warnings_are_silenced():
    """torchao registers two enums with torch's pytree on import; torch answers with a deprecation
    warning meant for torchao's developers, on every launch that touches transformers' quantizers."""
    pytest.importorskip("torchao")
    code = "import torchao.optim"
    run = lambda c: subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    before = run(code).stderr
    if "is an Enum subclass" not in before:
        pytest.skip("this torch / torchao pair does not warn")
    after = run("from uae.cli import setup_logging; setup_logging(); " + code)
    assert after.returncode == 0 and "is an Enum subclass" not in after.stderr, after.stderr


def test_only_the_named_warnings_are_silenced(restore_logging):
    import warnings

    from uae.cli import setup_logging

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        setup_logging()  # its filters go in front of the "default" above
        warnings.warn("OptimState8bit does not implement _stable_hash_for_caching. For PT2 ...", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in seen] == ["something else"]
    pytree = logging.getLogger("torch.utils._pytree")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    pytree.addHandler(handler)
    try:
        pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile", "<enum 'X'>")
        pytree.warning("another pytree warning")
    finally:
        pytree.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another pytree warning"]


def test_building_a_checkpoint_does_not_report_the_parts_it_leaves_out(tmp_path):
    """The SD3 folder has no transformer and no T5, on purpose: diffusers said "cannot be saved"
    for each, at WARNING, on every build."""
    from uae.random_weights import build_checkpoint
    from uae.random_weights.checkpoint import _quiet_left_out_parts

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    source = logging.getLogger("diffusers.pipelines.pipeline_utils")
    diffusers_log = logging.getLogger("diffusers")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.WARNING)  # as outside the scripts (they set ERROR)
    source.addHandler(handler)
    try:
        build_checkpoint(tmp_path / "ckpt", "tiny")
        assert not [r.getMessage() for r in records if "cannot be saved" in r.getMessage()]
        with _quiet_left_out_parts():  # narrowly: another part that cannot be saved is still reported
            source.warning("self.vae=None of type <class 'NoneType'> cannot be saved.")
            source.warning("self.tokenizer_3=None of type <class 'NoneType'> cannot be saved.")
    finally:
        source.removeHandler(handler)
        diffusers_log.setLevel(level)
    assert [r.getMessage() for r in records] == ["self.vae=None of type <class 'NoneType'> cannot be saved."]


# ----------------------------------------------------------------------------- benchmarks

def test_the_memory_plan_has_no_fsdp_row_for_a_stage_that_refuses_fsdp(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_plan

    from uae.errors import UAEError
    from uae.train import refuse_sharded_launch

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name, (stage, _, _) in memory_plan.SETTINGS.items():
        if stage in memory_plan.FSDP_STAGES:
            continue
        with pytest.raises(UAEError, match="FSDP launches are not supported"):
            refuse_sharded_launch(stage)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    res = memory_plan.main(["--settings", "u4g", "SFT LoRA", "--act_preset", ""])
    assert set(res["plans"]["u4g"]["parallel"]) == {"1 GPU", "8 GPUs DDP"}
    assert "8 GPUs FSDP" in res["plans"]["SFT LoRA"]["parallel"]
    out, err = capsys.readouterr()
    assert re.search(r"^u4g +8 GPUs FSDP +refused: train_grpo.py runs DDP only$", out, flags=re.M), out
    assert "plan: u4g at full size" in err and "plan: SFT LoRA at full size" in err  # what it is doing


def test_benchmark_ratios_say_what_they_divide():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_grpo
    import run_all

    table = run_all.markdown(run_all.rows({"memory_plan": {"measured": {
        "preset": "tiny", "measured_peak_gib": 0.9, "planned_without_activations_gib": 0.0015, "memory": "cpu rss"}}}),
        "header")
    assert "| ratio (ours / reference) |" in table
    assert "measured peak (the whole process's RSS, runtime included) vs planned weights + gradients + optimizer" \
        in table and "| 600.00x |" in table
    g = {"rollout_seconds_shortcut": 0.754, "rollout_seconds_with_old_logprobs": 0.748,
         "old_logprob_forward_seconds": -0.006, "seconds_per_step": 1.854}
    line = bench_grpo.shortcut_line(g)
    assert "the shortcut saves -0.006 s per step (the old log-probs' forward), -0.3% of the 1.854 s step" in line
    assert "timing noise" in line
    assert "timing noise" not in bench_grpo.shortcut_line({**g, "old_logprob_forward_seconds": 0.1})


# ----------------------------------------------------------------------------- git

def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)


def test_what_the_commands_write_by_default_is_ignored_and_nothing_tracked_is():
    import dataclasses
    import glob

    import yaml

    from uae.apps.demo import DemoConfig
    from uae.scoring.folder import details_path
    from uae.apps.score_i2i import ScoreConfig
    from uae.methods import METHODS
    from uae.apps.unibench import UniBenchConfig

    if _git("rev-parse", "--is-inside-work-tree").returncode:
        pytest.skip("not a git checkout")
    assert _git("ls-files", "-ci", "--exclude-standard").stdout == ""  # no tracked file matches a pattern

    def default(cls, name):
        return {f.name: f.default for f in dataclasses.fields(cls)}[name]

    written = [default(DemoConfig, "output_path"), default(DemoConfig, "output_dir") + "/x.png",
               default(UniBenchConfig, "output_dir") + "/results.json", default(ScoreConfig, "output_file"),
               str(details_path(default(ScoreConfig, "output_file"))), "bench/results/small/results.json",
               default(METHODS["sft"].config, "output_dir") + "/final/x"]
    written += [default(c, "output_dir") + "/metrics.jsonl" for c in (m.config for m in METHODS.values() if m.command == "train_grpo.py")]
    for path in glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True):
        out = (yaml.safe_load(open(path)) or {}).get("output_dir")
        if out:
            written.append(f"{out}/checkpoint-1/x")
    ignored = _git("check-ignore", "--no-index", *written).stdout.split()
    assert sorted(set(written) - set(ignored)) == []
