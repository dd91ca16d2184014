"""Janus' image-token sampler with log-probabilities (uae.unified.janus_images) on the tiny Janus,
fp32 on CPU: it draws what transformers' generate draws, the teacher-forced recomputation gives the
sampled log-probabilities back with gradient (through the unconditional branch or not), a row's
tokens depend on its own seed only, a toy reward on the image tokens rises under REINFORCE on a
LoRA, and JanusAdapter generates through it at any guidance scale."""

import numpy as np
import pytest
import torch

from uae.errors import UAEError
from uae.random_weights.unified import resolve
from uae.unified.janus_images import ImageSample, image_token_logprobs, sample_image_tokens, unconditional_ids

PROMPTS = ["a red cube on a table", "x", "the quick brown fox jumps over the lazy dog by the river", "a mountain lake"]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    pass


def _janus():
    """The tiny Janus with its generation head at a trained model's scale: at the default init its
    image logits are ~0.01, the image-token distribution uniform whatever the prompt or guidance, and
    nothing here could tell the branches apart."""
    from transformers import AutoProcessor, JanusForConditionalGeneration

    path = resolve("tiny", "janus")
    model, processor = JanusForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    head = model.model.generation_head.vision_head.weight
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))
    return model, processor


@pytest.fixture(scope="module")
def janus():
    return _janus()


def _ids(processor) -> dict:
    tok = processor.tokenizer
    return dict(bos_id=tok.bos_token_id, boi_id=tok.convert_tokens_to_ids(processor.image_start_token),
                pad_id=tok.pad_token_id)


def _prompts(processor, texts):
    b = processor(text=list(texts), generation_mode="image", padding=True, padding_side="left", return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _sample(model, processor, texts, seeds, w=5.0, **kw) -> ImageSample:
    ids, mask = _prompts(processor, texts)
    return sample_image_tokens(model, ids, mask, generators=_gens(*seeds), guidance_scale=w, **_ids(processor), **kw)


def test_the_unconditional_prompt_keeps_only_bos_and_begin_of_image():
    ids = torch.tensor([[7, 7, 0, 5, 6, 12], [0, 9, 9, 9, 9, 12]])   # pad 7, BOS 0, BOI 12
    assert unconditional_ids(ids, 0, 12, 7).tolist() == [[7, 7, 0, 7, 7, 12], [0, 7, 7, 7, 7, 12]]
    assert unconditional_ids(ids, None, 12, 7).tolist() == [[7, 7, 7, 7, 7, 12], [7, 7, 7, 7, 7, 12]]


def test_it_draws_what_transformers_generate_draws(janus):
    """One prompt, guidance 5: the same tokens as JanusForConditionalGeneration.generate seeded with the
    same seed (its one global generator and ours then give the same draws)."""
    model, processor = janus
    ids, mask = _prompts(processor, PROMPTS[:1])
    model.generation_config.generation_kwargs = {"boi_token_id": _ids(processor)["boi_id"]}
    torch.manual_seed(3)
    theirs = model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", do_sample=True,
                            guidance_scale=5.0, top_k=0, top_p=1.0, temperature=1.0)
    assert torch.equal(_sample(model, processor, PROMPTS[:1], [3]).tokens, theirs)


@pytest.mark.parametrize("w, temperature", [(5.0, 1.0), (0.5, 0.7)])
def test_the_recomputed_logprobs_are_the_sampled_ones(janus, w, temperature):
    model, processor = janus
    ids, mask = _prompts(processor, PROMPTS)
    out = sample_image_tokens(model, ids, mask, generators=_gens(1, 2, 3, 4), guidance_scale=w,
                              temperature=temperature, **_ids(processor))
    assert out.tokens.shape == (4, model.config.vision_config.num_image_tokens) and out.guided.dtype == torch.float32
    assert (out.guided - out.conditional).abs().max() > 0.1                # the branches differ
    for mode, sampled in (("guided", out.guided), ("conditional", out.conditional)):
        again = image_token_logprobs(model, model, ids, mask, out.tokens, guidance_scale=w, temperature=temperature,
                                     mode=mode, **_ids(processor))
        assert again.requires_grad and torch.allclose(again, sampled, atol=1e-5), mode


def test_guidance_one_is_the_conditional_branch(janus):
    model, processor = janus
    out = _sample(model, processor, PROMPTS[:2], [1, 2], w=1.0)
    assert torch.equal(out.guided, out.conditional)
    ids, mask = _prompts(processor, PROMPTS[:2])
    lp = {mode: image_token_logprobs(model, model, ids, mask, out.tokens, guidance_scale=1.0, mode=mode,
                                     **_ids(processor)) for mode in ("guided", "conditional")}
    assert torch.equal(lp["guided"], lp["conditional"]) and torch.allclose(lp["guided"], out.guided, atol=1e-5)
    # Sampling at w = 1 draws from the conditional distribution: the unguided tokens differ from w = 5's.
    assert not torch.equal(out.tokens, _sample(model, processor, PROMPTS[:2], [1, 2], w=5.0).tokens)


