"""uae-export on the tiny checkpoint: DIR/llm is a plain Qwen2.5-VL folder, the export captions and
draws what the LoRA checkpoint does, up to the float rounding of the merge (bounds below).

What the merge changes: W x + s B (A x) becomes (W + s B A) x, the same product summed in another
order, so logits and images move by float32 rounding. Measured on the tiny checkpoint (fp32, CPU):
teacher-forced logits differ by <= 2e-6, while the greedy choice's margin over the runner-up is
>= 0.011 at every step; images in [0, 1] differ by <= 7e-4 / 255 before the PNG's uint8 rounding,
and the PNGs are equal (a value flips only within 7e-4 / 255 of a rounding boundary)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from uae.apps import demo, export
from uae.models.layout import MANIFEST, resolve_components

ROOT = Path(__file__).resolve().parents[2]
REFS = ROOT / "Unified-Bench" / "UniBench" / "sample"


def run(argv, capsys):
    code = export.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.err


def tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    assert export.main(["--checkpoint", str(tiny_ckpt), "--output_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def merged_uae(exported):
    from uae.models.uae import UAE

    return UAE.from_pretrained(str(exported), device="cpu")


def test_llm_is_a_plain_qwen_folder_and_the_manifest_says_no_lora(tiny_ckpt, exported):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported / "llm", output_loading_info=True)
    assert all(not list(v) for v in info.values()), info  # no missing / unexpected / mismatched weight
    processor = AutoProcessor.from_pretrained(exported / "llm")
    assert processor.image_processor is not None and AutoTokenizer.from_pretrained(exported / "llm").chat_template
    # The projector is in projector.safetensors only, which transformers does not read; our loader does.
    weights = tensors(exported / "llm" / "model.safetensors")
    assert not any(k.startswith("projector.") or "lora" in k for k in weights)
    assert set(tensors(exported / "llm" / "projector.safetensors")) == {
        "projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    # The LoRA really went in: LoRA-wrapped weights changed, the others are the source's bit for bit.
    source = {}
    for f in sorted((tiny_ckpt / "llm").glob("model-*.safetensors")):
        source.update(tensors(f))
    q, emb = "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"
    assert not torch.equal(weights[q], source[q]) and torch.equal(weights[emb], source[emb])

    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["llm_lora"] is None and manifest["dit_lora"] is None
    assert manifest["merged"] == ["llm_lora", "dit_lora"]
    paths = resolve_components(str(exported))
    assert paths.llm_lora is None and paths.dit_lora is None
    assert not (exported / "llm_lora").exists() and not (exported / "dit_lora").exists()
    dit = tensors(exported / "dit" / "diffusion_pytorch_model.safetensors")
    assert dit.keys() == tensors(tiny_ckpt / "dit" / "diffusion_pytorch_model.safetensors").keys()
    assert (exported / "SD3" / "model_index.json").exists() and (exported / "llm_processor" / "tokenizer.json").exists()


def test_greedy_captions_equal_the_lora_models(tiny_uae, merged_uae, photo):
    """Greedy = top_k 1 (caption() always samples: from the single top token, any temperature).
    Exact equality is asserted, and shown not to be luck: along the greedy path the runner-up
    token trails by far more than twice the largest logit difference the merge makes, so no
    step's argmax can flip."""
    images = [Image.open(p).convert("RGB") for p in (photo, REFS / "coffee.jpg", REFS / "rocket.jpg")]
    a, b = tiny_uae.encoder, merged_uae.encoder
    # The checkpoint's repetition penalty (generation_config.json), then plain greedy.
    for kw in ({}, {"repetition_penalty": 1.0}):
        ca = a.caption(images, max_new_tokens=24, seed=0, top_k=1, **kw)
        assert b.caption(images, max_new_tokens=24, seed=0, top_k=1, **kw) == ca and all(ca)
    with torch.no_grad():
        for image, caption in zip(images, ca):
            n = len(a.caption_inputs([image])["input_ids"][0])
            la = a.llm(**a.caption_inputs([image], answers=[caption])).logits[0, n - 1:-1]
            lb = b.llm(**b.caption_inputs([image], answers=[caption])).logits[0, n - 1:-1]
            diff = (la - lb).abs().max().item()
            top2 = la.topk(2, dim=-1).values
            margin = (top2[:, 0] - top2[:, 1]).min().item()
            assert diff < 1e-4 and margin > 2 * diff, (diff, margin)


