"""uae-gen-bench on the tiny model: GenEval's and DPG-Bench's output layouts read back the way their
official evaluators read them (geneval evaluation/evaluate_images.py, ELLA
dpg_bench/compute_dpg_bench.py), the seed policy, byte-identical reruns, resuming, bad input, and
two processes writing the files of one."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uae.apps import gen_bench

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "2", "--height", "32", "--width", "32"]
GENEVAL_LINES = [  # the official file's format: json.dumps of each record, one a line
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    ('{"tag": "color_attr", "include": [{"class": "cow", "count": 1, "color": "red"}, {"class": "dog", "count": 1, '
     '"color": "blue"}], "prompt": "a photo of a red cow and a blue dog"}'),
    ('{"tag": "counting", "include": [{"class": "caf\\u00e9 table", "count": 3}], '
     '"prompt": "a photo of three café tables"}'),
]
DPG_PROMPTS = {"partiprompts12": "A red cube on a wooden table, lit from the left.",
               "COCOval2014000000010363": "Two cats asleep on a striped sofa.\n"}   # a trailing newline: not part of it


def _main(*args) -> int:
    return gen_bench.main([str(a) for a in args])


@pytest.fixture(scope="module")
def geneval_meta(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("geneval") / "evaluation_metadata.jsonl"
    path.write_text("\n".join(GENEVAL_LINES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def geneval_run(tmp_path_factory, tiny_ckpt, geneval_meta) -> Path:
    out = tmp_path_factory.mktemp("geneval-out") / "run"
    assert _main("--benchmark", "geneval", "--prompts", geneval_meta, "--output_dir", out, "--checkpoint", tiny_ckpt,
                 "--images_per_prompt", 2, *FAST) == 0
    return out


@pytest.fixture(scope="module")
def dpg_run(tmp_path_factory, tiny_ckpt) -> Path:
    prompts = tmp_path_factory.mktemp("dpg") / "prompts"
    prompts.mkdir()
    for key, text in DPG_PROMPTS.items():
        (prompts / f"{key}.txt").write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("dpg-out") / "run"
    assert _main("--benchmark", "dpg", "--prompts", prompts, "--output_dir", out, "--checkpoint", tiny_ckpt,
                 "--images_per_prompt", 4, *FAST) == 0
    return out


def read_geneval(imagedir: Path) -> dict[str, tuple[dict, list[Path]]]:
    """evaluate_images.py's main(): digit-named folders, json.load(metadata.jsonl), samples/ files
    matching \\d+\\.png."""
    out = {}
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        images = []
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if os.path.isfile(imagepath) and re.match(r"\d+\.png", imagename):
                images.append(Path(imagepath))
        out[subfolder] = (metadata, sorted(images))
    return out


def read_dpg(root: Path, ids, resolution: int, pic_num: int) -> tuple[dict[str, list], list[str]]:
    """compute_dpg_bench.py: every file of the folder, its questions found by the name up to the
    first '.', the png cropped into `pic_num` cells of resolution x resolution (failures are caught
    and the file skipped)."""
    crops = [(0, 0, resolution, resolution), (resolution, 0, resolution * 2, resolution),
             (0, resolution, resolution, resolution * 2), (resolution, resolution, resolution * 2, resolution * 2)]
    cells, failed = {}, []
    for fn in os.listdir(root):
        key = os.path.basename(fn).split(".")[0]
        if key not in ids:
            failed.append(fn)
            continue
        image = Image.open(root / fn)
        cells[key] = [image.crop(c) for c in crops[:pic_num]]
    return cells, failed


def _pixels(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != gen_bench.MANIFEST}


def test_geneval_layout_is_what_its_evaluator_reads(geneval_run, tiny_uae):
    read = read_geneval(geneval_run)
    assert sorted(read) == ["00000", "00001", "00002"]
    for i, line in enumerate(GENEVAL_LINES):
        metadata, images = read[f"{i:05d}"]
        assert (geneval_run / f"{i:05d}" / "metadata.jsonl").read_text(encoding="utf-8") == line  # the line exactly
        assert metadata == json.loads(line)
        assert [p.name for p in images] == ["00000.png", "00001.png"]
        assert all(Image.open(p).size == (32, 32) and Image.open(p).format == "PNG" for p in images)
        assert images[0].read_bytes() != images[1].read_bytes()  # each image its own seed
    # Image k of prompt i has seed 42 + i * images_per_prompt + k: prompt 2, image 1 -> 47.
    [expected] = tiny_uae.generate([json.loads(GENEVAL_LINES[2])["prompt"]], height=32, width=32,
                                   num_inference_steps=2, guidance_scale=5.0, seed=[47], progress=False)
    assert np.array_equal(_pixels(Image.open(read["00002"][1][1])), _pixels(expected))
    manifest = json.loads((geneval_run / gen_bench.MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["benchmark"] == "geneval"
    assert manifest["images_per_prompt"] == 2 and manifest["seed"] == 42 and "seed_policy" in manifest
    assert manifest["checkpoint"] and manifest["config"]["steps"] == 2 and "evaluate_images.py" in manifest["evaluator"]


def test_dpg_grid_is_what_its_evaluator_crops(dpg_run, tiny_uae):
    cells, failed = read_dpg(dpg_run, set(DPG_PROMPTS), resolution=32, pic_num=4)
    assert sorted(cells) == sorted(DPG_PROMPTS) and failed == [gen_bench.MANIFEST]  # the evaluator skips it
    assert all(Image.open(dpg_run / f"{key}.png").size == (64, 64) for key in DPG_PROMPTS)
    # Sorted ids: COCOval... is prompt 0, partiprompts12 prompt 1 (seeds 46..49); the file's text less its newline.
    expected = tiny_uae.generate(["A red cube on a wooden table, lit from the left."] * 4, height=32, width=32,
                                 num_inference_steps=2, guidance_scale=5.0, seed=[46, 47, 48, 49], progress=False)
    for cell, im in zip(cells["partiprompts12"], expected):
        assert np.array_equal(_pixels(cell), _pixels(im))
    manifest = json.loads((dpg_run / gen_bench.MANIFEST).read_text())
    assert manifest["status"] == "complete" and "PIC_NUM=4" in manifest["evaluator"] and " 32 " in manifest["evaluator"]


def test_dpg_jsonl_prompts_and_a_one_row_grid(tiny_ckpt, tmp_path):
    src = tmp_path / "dpg.jsonl"
    src.write_text(json.dumps({"item_id": "a1", "text": "a green apple"}) + "\n\n"
                   + json.dumps({"id": 7, "prompt": "a yellow bus"}) + "\n")
    out = tmp_path / "out"
    assert _main("--benchmark", "dpg", "--prompts", src, "--output_dir", out, "--checkpoint", tiny_ckpt,
                 "--images_per_prompt", 2, *FAST) == 0
    cells, _ = read_dpg(out, {"a1", "7"}, resolution=32, pic_num=2)
    assert sorted(cells) == ["7", "a1"] and Image.open(out / "7.png").size == (64, 32)
    assert not np.array_equal(_pixels(cells["7"][0]), _pixels(cells["7"][1]))


def test_a_rerun_writes_the_same_bytes(geneval_run, geneval_meta, tiny_ckpt, tmp_path):
    out = tmp_path / "again"
    assert _main("--benchmark", "geneval", "--prompts", geneval_meta, "--output_dir", out, "--checkpoint", tiny_ckpt,
                 "--images_per_prompt", 2, *FAST) == 0
    assert _tree(out) == _tree(geneval_run)


def test_a_rerun_skips_complete_outputs_and_makes_only_the_missing(geneval_run, geneval_meta, dpg_run, tiny_ckpt,
                                                                   tmp_path, monkeypatch):
    import uae.models.uae as facade

    run = tmp_path / "run"
    shutil.copytree(geneval_run, run)
    flags = ["--benchmark", "geneval", "--prompts", geneval_meta, "--output_dir", run, "--checkpoint", tiny_ckpt,
             "--images_per_prompt", 2, *FAST]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.png")}
    real = facade.UAE.from_pretrained
    monkeypatch.setattr(facade.UAE, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    assert _main(*flags) == 0
    assert _main("--benchmark", "dpg", "--prompts", json.loads((dpg_run / gen_bench.MANIFEST).read_text())["prompts"],
                 "--output_dir", dpg_run, "--checkpoint", tiny_ckpt, "--images_per_prompt", 4, *FAST) == 0
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*.png")}
    # An interrupted run: one sample missing, one folder without its metadata.jsonl (written last).
    (run / "00001" / "samples" / "00001.png").unlink()
    (run / "00002" / "metadata.jsonl").unlink()
    made = []

    def counting(self, prompts, **kw):
        made.append((list(prompts), kw["seed"]))
        return real_generate(self, prompts, **kw)

    real_generate = facade.UAE.generate
    monkeypatch.setattr(facade.UAE, "from_pretrained", real)
    monkeypatch.setattr(facade.UAE, "generate", counting)
    assert _main(*flags) == 0
    assert made == [(["a photo of a red cow and a blue dog"], [42 + 1 * 2 + 1])]
    assert _tree(run) == _tree(geneval_run)


def test_other_settings_do_not_mix_into_an_output_folder(geneval_run, geneval_meta, tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(geneval_run, run)
    assert _main("--benchmark", "geneval", "--prompts", geneval_meta, "--output_dir", run, "--checkpoint", tiny_ckpt,
                 "--images_per_prompt", 2, "--steps", 3, "--height", 32, "--width", 32) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "steps 2 then, 3 now" in err and "Traceback" not in err


def _bad_inputs(tmp: Path) -> list[tuple[list, str]]:
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text(GENEVAL_LINES[0] + "\n{\"prompt\": \"a cat\",\n")
    no_prompt = tmp / "noprompt.jsonl"
    no_prompt.write_text('{"tag": "single_object"}\n')
    dotted = tmp / "dotted"
    dotted.mkdir()
    (dotted / "a.b.txt").write_text("a cat")
    dup = tmp / "dup.jsonl"
    dup.write_text('{"item_id": "x", "text": "a"}\n{"item_id": "x", "text": "b"}\n')
    txt = tmp / "prompts.txt"
    txt.write_text("a cat\n")
    return [
        (["--benchmark", "geneval", "--prompts", tmp / "missing.jsonl"], "missing.jsonl: no such file"),
        (["--benchmark", "geneval", "--prompts", bad_json], "bad.jsonl line 2 is not JSON"),
        (["--benchmark", "geneval", "--prompts", no_prompt], "line 1 has no \"prompt\""),
        (["--benchmark", "geneval", "--prompts", tmp], "is a folder"),
        (["--benchmark", "parti", "--prompts", bad_json], "--benchmark: invalid choice: 'parti'"),
        (["--prompts", bad_json], "--benchmark is required"),
        (["--benchmark", "dpg", "--prompts", dotted], "'a.b' cannot name its image"),
        (["--benchmark", "dpg", "--prompts", dup], "dup.jsonl line 2: id 'x' again (first on line 1)"),
        (["--benchmark", "dpg", "--prompts", txt], "give a folder of <id>.txt files or a .jsonl"),
        (["--benchmark", "dpg", "--prompts", dup, "--images_per_prompt", 5], "at most 4 images per prompt"),
        (["--benchmark", "dpg", "--prompts", dup, "--height", 32, "--width", 64], "give equal --height and --width"),
        # Flags of captioning (demo's, the runner's) are not gen-bench's: it captions nothing, and its
        # seeds follow one rule (--help).
        (["--benchmark", "geneval", "--prompts", no_prompt, "--increment_seed"],
         "unrecognized arguments: --increment_seed"),
        (["--benchmark", "geneval", "--prompts", no_prompt, "--temperature", 0.5],
         "unrecognized arguments: --temperature"),
    ]


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    import uae.models.uae as facade

    monkeypatch.setattr(facade.UAE, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    for args, message in _bad_inputs(tmp_path):
        assert _main(*args, "--output_dir", tmp_path / "out") == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
        assert len([line for line in err.splitlines() if "ERROR" in line]) == 1, err
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_two_processes_write_the_files_of_one(geneval_run, geneval_meta, tiny_ckpt, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(_free_port()), "-m", "uae.apps.gen_bench",
                           "--benchmark", "geneval", "--prompts", str(geneval_meta), "--output_dir", str(out),
                           "--checkpoint", str(tiny_ckpt), "--images_per_prompt", "2", *FAST],
                          check=False, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # One log per node: the first process's info lines only (the other logs warnings and errors).
    assert "process 0/2: 2 prompt(s) to generate" in proc.stderr and "process 1/2" not in proc.stderr
    assert _tree(out) == _tree(geneval_run)
    one, two = (json.loads((d / gen_bench.MANIFEST).read_text()) for d in (geneval_run, out))
    assert {k: one[k] for k in gen_bench.RESUME_KEYS} == {k: two[k] for k in gen_bench.RESUME_KEYS}
    assert two["status"] == "complete"
