"""CaptionPolicy (uae.rl.captioners), the understanding side stage 2 trains: its captions are decoded
from the completion's own tokens only, so a pad id that is an ordinary token never reaches a caption."""

import pytest
import torch

from uae.rl.captioners import CaptionPolicy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from uae.random_weights.unified import build_captioner

    folder = build_captioner(tmp_path_factory.mktemp("captioner") / "qwen")
    model = AutoModelForImageTextToText.from_pretrained(folder)
    return CaptionPolicy(model, model, AutoProcessor.from_pretrained(folder), lambda images: {}, temperature=1.0,
                         max_new_tokens=8)


def test_decode_keeps_only_the_masked_tokens(policy):
    tok = policy.processor.tokenizer
    pad = tok.convert_tokens_to_ids("!")  # a pad id that is no special token (a checkpoint without one: id 0)
    assert pad not in tok.all_special_ids
    texts = ["a red cube on a table", "a cat"]
    rows = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    width = max(map(len, rows)) + 2
    completion = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[i < len(r) for i in range(width)] for r in rows])
    assert policy.decode(completion, mask) == texts
    # Without the mask (mask=None, the former behaviour) the pad leaks into the caption.
    assert all(t.endswith("!!") for t in policy.decode(completion))
    with pytest.raises(ValueError, match="does not match"):
        policy.decode(completion, mask[:, :-1])