def _reference_logits(model, ids, mask, tokens):
    """Teacher-forced generation-head logits written out plainly: the language model on the prompt's
    embeddings and the image tokens' generation embeddings, positions from the mask."""
    n = tokens.shape[1]
    full = torch.cat([mask, torch.ones(mask.shape[0], n - 1, dtype=mask.dtype)], 1)
    embeds = torch.cat([model.get_input_embeddings()(ids), model.prepare_embeddings_for_image_generation(tokens[:, :-1])], 1)
    pos = (full.cumsum(-1) - 1).clamp(min=0)
    h = model.model.language_model(inputs_embeds=embeds, attention_mask=full, position_ids=pos).last_hidden_state
    return model.model.generation_head(h[:, ids.shape[1] - 1:]).float()


def test_detach_uncond_takes_the_gradient_through_the_conditional_branch_only():
    model, processor = _janus()
    model.requires_grad_(False)
    weight = model.model.language_model.layers[-1].self_attn.v_proj.weight.requires_grad_(True)
    texts, w = PROMPTS[:2], 5.0
    ids, mask = _prompts(processor, texts)
    tokens = _sample(model, processor, texts, [1, 2], w=w).tokens
    uncond_ids = unconditional_ids(ids, **_ids(processor))

    def grad(loss):
        weight.grad = None
        loss.sum().backward(retain_graph=True)
        return weight.grad.clone()

    ours = {d: grad(image_token_logprobs(model, model, ids, mask, tokens, guidance_scale=w, detach_uncond=d,
                                         **_ids(processor))) for d in (True, False)}
    c, u = _reference_logits(model, ids, mask, tokens), _reference_logits(model, uncond_ids, mask, tokens)
    ref = {d: grad(torch.log_softmax((u.detach() if d else u) + w * (c - (u.detach() if d else u)), -1)
                   .gather(-1, tokens[..., None])) for d in (True, False)}
    for d in (True, False):
        assert torch.allclose(ours[d], ref[d], rtol=1e-4, atol=1e-6), d
    assert (ours[True] - ours[False]).abs().max() > 0.1 * ours[False].abs().max()   # the uncond branch contributes


def test_a_rows_tokens_do_not_depend_on_its_batch_mates(janus):
    model, processor = janus
    alone = _sample(model, processor, PROMPTS[:1], [11])
    for order in ([1, 2, 0, 3], [0, 1, 2, 3]):                             # other prompts, longer and shorter
        texts = [PROMPTS[i] for i in order]
        seeds = [11 if i == 0 else 20 + i for i in order]
        batch = _sample(model, processor, texts, seeds)
        row = order.index(0)
        assert torch.equal(batch.tokens[row], alone.tokens[0])
        assert torch.allclose(batch.guided[row], alone.guided[0], atol=1e-5)
        assert torch.allclose(batch.conditional[row], alone.conditional[0], atol=1e-5)


def test_a_seed_repeats_its_tokens_and_another_seed_changes_them(janus):
    model, processor = janus
    a, b = _sample(model, processor, PROMPTS[:1], [5]), _sample(model, processor, PROMPTS[:1], [5])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.guided, b.guided)
    assert not torch.equal(a.tokens, _sample(model, processor, PROMPTS[:1], [6]).tokens)