def _png(checkpoint, out: Path, seed: int) -> np.ndarray:
    assert demo.main(["--checkpoint", str(checkpoint), "--input_text", "a red cube on a table", "--output_path",
                      str(out), "--steps", "3", "--height", "32", "--width", "32", "--seed", str(seed)]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def test_demo_images_match_the_source_to_float_rounding(tiny_ckpt, exported, tiny_uae, merged_uae, tmp_path):
    """Before the PNG: <= 0.01 / 255 (measured 7e-4 / 255). In the PNG, a value moves by one level
    only if it lies within that of a rounding boundary: at most one level, on < 1% of the values
    (measured: none of 3,072). A different seed moves them by tens of levels: equal images are not
    an accident of a degenerate model."""
    src, merged, other = _png(tiny_ckpt, tmp_path / "a.png", 42), _png(exported, tmp_path / "b.png", 42), \
        _png(tiny_ckpt, tmp_path / "c.png", 43)
    assert np.abs(src - merged).max() <= 1 and (src != merged).mean() < 0.01
    assert np.abs(src - other).mean() > 10

    floats = []
    for model in (tiny_uae, merged_uae):
        pos, neg = model.encoder.embed_pair("a cat on a window sill")
        floats.append(model.decoder.generate(pos, neg, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                                             generator=torch.Generator().manual_seed(42), output_type="np",
                                             progress=False)[0])
    assert np.abs(floats[0] - floats[1]).max() * 255 < 0.01


def test_bfloat16_export_over_an_existing_folder(tiny_ckpt, tmp_path, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "bf16"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    code, err = run(["--checkpoint", tiny_ckpt, "--output_dir", out, "--dtype", "bfloat16"], capsys)
    assert code == 2 and (out / "old.txt").exists()  # refused without --overwrite
    code, err = run(["--checkpoint", tiny_ckpt, "--output_dir", out, "--dtype", "bfloat16", "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]  # no temp left
    for f in ("llm/model.safetensors", "llm/projector.safetensors", "dit/diffusion_pytorch_model.safetensors"):
        assert {v.dtype for v in tensors(out / f).values() if v.is_floating_point()} == {torch.bfloat16}, f
    assert json.loads((out / "llm" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / MANIFEST).read_text())["dtypes"] == {"llm": "bfloat16", "dit": "bfloat16"}
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "llm", output_loading_info=True)
    assert all(not list(v) for v in info.values()) and model.dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["missing checkpoint", "output not empty", "output is the source", "no output",
                                  "bad dtype"])
def test_bad_input_is_one_line_and_exit_code_2(case, tiny_ckpt, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    argv = {"missing checkpoint": ["--checkpoint", tmp_path / "nope", "--output_dir", tmp_path / "o"],
            "output not empty": ["--checkpoint", tiny_ckpt, "--output_dir", full],
            "output is the source": ["--checkpoint", tiny_ckpt, "--output_dir", tiny_ckpt, "--overwrite"],
            "no output": ["--checkpoint", tiny_ckpt],
            "bad dtype": ["--checkpoint", tiny_ckpt, "--output_dir", tmp_path / "o", "--dtype", "int8"]}[case]
    code, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "ERROR" in lines[0] and "Traceback" not in err, err
    assert (full / "x").read_text() == "keep" and (tiny_ckpt / "llm_lora").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing written, no temporary folder left


def test_module_entry_point_exits_2_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "uae.apps.export", "--checkpoint", str(tmp_path / "nope"), "--output_dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
