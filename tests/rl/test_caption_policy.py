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


def test_row_sampler_draws_each_row_from_the_tempered_softmax():
    """RowSampler's draws follow softmax(scores / temperature), never a suppressed (-inf) token,
    and each row's draw is a function of its own generator only."""
    from uae.rl.captioners import RowSampler

    scores = torch.tensor([[1.0, 0.0, -1.0, 2.0, float("-inf"), 0.5]])
    n = 4000
    for temperature in (1.0, 0.5):
        sampler = RowSampler([torch.Generator().manual_seed(s) for s in range(n)], temperature)
        out = sampler(None, scores.expand(n, -1).clone())
        assert torch.all((out == 0).sum(1) == 1) and torch.all((out == 0) | (out == float("-inf")))
        picks = out.argmax(1)
        freq = torch.bincount(picks, minlength=6).float() / n
        expected = torch.softmax(scores[0] / temperature, dim=0)
        assert freq[4] == 0 and torch.allclose(freq, expected, atol=0.03), (temperature, freq, expected)
    # Row 7 draws the same whatever the other rows hold.
    mixed = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    mixed[7] = scores[0]
    alone = RowSampler([torch.Generator().manual_seed(7)], 1.0)(None, scores.clone())
    batched = RowSampler([torch.Generator().manual_seed(s) for s in range(8)], 1.0)(None, mixed)
    assert torch.equal(batched[7], alone[0])
    with pytest.raises(ValueError, match="2 rows, 1 generators"):
        RowSampler([torch.Generator()], 1.0)(None, mixed[:2])


@pytest.mark.parametrize("kind", ["captioner", "janus"])
def test_seeded_captions_do_not_depend_on_the_batch(kind):
    """CaptionPolicy.sample with one seed per row (stage 2's rollouts): a caption is the same sampled
    alone or beside others, in any order, so 1 and N processes sample the same captions; and
    another seed draws another caption (Janus's generate() drops a logits processor in its text
    mode: the policy must still reach it)."""
    from PIL import Image
    from skimage import data

    from uae.random_weights.unified import embedded
    from uae.unified.captioner import TransformersCaptioner
    from uae.unified.janus import JanusAdapter
    from uae.unified.protocol import RunSettings

    settings = RunSettings(max_new_tokens=8)
    cap = JanusAdapter(str(embedded("janus")), settings) if kind == "janus" else \
        TransformersCaptioner(str(embedded("captioner")), settings)
    policy = CaptionPolicy(cap.model, cap.model, cap.processor, cap.inputs, temperature=1.0, max_new_tokens=8,
                           sample_kwargs=cap.text_kwargs)
    a, b = (Image.fromarray(getattr(data, n)()).convert("RGB").resize((64, 64)) for n in ("astronaut", "coffee"))

    def sample(images, seeds):  # each row up to its end of sequence (a batch pads the rows that end early)
        batch = cap.inputs(images)
        rows = policy.sample(batch, seeds=seeds)[:, batch["input_ids"].shape[1]:].tolist()
        ends = [next((i + 1 for i, t in enumerate(r) if t in policy.eos_ids), len(r)) for r in rows]
        return [r[:e] for r, e in zip(rows, ends)]

    together = sample([a, b], [5, 6])
    assert together == sample([b, a], [6, 5])[::-1]
    assert together == sample([a], [5]) + sample([b], [6])
    twins = sample([a, a, a, a], [5, 9, 11, 13])
    assert len({tuple(t) for t in twins}) > 1  # the seed, not the image, draws
