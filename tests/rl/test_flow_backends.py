"""Stage 3's generator backends (uae.rl.flow_backends) on the tiny random SD3 and FLUX pipelines:
at noise level 0 the sampler is the pipeline's own loop, SD3's negative branch gets its own pooled
vector, FLUX makes one forward per step on the pipeline's own timesteps, every targeted LoRA tensor
of FLUX gets a gradient, and a LoRA saved in diffusers' format loads into a plain pipeline and
changes its images. Bad pipelines are one-line errors."""

import pytest
import torch

from uae.errors import UAEError
from uae.random_weights.unified import resolve
from uae.rl.flow_backends import FLUX_LORA_TARGETS, FluxBackend, SD3Backend, backend_for, sample_trajectory
from uae.unified.pipeline import load_text_to_image

TEXTS = ["a red cat on a mat", "a blue sky"]
SIZE, STEPS, GUIDANCE = 32, 4, 4.0


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    pass


@pytest.fixture(scope="module", params=["tiny", "tiny-flux"])
def pipe(request):
    pipe = load_text_to_image(resolve(request.param, "generator"), torch.float32, "--generator")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _backend(pipe):
    return backend_for(pipe, SIZE, SIZE, "--generator", max_sequence_length=16)


def _gens(seeds=(3, 4)):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _call(pipe, **kw):
    """The pipeline's own __call__ on TEXTS (SD3 with a negative prompt of its own)."""
    extra = {"negative_prompt": "blurry"} if isinstance(_backend(pipe), SD3Backend) else {}
    return pipe(prompt=TEXTS, generator=_gens(), num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                width=SIZE, max_sequence_length=16, **extra, **kw).images


def _ours(pipe, backend, model=None, noise_level=0.0):
    cond = backend.batch(backend.encode(TEXTS, "blurry"))
    latents = backend.initial_latents(_gens())
    return sample_trajectory(backend, model or pipe.transformer, latents, backend.schedule(STEPS), cond,
                             guidance=GUIDANCE, noise_level=noise_level, kind="sde", window=None,
                             generator=_gens((5, 6)))


def test_at_noise_level_zero_the_trajectory_is_the_pipelines_own(pipe):
    backend = _backend(pipe)
    final, record = _ours(pipe, backend)
    expected = _call(pipe, output_type="latent")
    assert final.shape == expected.shape
    assert torch.allclose(final, expected, atol=1e-5), float((final - expected).abs().max())
    assert len(record) == STEPS - 1  # every step but the last is trained (Flow-GRPO)
    with torch.no_grad():
        images = backend.decode(final)
    assert images.shape == (2, 3, SIZE, SIZE) and 0 <= float(images.min()) and float(images.max()) <= 1
    # With noise the steps are stochastic, recorded with finite log-probabilities.
    noisy, record = _ours(pipe, backend, noise_level=0.7)
    assert not torch.allclose(noisy, final, atol=1e-3)
    assert all(torch.isfinite(lp).all() for *_, lp in record)


def _spy(transformer, calls):
    real = transformer.forward

    def forward(*args, **kwargs):
        calls.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})
        return real(*args, **kwargs)

    return forward


def test_sd3_gets_its_negative_prompts_own_pooled_vector(pipe, monkeypatch):
    backend = _backend(pipe)
    if not isinstance(backend, SD3Backend):
        pytest.skip("SD3 only")
    calls = []
    monkeypatch.setattr(pipe.transformer, "forward", _spy(pipe.transformer, calls))
    _ours(pipe, backend)
    _, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=TEXTS, prompt_2=None, prompt_3=None,
                                                   do_classifier_free_guidance=True, negative_prompt=["blurry"] * 2)
    assert len(calls) == STEPS  # both branches in one forward per step
    got = calls[0]["pooled_projections"]
    assert torch.equal(got[:2], neg_pooled) and torch.equal(got[2:], pooled)
    assert not torch.allclose(neg_pooled, pooled)


def test_flux_makes_one_forward_per_step_on_the_pipelines_timesteps(pipe, monkeypatch):
    backend = _backend(pipe)
    if not isinstance(backend, FluxBackend):
        pytest.skip("FLUX only")
    calls = []
    monkeypatch.setattr(pipe.transformer, "forward", _spy(pipe.transformer, calls))
    _ours(pipe, backend)
    ours = list(calls)
    _call(pipe, output_type="latent")
    theirs = calls[len(ours):]
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs):
        assert torch.equal(a["timestep"], b["timestep"]) and torch.equal(a["guidance"], b["guidance"])
    assert float(ours[0]["guidance"][0]) == GUIDANCE
    # FLUX.1-dev's dynamic shift moved the schedule off the plain linear one.
    sigmas = backend.schedule(STEPS).sigmas
    assert not torch.allclose(sigmas[:-1], torch.linspace(1, 1 / STEPS, STEPS))


def _add_lora(transformer, targets, seed=0):
    from peft import LoraConfig

    # alpha != rank: a LoRA saved without its config would load at another scale (alpha = rank).
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))


def test_a_lora_in_diffusers_format_loads_into_a_plain_pipeline(pipe, tmp_path):
    source = resolve("tiny-flux" if isinstance(_backend(pipe), FluxBackend) else "tiny", "generator")
    fresh = load_text_to_image(source, torch.float32, "--generator")
    fresh.set_progress_bar_config(disable=True)
    backend = _backend(fresh)
    base = _call(fresh, output_type="latent")
    _add_lora(fresh.transformer, backend.lora_targets)
    trained, _ = _ours(fresh, backend)
    assert not torch.allclose(trained, base, atol=1e-3)
    backend.save_lora(fresh.transformer, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    plain = load_text_to_image(source, torch.float32, "--generator")  # what a user of diffusers does
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(tmp_path / "lora"))
    loaded = _call(plain, output_type="latent")
    assert torch.allclose(loaded, trained, atol=1e-5), float((loaded - trained).abs().max())


def test_every_flux_lora_tensor_gets_a_gradient():
    """FLUX has no module whose output is dropped (unlike SD3's last joint block, whose context query
    feeds nothing: uae.models.decoder.unreachable_modules): a LoRA on FLUX_LORA_TARGETS trains whole."""
    pipe = load_text_to_image(resolve("tiny-flux", "generator"), torch.float32, "--generator")
    backend = _backend(pipe)
    _add_lora(pipe.transformer, FLUX_LORA_TARGETS)
    cond = backend.batch(backend.encode(TEXTS))
    x = backend.initial_latents(_gens())
    t = backend.schedule(STEPS).timesteps[1]
    backend.velocity(pipe.transformer, x, t, cond, GUIDANCE).square().mean().backward()
    lora = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in lora.values()), \
        [n for n, p in lora.items() if p.grad is None or float(p.grad.abs().max()) == 0]
    single = [n for n in lora if n.startswith("single_transformer_blocks.")]
    assert single  # the single-stream blocks' attention is wrapped too


def test_pipelines_stage_3_cannot_train_are_one_line_errors(pipe):
    from diffusers import DDIMScheduler

    with pytest.raises(UAEError, match="object is not a flow-matching pipeline stage 3 can train"):
        backend_for(object(), SIZE, SIZE, "--generator")
    with pytest.raises(UAEError, match="not a multiple of"):
        backend_for(pipe, 34, 32, "--generator")
    scheduler = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler()
        with pytest.raises(UAEError, match="not FlowMatchEulerDiscreteScheduler"):
            backend_for(pipe, SIZE, SIZE, "--generator")
    finally:
        pipe.scheduler = scheduler
