"""From the base models (docs/from-base.md): uae-assemble builds a checkpoint in the official layout
from a Qwen2.5-VL LLM and an SD3 pipeline with a fresh projector, and the tiny chain runs end to end:
assemble -> uae-caption-data -> train_sft.py on the shards -> train_grpo.py --stage all."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from skimage import data

from uae.apps.assemble import main as assemble_main
from uae.apps.assemble import projected_norms, sd3_prompt_norms

ROOT = Path(__file__).resolve().parent.parent.parent
FROM_BASE = ROOT / "configs" / "from_base"
# Held out from the calibration prompts: the range must hold for texts the scale was not fitted on.
HELD_OUT = ["An astronaut in a white space suit standing on the moon next to a flag.",
            "Snow-capped mountains reflected in a clear lake under a blue sky.",
            "Two bowls of ramen on a wooden counter, steam rising, chopsticks beside them."]


def assemble(out, *flags):
    return assemble_main(["--llm", "tiny", "--decoder", "tiny", "--out", str(out), *map(str, flags)])


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    out = tmp_path_factory.mktemp("from-base") / "assembled"
    assert assemble(out) == 0
    return out


def _norm_ratio(checkpoint) -> float:
    """Mean per-token norm of the checkpoint's conditioning of HELD_OUT over the decoder's own."""
    from diffusers import StableDiffusion3Pipeline

    from uae.models.uae import UAE
    from uae.random_weights.unified import embedded

    enc = UAE.from_pretrained(str(checkpoint), device="cpu", load_decoder=False).encoder
    pipe = StableDiffusion3Pipeline.from_pretrained(embedded("generator"), text_encoder_3=None, tokenizer_3=None)
    return (projected_norms(enc, HELD_OUT).mean() / sd3_prompt_norms(pipe, HELD_OUT).mean()).item()


def test_assembled_checkpoint_loads_generates_and_starts_in_range(assembled, tmp_path):
    from uae.models.uae import UAE
    from uae.random_weights.unified import embedded

    manifest = json.loads((assembled / "uae_checkpoint.json").read_text())
    assert manifest["dit_lora"] is None and not (assembled / "dit_lora").exists()
    model = UAE.from_pretrained(str(assembled), device="cpu")
    images = model.generate(["a red cube"], height=32, width=32, num_inference_steps=2, progress=False)
    assert images[0].size == (32, 32)
    # The DiT is the pipeline's, bit for bit; the fresh LLM LoRA (B = 0) leaves the base LLM's states unchanged.
    src = load_file(str(embedded("generator") / "transformer" / "diffusion_pytorch_model.safetensors"))
    dit = model.decoder.pipe.transformer.state_dict()
    assert src.keys() == dit.keys() and all(torch.equal(v, dit[k]) for k, v in src.items())
    enc = model.encoder
    ids, mask = enc.pad_right(enc.generate_ids(HELD_OUT))
    with enc.llm.disable_adapter():
        base = enc.hidden_states(ids, mask)
    assert torch.equal(enc.hidden_states(ids, mask), base)
    assert manifest["assembled"]["projector"]["projector_init"] == "calibrated"
    # Calibrated: on held-out texts, the conditioning's per-token norm is the decoder's own (measured 1.03);
    # PyTorch's init alone gives 0.62 of it on this tiny pair (the scale the calibration corrects).
    ratio = _norm_ratio(assembled)
    assert 0.8 < ratio < 1.25, ratio
    plain = tmp_path / "plain"
    assert assemble(plain, "--projector_init", "pytorch") == 0
    assert abs(_norm_ratio(plain) - 1 / manifest["assembled"]["projector"]["scale"]) < 0.1
    # A projector from a folder: the assembled one, kept exactly.
    again = tmp_path / "again"
    assert assemble(again, "--projector_init", assembled) == 0
    a, b = (load_file(str(p / "llm" / "projector.safetensors")) for p in (assembled, again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_llm_is_calibrated_and_stays_bf16(tmp_path):
    """The real Qwen2.5-VL is stored in bf16: its states reach the fp32 projector, and llm/ keeps its dtype."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from uae.models.uae import UAE
    from uae.random_weights.unified import embedded
    from uae.runtime import stored_dtype

    llm = tmp_path / "llm-bf16"
    Qwen2_5_VLForConditionalGeneration.from_pretrained(embedded("captioner"), dtype=torch.bfloat16).save_pretrained(llm)
    AutoProcessor.from_pretrained(embedded("captioner")).save_pretrained(llm)
    out = tmp_path / "out"
    assert assemble_main(["--llm", str(llm), "--decoder", "tiny", "--out", str(out), "--preset", "tiny"]) == 0
    assert stored_dtype(out / "llm") == torch.bfloat16
    assert load_file(str(out / "llm" / "projector.safetensors"))["projector.2.weight"].dtype == torch.float32
    assert json.loads((out / "uae_checkpoint.json").read_text())["assembled"]["projector"]["scale"] > 0
    assert UAE.from_pretrained(str(out), device="cpu", load_decoder=False).encoder.projector[-1].out_features == 64


