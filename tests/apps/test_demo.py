"""demo.py in-process (main(argv)) on the tiny checkpoint, plus every bad input of issue 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import demo

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "2", "--height", "48", "--width", "64", "--max_new_tokens", "6"]


def run(argv, capsys):
    code = demo.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_text_to_image_writes_png_of_requested_size(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "cube.png"
    code, _, err = run(["--checkpoint", tiny_ckpt, "--input_text", "a red cube on a table",
                        "--output_path", out, *FAST], capsys)
    assert code == 0, err
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (64, 48)


def test_caption_only_prints_caption(tiny_ckpt, photo, tmp_path, capsys):
    code, stdout, err = run(["--checkpoint", tiny_ckpt, "--input_img", photo, "--prompt_only",
                             "--output_path", tmp_path / "never.png", *FAST], capsys)
    assert code == 0, err
    assert stdout.strip()
    assert not (tmp_path / "never.png").exists()


def test_reconstruction_writes_image_and_prints_caption(tiny_ckpt, photo, tmp_path, capsys):
    out = tmp_path / "recon.png"
    code, stdout, err = run(["--checkpoint", tiny_ckpt, "--input_img", photo, "--output_path", out, *FAST], capsys)
    assert code == 0, err
    assert Image.open(out).size == (64, 48)
    assert out.with_suffix(".txt").read_text().strip() == stdout.strip() != ""


def test_batch_prompts_txt_and_jsonl(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\na bird\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n")
    for name, n in (("p.txt", 3), ("p.jsonl", 2)):
        out = tmp_path / f"out_{name}"
        code, _, err = run(["--checkpoint", tiny_ckpt, "--prompt_file", tmp_path / name, "--output_dir", out,
                            "--batch_size", "2", *FAST], capsys)
        assert code == 0, err
        records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
        assert len(records) == n and all(Image.open(r["image"]).size == (64, 48) for r in records)
        assert (out / "demo_config.yaml").exists()


def test_batch_folder_of_images(tiny_ckpt, photo, tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    shutil.copy(photo, src / "a.jpg")
    Image.open(photo).resize((50, 90)).save(src / "b.png")
    out = tmp_path / "out"
    code, _, err = run(["--checkpoint", tiny_ckpt, "--input_img", src, "--output_dir", out, "--batch_size", "2",
                        *FAST], capsys)
    assert code == 0, err
    assert (out / "a.txt").read_text().strip() and (out / "b.txt").read_text().strip()
    assert Image.open(out / "a.png").size == (64, 48) and Image.open(out / "b.png").size == (64, 48)
    assert len((out / "captions.jsonl").read_text().splitlines()) == 2


def test_embedded_default_checkpoint_is_built_and_flagged_random(tmp_path, capsys):
    code, _, err = run(["--input_text", "a cat", "--output_path", tmp_path / "x.png", *FAST], capsys)
    assert code == 0, err
    assert "RANDOM" in err and (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- bad input

@pytest.fixture()
def broken_ckpt(tiny_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _expect_error(argv, capsys, *needles):
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_image(tiny_ckpt, tmp_path, capsys):
    _expect_error(["--checkpoint", tiny_ckpt, "--input_img", tmp_path / "nope.jpg"], capsys, "does not exist")


def test_zero_byte_and_non_image_files(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    _expect_error(["--checkpoint", tiny_ckpt, "--input_img", tmp_path / "empty.jpg"], capsys, "zero-byte")
    _expect_error(["--checkpoint", tiny_ckpt, "--input_img", tmp_path / "text.jpg"], capsys, "not an image")
    _expect_error(["--checkpoint", tiny_ckpt, "--input_img", tmp_path / "cut.png"], capsys, "cut.png")


def test_both_or_neither_input(tiny_ckpt, photo, capsys):
    _expect_error(["--checkpoint", tiny_ckpt, "--input_img", photo, "--input_text", "x"], capsys,
                  "exactly one", "--input_text and --input_img")
    _expect_error(["--checkpoint", tiny_ckpt], capsys, "exactly one", "got none")
    _expect_error(["--input_text", "x", "--prompt_only"], capsys, "--prompt_only needs --input_img")


def test_checkpoint_missing_a_part(broken_ckpt, capsys):
    shutil.rmtree(broken_ckpt / "dit")
    _expect_error(["--checkpoint", broken_ckpt, "--input_text", "x", *FAST], capsys, "no dit/ folder", "--dit")


def test_checkpoint_folder_that_does_not_exist(tmp_path, capsys):
    _expect_error(["--checkpoint", tmp_path / "missing", "--input_text", "x"], capsys, "does not exist")


def test_missing_lora_shard(broken_ckpt, capsys):
    (broken_ckpt / "llm_lora" / "model-00002-of-00003.safetensors").unlink()
    _expect_error(["--checkpoint", broken_ckpt, "--input_text", "x", *FAST], capsys,
                  "model-00002-of-00003.safetensors", "llm_lora")


def test_optional_lora_can_be_switched_off(broken_ckpt, tmp_path, capsys):
    shutil.rmtree(broken_ckpt / "dit_lora")
    _expect_error(["--checkpoint", broken_ckpt, "--input_text", "x", *FAST], capsys, "--dit_lora none")
    code, _, err = run(["--checkpoint", broken_ckpt, "--dit_lora", "none", "--input_text", "x",
                        "--output_path", tmp_path / "x.png", *FAST], capsys)
    assert code == 0, err


def test_weights_that_do_not_fit_the_config(broken_ckpt, capsys):
    cfg_path = broken_ckpt / "dit" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["caption_projection_dim"] = 32  # the weights were built with 64
    cfg["num_attention_heads"] = 2
    cfg_path.write_text(json.dumps(cfg))
    _expect_error(["--checkpoint", broken_ckpt, "--input_text", "x", *FAST], capsys, "could not load the DiT")


def test_llm_weights_that_do_not_fit_the_config(broken_ckpt, capsys):
    cfg_path = broken_ckpt / "llm" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"]["intermediate_size"] = 96  # the weights were built with 128
    cfg_path.write_text(json.dumps(cfg))
    _expect_error(["--checkpoint", broken_ckpt, "--input_text", "x", *FAST], capsys, "LLM", str(broken_ckpt / "llm"))


def test_bad_settings_name_the_flag(tiny_ckpt, capsys):
    _expect_error(["--checkpoint", tiny_ckpt, "--input_text", "x", "--steps", "0"], capsys, "--steps")
    _expect_error(["--checkpoint", tiny_ckpt, "--input_text", "x", "--device", "cuda"], capsys, "--device")
    _expect_error(["--checkpoint", tiny_ckpt, "--input_text", "x", "--dtype", "int3"], capsys, "--dtype")
    _expect_error(["--checkpoint", tiny_ckpt, "--input_text", "x", "--height", "50", "--width", "64",
                   "--steps", "1"], capsys, "--height 50 must be a multiple of 16")


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--input_img", str(tmp_path / "nope.jpg")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_hub_id_without_network_is_a_clear_error(capsys):
    _expect_error(["--checkpoint", "someorg/no-such-uae-repo", "--input_text", "x"], capsys,
                  "could not download", "someorg/no-such-uae-repo")
