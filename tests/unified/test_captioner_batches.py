"""A transformers captioner (uae.unified.captioner) batches its prompts whatever form of images its
processor wants: Gemma 3's one list per sample as well as Qwen2.5-VL's and LLaVA's flat list, in
--caption_batching and in the stage-2 rollouts (CaptionPolicy over the adapter's prompts)."""

import numpy as np
import pytest
import torch
from PIL import Image

from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION
from uae.rl.captioners import CaptionPolicy
from uae.unified.captioner import TransformersCaptioner
from uae.unified.protocol import RunSettings

SETTINGS = RunSettings(caption_instruction=RELEASE_CAPTION_INSTRUCTION, max_new_tokens=5)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from uae.random_weights.unified import build_captioner, build_gemma3

    d = tmp_path_factory.mktemp("captioners")
    return {"gemma3": build_gemma3(d / "gemma3"), "qwen": build_captioner(d / "qwen")}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(2)]


def test_gemma3_captions_a_batch(tiny, images):
    """Gemma 3's processor reads a flat list of two images as one sample with two: a batch of two
    prompts failed. Batched and one by one, each caption is written; the template's BOS is the
    prompt's only one."""
    batched = TransformersCaptioner(str(tiny["gemma3"]), RunSettings(**{**SETTINGS.to_dict(), "caption_batching": True}))
    caps = batched.caption(images, [1, 2])
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    alone = TransformersCaptioner(str(tiny["gemma3"]), SETTINGS)
    assert len(alone.caption(images, [1, 2])) == 2
    batch = batched.inputs(images)
    tok = batched.processor.tokenizer
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = row[mask.bool()].tolist()
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_gemma3_stage2_rollout(tiny, images):
    """A stage-2 rollout of two images: the adapter's prompts, on-policy samples, and the log-probs
    of each sample alone equal to those of the batch."""
    side = TransformersCaptioner(str(tiny["gemma3"]), SETTINGS)
    policy = CaptionPolicy(side.model, side.model, side.processor, side.inputs, temperature=1.0, max_new_tokens=4)
    batch = policy.prompt_inputs(images)
    torch.manual_seed(0)
    completion = policy.sample(batch)[:, batch["input_ids"].shape[1]:]
    assert completion.shape[0] == 2
    with torch.no_grad():
        lp = policy.token_logprobs(side.model, batch, completion)
        second = policy.token_logprobs(side.model, batch, completion, rows=slice(1, 2))
    assert lp.shape == completion.shape and torch.isfinite(lp).all()
    torch.testing.assert_close(second, lp[1:], rtol=1e-4, atol=1e-5)


def _llava_processor():
    """A LLaVA processor (CLIP image processor, an <image> placeholder) over the tiny Janus BPE."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from uae.random_weights.unified import build_janus_tokenizer

    tok = build_janus_tokenizer()
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tok.image_token = "<image>"
    return LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="full", image_token="<image>")


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_flat_list_processors_get_the_same_tensors(tiny, images, kind):
    """Qwen2.5-VL and LLaVA flatten the nested form: the captioner's prompts are the tensors a flat
    list gives, as before."""
    if kind == "qwen":
        side = TransformersCaptioner(str(tiny["qwen"]), SETTINGS)
        processor, prompt = side.processor, side.caption_prompt()
        ours = side.inputs(images)
    else:
        processor, prompt = _llava_processor(), "describe <image>"
        ours = None
    flat = processor(text=[prompt] * 2, images=list(images), padding=True, padding_side="left", return_tensors="pt")
    nested = processor(text=[prompt] * 2, images=[[im] for im in images], padding=True, padding_side="left",
                       return_tensors="pt")
    for got in [nested] + ([ours] if ours is not None else []):
        assert sorted(got) == sorted(flat)
        assert all(torch.equal(got[k], flat[k]) for k in flat)