def test_a_toy_reward_on_the_image_tokens_rises_under_reinforce():
    """REINFORCE on a LoRA of the language model's q_proj / v_proj: reward = the fraction of a row's
    image tokens in a fixed quarter of the codebook, advantage = reward - its group's mean (8 rows of
    one prompt), loss = -mean(advantage * mean log-prob of the tokens)."""
    from peft import LoraConfig, get_peft_model

    model, processor = _janus()
    model.requires_grad_(False)
    torch.manual_seed(0)                                                   # LoRA A's init
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    params = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.02)
    target = torch.arange(model.config.vq_config.num_embeddings) < model.config.vq_config.num_embeddings // 4
    ids, mask = _prompts(processor, PROMPTS[:1] * 8)
    kw = dict(guidance_scale=5.0, **_ids(processor))

    def rewards(seed0):
        tokens = sample_image_tokens(lora, ids, mask, generators=_gens(*range(seed0, seed0 + 8)), **kw).tokens
        return tokens, target[tokens].float().mean(-1)

    before = torch.cat([rewards(1000 + 8 * i)[1] for i in range(4)]).mean()
    for step in range(8):
        tokens, r = rewards(8 * step)
        logp = image_token_logprobs(lora, model, ids, mask, tokens, **kw)
        loss = -((r - r.mean()) * logp.mean(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.cat([rewards(1000 + 8 * i)[1] for i in range(4)]).mean()
    assert after > before + 0.3, (before, after)                         # measured 0.19 -> 0.90


def test_bad_inputs_are_one_line_errors(janus):
    model, processor = janus
    ids, mask = _prompts(processor, PROMPTS[:2])
    right = processor(text=PROMPTS[:2], generation_mode="image", padding=True, padding_side="right", return_tensors="pt")
    cases = [(lambda: sample_image_tokens(model, right["input_ids"], right["attention_mask"], generators=_gens(1, 2),
                                          guidance_scale=5.0, **_ids(processor)), "left-padded"),
             (lambda: sample_image_tokens(model, ids, mask, generators=_gens(1), guidance_scale=5.0, **_ids(processor)),
              "generators: 1 for 2 prompts"),
             (lambda: sample_image_tokens(model, ids, mask, generators=_gens(1, 2), guidance_scale=5.0, temperature=0,
                                          **_ids(processor)), "temperature 0"),
             (lambda: image_token_logprobs(model, model, ids, mask, torch.zeros(2, 16, dtype=torch.long),
                                           guidance_scale=5.0, mode="sampled", **_ids(processor)), "mode 'sampled'"),
             (lambda: sample_image_tokens(torch.nn.Linear(2, 2), ids, mask, generators=_gens(1, 2), guidance_scale=5.0,
                                          **_ids(processor)), "not a JanusForConditionalGeneration")]
    for call, says in cases:
        with pytest.raises(UAEError) as e:
            call()
        assert says in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- JanusAdapter

def _adapter():
    """JanusAdapter on the tiny Janus, its generation head at a trained model's scale (as _janus)."""
    from uae.models.encoder import RELEASE_CAPTION_INSTRUCTION
    from uae.unified.janus import JanusAdapter
    from uae.unified.protocol import RunSettings

    adapter = JanusAdapter(resolve("tiny", "janus"), RunSettings(caption_instruction=RELEASE_CAPTION_INSTRUCTION))
    head = adapter.model.model.generation_head.vision_head.weight
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))
    return adapter


@pytest.fixture(scope="module")
def adapter():
    return _adapter()


def _pixels(images):
    return [np.asarray(im) for im in images]


def test_the_adapter_generates_at_any_guidance_scale(adapter, monkeypatch):
    from dataclasses import replace

    for w in (1.0, 0.5):
        monkeypatch.setattr(adapter, "settings_", replace(adapter.settings_, guidance_scale=w))
        images = adapter.generate(PROMPTS[:2], [1, 2])
        assert len(images) == 2 and all(im.size == (32, 32) for im in images)
        assert adapter.settings()["generation"]["guidance_scale"] == w


def test_the_adapters_images_do_not_depend_on_images_per_call(adapter, monkeypatch):
    texts, seeds = PROMPTS * 2, [3, 1, 4, 1, 5, 9, 2, 6]
    together = _pixels(adapter.generate(texts, seeds))                   # one call (16 per call)
    monkeypatch.setattr(adapter, "images_per_call", 3)
    assert all(np.array_equal(a, b) for a, b in zip(together, _pixels(adapter.generate(texts, seeds))))
    s = adapter.settings()
    assert s["batch_invariant"] is True and s["generation"]["images_per_call"] == 3


def test_image_inputs_are_left_padded_prompts_ending_in_begin_of_image(adapter):
    batch = adapter.image_inputs(PROMPTS[:2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, -1] == adapter.boi).all() and mask[:, -1].all() and not mask[1, 0]
    assert adapter.bos_id == adapter.processor.tokenizer.bos_token_id and (ids[mask.bool()] == adapter.bos_id).sum() == 2
    assert adapter.pad_id == adapter.processor.tokenizer.pad_token_id


def test_the_caption_prompt_puts_the_image_before_the_instruction(adapter):
    prompt = adapter.caption_prompt()
    assert prompt.index("<image_placeholder>") < prompt.index(adapter.settings_.caption_instruction[:40])


def test_image_lora_chooses_whether_images_use_the_adapter():
    """A LoRA that moves the image logits: images with it off (image_lora False, the default) are the
    base model's; with it on they change."""
    from peft import LoraConfig, get_peft_model

    adapter = _adapter()
    base = _pixels(adapter.generate(PROMPTS[:2], [1, 2]))
    torch.manual_seed(0)                                                   # the LoRA's random init
    lora = get_peft_model(adapter.model, LoraConfig(r=2, target_modules=r".*language_model.*\.v_proj",
                                                    init_lora_weights=False))
    adapter.model = lora
    assert adapter.image_lora is False
    assert all(np.array_equal(a, b) for a, b in zip(base, _pixels(adapter.generate(PROMPTS[:2], [1, 2]))))
    adapter.image_lora = True
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(50)
    assert not all(np.array_equal(a, b) for a, b in zip(base, _pixels(adapter.generate(PROMPTS[:2], [1, 2]))))
