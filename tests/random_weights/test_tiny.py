"""The offline builder: official layout, deterministic, full-size architectures as the release's configs give them
(configs/models/full.yaml: Qwen2.5-VL-3B, SD3.5-Large's DiT)."""

import hashlib
import json

import pytest
import torch
import yaml
from safetensors import safe_open

from uae.models.layout import LORA_SHARDS
from uae.random_weights import build_checkpoint, load_preset


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_matches_release(tiny_ckpt):
    for sub in ("SD3", "dit", "dit_lora", "llm", "llm_lora", "llm_processor"):
        assert (tiny_ckpt / sub).is_dir(), sub
    for sub in ("vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (tiny_ckpt / "SD3" / sub).is_dir(), sub
    index = json.loads((tiny_ckpt / "llm" / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    # transformers-4.50 names, as in the release: text model at model.*, vision tower at visual.*
    assert any(k.startswith("model.layers.") for k in keys)
    assert any(k.startswith("visual.blocks.") for k in keys)
    assert not any("language_model" in k for k in keys)
    assert {"projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"} <= keys
    lora_keys = set()
    for shard in LORA_SHARDS:
        with safe_open(str(tiny_ckpt / "llm_lora" / shard), framework="pt") as f:
            lora_keys |= set(f.keys())
    assert any(k.startswith("model.base_model.model.layers.") and ".lora_A." in k for k in lora_keys)
    assert not any(k.startswith("visual.") and "lora_" in k for k in lora_keys)
    assert json.loads((tiny_ckpt / "dit_lora" / "adapter_config.json").read_text())["r"] == 4


def test_processor_has_qwen_tokens_and_template(tiny_ckpt):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_ckpt / "llm_processor")
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>"):
        assert proc.tokenizer.convert_tokens_to_ids(t) != proc.tokenizer.unk_token_id
    text = proc.apply_chat_template([{"role": "generate", "content": [{"type": "text", "text": "a cat"}]}],
                                    tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>generate\na cat<|im_end|>\n<|im_start|>assistant\n")
    cfg = json.loads((tiny_ckpt / "llm" / "config.json").read_text())
    assert cfg["image_token_id"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_same_seed_same_bytes_other_seed_other_weights(tiny_ckpt, tmp_path):
    again = build_checkpoint(tmp_path / "again", "tiny", seed=0)
    assert _digest(again) == _digest(tiny_ckpt)
    other = build_checkpoint(tmp_path / "other", "tiny", seed=1)
    a, b = _digest(tiny_ckpt), _digest(other)
    assert a["dit/diffusion_pytorch_model.safetensors"] != b["dit/diffusion_pytorch_model.safetensors"]
    assert a["llm/config.json"] == b["llm/config.json"]


def test_existing_folder_is_not_overwritten_silently(tiny_ckpt):
    with pytest.raises(FileExistsError):
        build_checkpoint(tiny_ckpt, "tiny")


def test_command_line_builds_the_same_checkpoint_and_replaces_one_only_when_told(tiny_ckpt, tmp_path, capsys):
    """uae-build-checkpoint (python -m uae.random_weights) in-process: the library's bytes; an
    existing --out or a mistyped flag is a one-line error, exit code 2."""
    from uae.apps.build_checkpoint import main

    out = tmp_path / "cli"
    assert main(["--out", str(out)]) == 0
    assert _digest(out) == _digest(tiny_ckpt)
    capsys.readouterr()
    assert main(["--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["--out", str(out), "--seed", "1", "--overwrite"]) == 0
    dit = "dit/diffusion_pytorch_model.safetensors"
    assert _digest(out)[dit] != _digest(tiny_ckpt)[dit]
    assert main(["--ou", str(tmp_path / "x")]) == 2
    assert "unrecognized arguments: --ou" in capsys.readouterr().err


def test_full_size_presets_have_the_real_sizes():
    """Instantiate the full-size architectures on the meta device (no memory, no download)."""
    from diffusers import SD3Transformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from uae.random_weights import build_processor, llm_config

    cfg = load_preset("full")
    with torch.device("meta"):
        dit = SD3Transformer2DModel(**cfg["dit"])
        proc = build_processor(load_preset("tiny"))  # any tokenizer: ids only
        llm = Qwen2_5_VLForConditionalGeneration(llm_config(cfg, proc.tokenizer))
    dit_params = sum(p.numel() for p in dit.parameters())
    llm_params = sum(p.numel() for p in llm.parameters())
    assert 7.9e9 < dit_params < 8.3e9, dit_params          # SD3.5-Large: ~8.1B
    assert 3.6e9 < llm_params < 3.9e9, llm_params          # Qwen2.5-VL-3B: ~3.75B (tied embeddings)
    assert dit.config.joint_attention_dim == 4096 and dit.config.caption_projection_dim == 2432
    assert llm.config.text_config.hidden_size == 2048 and llm.config.vision_config.out_hidden_size == 2048


def test_every_preset_file_is_valid_yaml_with_all_parts():
    from uae.paths import MODEL_PRESETS

    for path in MODEL_PRESETS.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        for part in ("llm", "projector", "llm_lora", "dit", "dit_lora", "vae", "scheduler",
                     "text_encoder", "text_encoder_2", "processor", "tokenizer"):
            assert part in cfg, (path.name, part)
        assert cfg["llm"]["vision_config"]["out_hidden_size"] == cfg["llm"]["text_config"]["hidden_size"]
        assert cfg["dit"]["pooled_projection_dim"] == (cfg["text_encoder"]["projection_dim"]
                                                      + cfg["text_encoder_2"]["projection_dim"])


def test_build_in_bfloat16_writes_bf16_weights_that_load(tmp_path):
    """What bench/gpu_check.sh does for the full-size model (there with device=cuda)."""
    import glob

    from safetensors.torch import load_file

    from uae.models.uae import UAE
    from uae.random_weights import build_checkpoint

    before = torch.get_default_dtype()
    path = build_checkpoint(tmp_path / "bf16", "tiny", dtype="bfloat16", device="cpu")
    assert torch.get_default_dtype() == before  # restored
    llm = {}
    for f in glob.glob(str(path / "llm" / "*.safetensors")):
        llm.update(load_file(f))
    assert {v.dtype for v in llm.values()} == {torch.bfloat16}
    model = UAE.from_pretrained(str(path), device="cpu", dtype=torch.bfloat16)
    assert model.generate(["a cat"], height=32, width=32, num_inference_steps=2, progress=False)[0].size == (32, 32)


def test_cached_artefacts_are_built_by_the_nodes_first_process_only(tmp_path, monkeypatch):
    """transformers writes no model files on a torch.distributed rank other than 0: the other
    processes wait for the first one's build instead of building an incomplete artefact."""
    import threading
    import time

    from uae.files import build_once

    built = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    target = tmp_path / "artefact"
    threading.Timer(0.6, lambda: target.mkdir()).start()  # the first process's build, elsewhere
    t0 = time.monotonic()
    assert build_once(target, lambda p: built.append(p)) == target
    assert not built and time.monotonic() - t0 >= 0.5
    monkeypatch.setenv("LOCAL_RANK", "0")
    other = tmp_path / "other"
    build_once(other, lambda p: (built.append(p), p.mkdir()))
    assert built == [other]


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    import os

    from uae.files import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == os.stat(tmp_path / "b.txt").st_mode & 0o777


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    """A folder written through uae.files.atomic_folder (exports, random-weight builds): a failed
    write leaves the old folder as it was and no temporary behind; a finished one replaces it, with
    the permissions of a plain mkdir."""
    import os

    from uae.files import atomic_folder

    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("interrupted")
    assert (out / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(out) as tmp:
        (tmp / "w").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["w"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "plain").mkdir()
    assert os.stat(out).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777