def test_hub_ids_download_what_uae_reads(tmp_path, monkeypatch):
    """Hub ids go to huggingface_hub as they are (here answered by the tiny parts); of the decoder, only the
    diffusers folders UAE reads are asked for: no T5, no single-file checkpoint."""
    import huggingface_hub

    from uae.random_weights.unified import embedded

    asked = {}

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked[repo_id] = allow_patterns
        return str(embedded("captioner" if repo_id.startswith("Qwen/") else "generator"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    cfg = yaml.safe_load((FROM_BASE / "assemble.yaml").read_text())
    out = tmp_path / "out"
    assert assemble_main(["--config", str(FROM_BASE / "assemble.yaml"), "--out", str(out), "--preset", "tiny"]) == 0
    assert set(asked) == {cfg["llm"], cfg["decoder"]} and asked[cfg["llm"]] is None
    patterns = asked[cfg["decoder"]]
    assert "transformer/*" in patterns and "vae/*" in patterns and not any("_3" in p for p in patterns)
    manifest = json.loads((out / "uae_checkpoint.json").read_text())
    assert (manifest["assembled"]["llm"], manifest["assembled"]["decoder"]) == (cfg["llm"], cfg["decoder"])


def _error(capsys) -> str:
    """The one error line (the tiny parts' warnings aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_a_one_line_error(assembled, tmp_path, capsys):
    from uae.random_weights.unified import embedded

    assert assemble(assembled) == 2 and "--overwrite" in _error(capsys)
    bad = [(["--llm", str(embedded("generator"))], "Qwen2.5-VL"),
           (["--decoder", str(embedded("captioner"))], "StableDiffusion3Pipeline"),
           (["--llm", str(tmp_path / "nothing-here")], "--llm")]
    for flags, words in bad:
        argv = ["--llm", "tiny", "--decoder", "tiny", "--out", str(tmp_path / "x"), *flags]
        assert assemble_main(argv) == 2 and words in _error(capsys)
    # A projector whose widths do not fit: one made for a DiT with another joint_attention_dim.
    wrong = tmp_path / "wrong" / "llm"
    wrong.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"projector.0.weight": torch.zeros(8, 64), "projector.0.bias": torch.zeros(8),
               "projector.2.weight": torch.zeros(5, 8), "projector.2.bias": torch.zeros(5)},
              str(wrong / "projector.safetensors"))
    assert assemble(tmp_path / "y", "--projector_init", wrong.parent) == 2 and "joint_attention_dim" in _error(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_every_from_base_config_parses():
    from uae.apps.assemble import AssembleConfig
    from uae.apps.caption_data import CaptionDataConfig
    from uae.config import parse_config
    from uae.methods.sft import SFTConfig
    from uae.train import parse

    kinds = {"assemble": AssembleConfig, "data": CaptionDataConfig, "sft": SFTConfig}
    seen = set()
    for path in sorted(FROM_BASE.glob("*.yaml")):
        kind = path.stem.removeprefix("tiny_")
        seen.add(kind)
        if kind == "grpo":
            assert [c.stage for c in parse(["--config", str(path)])] == ["cold_start", "g4u", "u4g"]
        else:
            parse_config(kinds[kind], ["--config", str(path)])
    assert seen == {"assemble", "data", "sft", "grpo"}
    # The tiny chain reads what its previous step writes.
    tiny = {k: yaml.safe_load((FROM_BASE / f"tiny_{k}.yaml").read_text()) for k in ("assemble", "data", "sft", "grpo")}
    assert tiny["sft"]["checkpoint"] == tiny["assemble"]["out"]
    assert Path(tiny["sft"]["data"]).parent == Path(tiny["data"]["output_dir"])
    assert tiny["grpo"]["checkpoint"] == str(Path(tiny["sft"]["output_dir"]) / "final")


@pytest.mark.slow
def test_tiny_chain_assemble_caption_sft_and_all_grpo_stages(assembled, tmp_path, monkeypatch):
    """The whole tiny chain on photos: shards of uae-caption-data feed SFT, whose final/ feeds the three stages."""
    import train_grpo
    import train_sft
    from uae.apps.caption_data import main as caption_main

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.png")
    shards = tmp_path / "shards"
    assert caption_main(["--config", str(FROM_BASE / "tiny_data.yaml"), "--input", str(photos),
                         "--output_dir", str(shards), "--progress", "false"]) == 0
    assert sorted(p.name for p in shards.glob("*.tar")) == ["000000.tar", "000001.tar"]

    sft = tmp_path / "sft"
    assert train_sft.main(["--config", str(FROM_BASE / "tiny_sft.yaml"), "--checkpoint", str(assembled),
                           "--data", str(shards / "*.tar"), "--output_dir", str(sft)]) == 0
    final = sft / "final"
    assert json.loads((final / "uae_checkpoint.json").read_text())["trained_by"] == "train_sft.py"
    for part, name in (("dit", "diffusion_pytorch_model.safetensors"), ("llm", "projector.safetensors")):
        before, after = load_file(str(assembled / part / name)), load_file(str(final / part / name))
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(changed) > 0.8 * len(before), part

    grpo = tmp_path / "grpo"
    assert train_grpo.main(["--config", str(FROM_BASE / "tiny_grpo.yaml"), "--checkpoint", str(final),
                            "--data", str(shards / "*.tar"), "--output_dir", str(grpo)]) == 0
    for stage in ("cold_start", "g4u", "u4g"):
        manifest = json.loads((grpo / stage / "final" / "uae_checkpoint.json").read_text())
        assert manifest["trained_by"].startswith("train_grpo.py"), stage
    # Stage 1 trained the fresh LLM LoRA: it is no longer the base LLM.
    lora = {k: v for s in sorted((grpo / "cold_start" / "final" / "llm_lora").glob("*.safetensors"))
            for k, v in load_file(str(s)).items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())
