"""Encoder: LoRA in the release's three-shard format, projected embeddings, captioning."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from uae.models.layout import LORA_SHARDS, save_official_llm_lora
from uae.errors import UAEError
from uae.models.encoder import UAEEncoder


def _load(ckpt, lora="llm_lora"):
    return UAEEncoder.from_pretrained(str(ckpt / "llm"), str(ckpt / "llm_processor"),
                                      None if lora is None else str(ckpt / lora))


def _lora_params(enc):
    return {n: p.detach().clone() for n, p in enc.named_parameters() if "lora_" in n}


def test_lora_targets_the_language_model_only(tiny_uae):
    names = [n for n, _ in tiny_uae.encoder.named_parameters() if "lora_" in n]
    assert names and all(".language_model." in n for n in names)
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_changes_the_output_and_round_trips_through_three_shards(tiny_ckpt, tiny_uae, tmp_path):
    enc = tiny_uae.encoder
    prompts = ["a red cube on a table", "a cat"]
    with torch.no_grad():
        with_lora, _ = enc.get_projected_embeddings(prompts)
        bare, _ = _load(tiny_ckpt, lora=None).get_projected_embeddings(prompts)
    assert (with_lora - bare).abs().max() > 1e-4  # a LoRA that loaded nothing would fail here

    save_official_llm_lora(enc, tmp_path / "llm_lora")  # LoRA + projector only
    assert sorted(p.name for p in (tmp_path / "llm_lora").iterdir()) == sorted(LORA_SHARDS)
    shutil.copytree(tiny_ckpt / "llm", tmp_path / "llm")
    shutil.copytree(tiny_ckpt / "llm_processor", tmp_path / "llm_processor")
    again = _load(tmp_path)
    a, b = _lora_params(enc), _lora_params(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(again.get_projected_embeddings(prompts)[0], with_lora)


def _rewrite_shards(folder, fn):
    for shard in LORA_SHARDS:
        path = folder / shard
        save_file(fn(load_file(str(path))), str(path))


def test_unknown_tensor_in_shards_fails_loudly(tiny_ckpt, tmp_path):
    shutil.copytree(tiny_ckpt, tmp_path / "c")
    _rewrite_shards(tmp_path / "c" / "llm_lora",
                   lambda s: {**s, "model.base_model.model.layers.0.self_attn.q_proj.lora_C.default.weight":
                              torch.zeros(2, 2)})
    with pytest.raises(UAEError, match="match no parameter"):
        _load(tmp_path / "c")


def test_lora_weights_absent_from_shards_fail_loudly(tiny_ckpt, tmp_path):
    shutil.copytree(tiny_ckpt, tmp_path / "c")
    _rewrite_shards(tmp_path / "c" / "llm_lora", lambda s: {k: v for k, v in s.items() if "lora_B" not in k})
    with pytest.raises(UAEError, match="not in the shards"):
        _load(tmp_path / "c")


def test_projected_embeddings_shape_padding_and_real_tokens(tiny_uae):
    """Shapes and right padding; the real tokens' rows equal the full model's hidden_states[-1]
    (only pad rows depend on the position convention: tests/models/test_fidelity.py checks those)."""
    enc = tiny_uae.encoder
    joint = tiny_uae.decoder.joint_attention_dim
    prompts = ["a very long prompt about a red cube on a wooden table in a bright room", "cat"]
    with torch.no_grad():
        embeds, mask = enc.get_projected_embeddings(prompts)
        assert embeds.shape[0] == 2 and embeds.shape[2] == joint and mask.shape == embeds.shape[:2]
        assert mask[0].all() and not mask[1].all() and mask[1, 0] == 1 and mask[1, -1] == 0  # right padding
        ids, _ = enc.pad_right(enc.generate_ids(prompts))
        out = enc.llm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        real = mask.bool()
        assert torch.allclose(enc.projector(out.hidden_states[-1])[real], embeds[real], atol=1e-6)
        pairs = enc.encode_prompts(prompts)
    for (pos, neg), p in zip(pairs, prompts):
        assert pos.shape == neg.shape and pos.shape[0] == 1 and pos.shape[2] == joint


def test_caption_batched_non_square_and_seeded(tiny_uae, photo):
    from PIL import Image

    im = Image.open(photo).convert("RGB")
    images = [im, im.resize((97, 41))]
    a = tiny_uae.caption(images, max_new_tokens=8, seed=3)
    b = tiny_uae.caption(images, max_new_tokens=8, seed=3)
    assert len(a) == 2 and all(isinstance(c, str) and c for c in a)
    assert a == b
    # Each image alone by default: a caption does not depend on its batch-mates.
    assert tiny_uae.caption(images[1:], max_new_tokens=8, seed=3) == a[1:]
    batched = tiny_uae.caption(images, max_new_tokens=8, seed=3, batch=True)
    assert len(batched) == 2 and batched == tiny_uae.caption(images, max_new_tokens=8, seed=3, batch=True)
