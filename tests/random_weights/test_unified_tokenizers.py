"""The tiny models of uae.random_weights.unified carry their real checkpoints' special tokens: Janus-Pro
(deepseek-community/Janus-Pro-1B / -7B: a BOS before every encoding, which the unconditional prompt
of its image generation keeps), Qwen2.5-VL (no BOS at all) and Gemma 3 (a BOS, written by its chat
template); and a change of a tokenizer's spec rebuilds the cached tiny model."""

import pytest

from uae.random_weights import unified


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    from transformers import AutoProcessor

    d = tmp_path_factory.mktemp("tokenizers")
    return {"janus": AutoProcessor.from_pretrained(unified.build_janus(d / "janus")),
            "captioner": AutoProcessor.from_pretrained(unified.build_captioner(d / "captioner")),
            "gemma3": AutoProcessor.from_pretrained(unified.build_gemma3(d / "gemma3"))}


def test_janus_tokenizer_adds_bos_as_janus_pro(processors):
    from PIL import Image

    proc = processors["janus"]
    tok = proc.tokenizer
    assert tok.bos_token == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert tok.eos_token == "<\uff5cend\u2581of\u2581sentence\uff5c>" and tok.pad_token == "<\uff5c\u2581pad\u2581\uff5c>"
    assert (tok.image_token, tok.boi_token, tok.eoi_token) == ("<image_placeholder>", "<begin_of_image>",
                                                               "<end_of_image>")
    assert {"<|User|>", "<|Assistant|>", "<patch_placeholder>", "<|grounding|>"} <= set(tok.all_special_tokens)
    assert tok("a red cube").input_ids[0] == tok.bos_token_id
    assert tok.decode(tok("a red cube").input_ids, skip_special_tokens=True) == "a red cube"
    # The generation prompt (what the unconditional branch blanks all but the BOS of) and the caption prompt.
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a red cube"}]}],
                                    add_generation_prompt=True, tokenize=False)
    ids = proc(text=[text], generation_mode="image", return_tensors="pt")["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.convert_tokens_to_ids(tok.boi_token)
    caption = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": "describe"}]}],
                                       add_generation_prompt=True, tokenize=False)
    ids = proc(text=[caption], images=[Image.new("RGB", (32, 32))], generation_mode="text",
               return_tensors="pt")["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_janus_config_ids_are_the_tokenizers(tmp_path):
    import json

    folder = unified.build_janus(tmp_path / "janus")
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(folder).tokenizer
    config = json.loads((folder / "config.json").read_text())["text_config"]
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (gen["bos_token_id"], gen["pad_token_id"]) == (tok.bos_token_id, tok.pad_token_id)


def test_captioner_tokenizer_has_no_bos_as_qwen25vl(processors):
    """Qwen2.5-VL's tokenizer has no BOS (bos_token null), ends a turn with <|im_end|> and pads with
    <|endoftext|>: the tiny one too, and its prompts start with the chat template's first token."""
    tok = processors["captioner"].tokenizer
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok("a red cube").input_ids == tok("a red cube", add_special_tokens=False).input_ids
    assert {"<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>"} <= set(tok.all_special_tokens)


def test_gemma3_bos_comes_from_its_template(processors):
    proc = processors["gemma3"]
    tok = proc.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok("a red cube").input_ids[0] == tok.bos_token_id
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "a red cube"}]}],
                                    add_generation_prompt=True, tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\n") and text.endswith("<start_of_turn>model\n")


def test_cache_key_follows_the_tokenizer_spec(monkeypatch):
    """A stale cached tiny model (built with another tokenizer) is not reused: its folder name changes."""
    before = {kind: unified._spec_key(kind) for kind in unified.KINDS}
    assert len(set(before.values())) == len(unified.KINDS)
    monkeypatch.setitem(unified.JANUS_TOKENIZER, "add_bos_token", False)
    monkeypatch.setitem(unified.GEMMA3_TOKENIZER, "pad_token", "<unk>")
    monkeypatch.setattr(unified, "QWEN_SPECIAL_TOKENS", unified.QWEN_SPECIAL_TOKENS[:-1])
    after = {kind: unified._spec_key(kind) for kind in unified.KINDS}
    assert after["janus"] != before["janus"] and after["gemma3"] != before["gemma3"]
    assert after["captioner"] != before["captioner"] and after["generator"] == before["generator"]
