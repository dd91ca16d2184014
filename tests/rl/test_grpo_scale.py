"""Unified-GRPO's last conventions against the references' code (TRL's grpo_trainer.py 1.16,
Flow-GRPO's scripts/train_sd3.py and config/grpo.py at ac4c86e) and what only shows at scale. Each
reference below is written from the published formula or code, not from ours. The 2-process
halves (captions split by rank, sharded launches refused) are in test_multiprocess.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import train_grpo
from conftest import REFS

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*argv):
    from uae.train import parse

    return parse([str(a) for a in argv])[0]


# ----------------------------------------------------------------------------- advantages

def trl_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """TRL 1.16 `_generate_and_score_completions` (sum_then_normalize): torch's default std is
    Bessel-corrected, as TRL's nanstd on rewards without NaN."""
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(G)
    else:
        std = rewards.std().expand_as(rewards)
    adv = rewards - mean
    return adv / (std + 1e-4) if scale != "none" else adv


def flow_grpo_advantages(rewards: np.ndarray, prompts: list, global_std: bool, clip: float) -> np.ndarray:
    """Flow-GRPO's PerPromptStatTracker.update (np.std, no Bessel), then its clamp at adv_clip_max."""
    prompts = np.array(prompts)
    adv = np.zeros_like(rewards)
    for p in np.unique(prompts):
        r = rewards[prompts == p]
        std = (np.std(rewards) if global_std else np.std(r)) + 1e-4
        adv[prompts == p] = (r - np.mean(r)) / std
    return np.clip(adv, -clip, clip)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_g4u_advantages_are_trls(scale):
    from uae.rl.grpo import group_advantages

    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g, dtype=torch.float64).float()
    ids = torch.arange(3).repeat_interleave(8)
    ours = group_advantages(rewards, ids, scale=scale, unbiased=True, clip=0)
    assert torch.allclose(ours.values, trl_advantages(rewards, 8, scale), atol=1e-5)
    assert ours.keep.all() and ours.skipped_groups == 0


@pytest.mark.parametrize("global_std", [True, False])
def test_u4g_advantages_are_flow_grpos(global_std):
    from uae.rl.grpo import group_advantages

    rng = np.random.default_rng(0)
    rewards = rng.random(48).astype(np.float32)
    rewards[40] = 9.0                                    # an outlier whose advantage is clipped at 5
    prompts = [f"p{i // 24}" for i in range(48)]
    ref = flow_grpo_advantages(rewards.astype(np.float64), prompts, global_std, clip=5.0)
    ours = group_advantages(torch.from_numpy(rewards), torch.arange(2).repeat_interleave(24),
                            scale="batch" if global_std else "group", unbiased=False, clip=5.0)
    assert np.allclose(ours.values.numpy(), ref, atol=1e-5) and (np.abs(ref) == 5.0).any() == global_std


def test_zero_variance_group_has_advantage_zero_and_is_flagged():
    from uae.rl.grpo import group_advantages

    r = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.7, 0.5])     # 0.3 x 3: r - mean is not exactly 0 in float
    for scale in ("group", "batch", "none"):
        adv = group_advantages(r, torch.tensor([0, 0, 0, 1, 1, 1]), scale=scale, unbiased=True)
        assert torch.equal(adv.values[:3], torch.zeros(3)) and adv.values[3:].abs().min() > 0
        assert adv.keep.tolist() == [False] * 3 + [True] * 3 and adv.skipped_groups == 1


# ----------------------------------------------------------------------------- TRL's normalisers

def _micro_batches(seed=0, processes=2, accumulation=2, rows=3, tokens=7):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(processes, accumulation, rows, tokens, generator=g)
    lengths = torch.randint(0, tokens + 1, (processes, accumulation, rows), generator=g)
    lengths[0, 0, 0] = 0                                  # a caption with no token in the loss (masked out)
    mask = torch.arange(tokens) < lengths[..., None]
    return loss, mask


def trl_micro_batch_loss(per_token_loss, mask, loss_type, accumulation, num_items_in_batch, num_processes,
                         max_completion_length):
    """TRL 1.16 `GRPOTrainer._compute_loss`, its aggregation (mode "train", steps_per_generation =
    gradient_accumulation_steps, as one generation batch per optimizer step)."""
    mask = mask.float()
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / accumulation
    normalizer = torch.tensor(num_items_in_batch).clamp(min=1.0) / num_processes
    return (per_token_loss * mask).sum() / normalizer


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_token_loss_is_trls_normaliser(loss_type):
    """Per micro-batch as TRL's code writes it, and over the whole optimizer step (2 processes x 2
    accumulated micro-batches, averaged by DDP) as the normaliser is defined."""
    from uae.rl.grpo import token_loss

    loss, mask = _micro_batches()
    P, A, B, T = loss.shape
    tokens = float(mask.sum())
    step = 0.0
    for p in range(P):
        for a in range(A):
            ours = token_loss(loss[p, a], mask[p, a], loss_type, accumulation_steps=A, tokens_in_batch=tokens,
                              num_processes=P, max_completion_length=T)
            theirs = trl_micro_batch_loss(loss[p, a], mask[p, a], loss_type, A, tokens, P, T)
            assert torch.allclose(ours, theirs, atol=1e-6), (p, a)
            step += ours.item() / P                       # DDP: the processes' mean of their accumulated sums
    m = mask.float()
    defined = {"dapo": (loss * m).sum() / m.sum(),                                       # mean over all tokens
               "bnpo": ((loss * m).sum((2, 3)) / m.sum((2, 3)).clamp(min=1)).mean(),                  # mean of micro-batch means
               "grpo": ((loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean(),             # mean of caption means
               "dr_grpo": (loss * m).sum() / (P * A * B * T)}[loss_type]                 # sum / (captions x L)
    assert abs(step - defined.item()) < 1e-5


def test_g4u_gradient_is_trls_loss(tiny_ckpt, grpo_recipe):
    """One g4u optimizer step's gradient (two micro-batches, dapo, beta 0.1 to the LoRA-free LLM)
    equals TRL's loss written here over all the iteration's tokens at once: a zero-variance group's
    tokens count in the denominator and take the KL; with mask_truncated_completions a caption cut
    at max_new_tokens takes no part; the old log-probs are the current ones (ratio 1)."""
    from uae.rl.iteration import iteration_share

    recipe = grpo_recipe("g4u", tiny_ckpt, "--prompts_per_iteration", 2, "--group_size", 2, "--max_new_tokens", 6,
                         "--train_batch_size", 2, "--beta", 0.1, "--kl_reference", "base", "--max_grad_norm", 0,
                         reward=lambda *a: [])
    enc = recipe.model.encoder
    roll = recipe.rollout(0, iteration_share(recipe.cfg, 0, len(recipe.refs), 1, 0))
    assert roll.old_log_probs is None and len(roll.rows) == 2
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0])             # group 0: zero variance
    roll.truncated = torch.tensor([False, True, False, True])
    grads = []
    recipe.optimizer.step = lambda *a, **k: grads.append(torch.cat([p.grad.flatten() for p in recipe.trainable]).clone())

    def reference(mask_truncated: bool):
        for p in recipe.trainable:
            p.grad = None
        mask = roll.token_mask & ~roll.truncated[:, None] if mask_truncated else roll.token_mask
        with torch.no_grad(), enc.llm.disable_adapter():
            ref = recipe.captioner.token_logprobs(enc.llm, roll.batch, roll.completion)
        lp = recipe.captioner.token_logprobs(enc.llm, roll.batch, roll.completion)
        ratio = torch.exp(lp - lp.detach())
        a = adv[:, None]
        per = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a) + 0.1 * (torch.exp(ref - lp) - (ref - lp) - 1)
        ((per * mask).sum() / mask.sum()).backward()
        return torch.cat([p.grad.flatten() for p in recipe.trainable]).clone()

    for masked in (False, True):
        recipe.cfg.mask_truncated_completions = masked
        recipe.update(roll, adv)
        expected = reference(masked)
        assert expected.norm() > 0
        assert torch.allclose(grads[-1], expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item()), masked
    assert (grads[0] - grads[1]).norm() > 1e-3 * grads[0].norm()   # the truncated captions did count before


def test_g4u_old_log_probs_only_when_an_update_is_not_the_first(tiny_ckpt, grpo_recipe):
    """With one optimizer step per rollout batch the old log-probs are the policy's own, detached
    (TRL's shortcut): no extra forward. With inner_epochs 2 they are computed at sampling time."""
    from uae.rl.iteration import iteration_share

    for inner, forwards in ((1, 0), (2, 2)):
        recipe = grpo_recipe("g4u", tiny_ckpt, "--prompts_per_iteration", 1, "--group_size", 4,
                             "--train_batch_size", 2, "--inner_epochs", inner, reward=lambda *a: [])
        calls = []
        real = recipe.captioner.token_logprobs
        recipe.captioner.token_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
        roll = recipe.rollout(0, iteration_share(recipe.cfg, 0, len(recipe.refs), 1, 0))
        assert len(calls) == forwards and (roll.old_log_probs is None) == (inner == 1)
        if inner == 2:   # on-policy: the stored log-probs are what the policy gives now
            with torch.no_grad():
                now = real(recipe.policy, roll.batch, roll.completion)
            assert torch.allclose(now, roll.old_log_probs, atol=1e-5)


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_g4u_runs_with_each_loss_type(tiny_ckpt, tmp_path):
    for loss_type in ("bnpo", "grpo", "dr_grpo"):
        out = tmp_path / loss_type
        argv = ["--config", "configs/grpo/tiny_g4u.yaml", "--checkpoint", tiny_ckpt, "--data", REFS,
                "--output_dir", out, "--scorer_weights", "tiny", "--max_iterations", 1, "--image_log_steps", 0,
                "--checkpointing_steps", 0, "--loss_type", loss_type, "--mask_truncated_completions"]
        assert train_grpo.main([str(a) for a in argv]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["loss_type"] == loss_type


# ----------------------------------------------------------------------------- stage 3

def test_detach_uncond_gradient_is_the_formula(tiny_uae):
    """v = v_u + g (v_c - v_u). Detached unconditional branch (Flow-GRPO's training forward): the
    gradient is g grad v_c; not detached: g grad v_c + (1 - g) grad v_u. Each branch's gradient
    from its own forward, here."""
    from uae.models.decoder import guided_velocity

    dit = tiny_uae.decoder.transformer
    params = [p for n, p in dit.named_parameters() if "lora_" in n]
    assert params
    before = [p.requires_grad for p in dit.parameters()]
    for p in dit.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, dit.config.in_channels, 8, 8, generator=g)
    pos, neg = (torch.randn(2, 6, dit.config.joint_attention_dim, generator=g) for _ in range(2))
    pooled = torch.randn(2, dit.config.pooled_projection_dim, generator=g)
    t, w, guidance = torch.tensor(500.0), torch.randn(2, dit.config.out_channels, 8, 8, generator=g), 4.5

    def grad(fn):
        for p in params:
            p.grad = None
        (fn() * w).sum().backward()
        return torch.cat([p.grad.flatten() for p in params]).clone()

    def branch(cond):
        return dit(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=cond, pooled_projections=pooled).sample

    try:
        g_c, g_u = grad(lambda: branch(pos)), grad(lambda: branch(neg))
        detached = grad(lambda: guided_velocity(dit, x, t, pos, neg, pooled, guidance, detach_uncond=True))
        full = grad(lambda: guided_velocity(dit, x, t, pos, neg, pooled, guidance))
    finally:
        for p, r in zip(dit.parameters(), before):
            p.requires_grad_(r)
            p.grad = None
    tol = 1e-4 * g_c.abs().max().item()
    assert torch.allclose(detached, guidance * g_c, atol=tol)
    assert torch.allclose(full, guidance * g_c + (1 - guidance) * g_u, atol=tol)
    assert (full - detached).norm() > 0.1 * detached.norm()


@pytest.mark.slow  # measured >8 s on 2 cores: out of the edit-test loop
def test_u4g_trains_with_the_unconditional_branch_detached_by_default(tiny_ckpt, tmp_path, monkeypatch):
    import uae.rl.flow_backends

    seen = []
    real = uae.rl.flow_backends.guided_velocity  # stage 3's velocity, through its backend

    def spy(*a, detach_uncond=False, **k):
        seen.append((torch.is_grad_enabled(), detach_uncond))
        return real(*a, detach_uncond=detach_uncond, **k)

    monkeypatch.setattr(uae.rl.flow_backends, "guided_velocity", spy)
    for flag, expected in ((None, True), ("false", False)):
        seen.clear()
        out = tmp_path / str(flag)
        argv = ["--config", "configs/grpo/tiny_u4g.yaml", "--checkpoint", tiny_ckpt, "--data", REFS,
                "--output_dir", out, "--scorer_weights", "tiny", "--max_iterations", 1, "--image_log_steps", 0,
                "--checkpointing_steps", 0] + ([] if flag is None else ["--detach_uncond", flag])
        assert train_grpo.main([str(a) for a in argv]) == 0
        trained = {d for grad, d in seen if grad}
        assert trained == {expected}                   # every forward with gradients; rollouts have none


def test_update_shares_are_drawn_anew_for_every_inner_epoch(tiny_ckpt, tmp_path, monkeypatch):
    import uae.methods.u4g
    from uae.methods.u4g import update_shares

    a, b = update_shares(48, 2, seed=0, it=3, epoch=0), update_shares(48, 2, seed=0, it=3, epoch=1)
    assert a != b and sorted(a[0] + a[1]) == sorted(b[0] + b[1]) == list(range(48))
    assert update_shares(48, 2, seed=0, it=3, epoch=1) == b      # a function of (seed, iteration, epoch): resumable
    calls = []
    monkeypatch.setattr(uae.methods.u4g, "update_shares", lambda *a: calls.append(a[3:]) or update_shares(*a))
    argv = ["--config", "configs/grpo/tiny_u4g.yaml", "--checkpoint", tiny_ckpt, "--data", REFS, "--output_dir",
            tmp_path / "run", "--scorer_weights", "tiny", "--max_iterations", 2, "--image_log_steps", 0,
            "--checkpointing_steps", 0, "--inner_epochs", 2]
    assert train_grpo.main([str(a) for a in argv]) == 0
    assert calls == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_cps_window_that_reaches_the_last_step_is_refused():
    from uae.errors import UAEError

    assert _cfg("--data", "x", "--sde_kind", "cps").sde_window is None           # all but the last: fine
    assert _cfg("--data", "x", "--sde_kind", "cps", "--sde_window", 0, 9).sde_window == [0, 9]
    assert _cfg("--data", "x", "--sde_kind", "sde", "--sde_window", 0, 10).sde_window == [0, 10]  # sde has noise there
    with pytest.raises(UAEError, match="--sde_window reaches the last step"):
        _cfg("--data", "x", "--sde_kind", "cps", "--sde_window", 5, 10)
    with pytest.raises(UAEError, match="--sde_window_range reaches the last step"):
        _cfg("--data", "x", "--sde_kind", "cps", "--sde_window_mode", "random", "--sde_window_range", 4, 10)
    # What the refusal prevents: CPS's noise scale is 0 at the last step, and the KL divides by it.
    from diffusers import FlowMatchEulerDiscreteScheduler

    from uae.rl.sde import sde_step

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    x, v = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    last = sde_step(v, x, sched.sigmas[9], sched.sigmas[10], 0.8, kind="cps", generator=torch.Generator().manual_seed(0))
    assert float(last.noise_scale.max()) == 0.0


def test_u4g_prompts_per_iteration_is_flow_grpos_48():
    """Flow-GRPO's SD3.5 configs: num_batches_per_epoch = int(48 / (gpus * 9 / 24)) batches of 9
    images per GPU, 24 per prompt: 48 prompts per epoch on 8 GPUs as on 32."""
    from uae.methods.u4g import U4GConfig

    for gpus in (8, 32):
        batches = int(48 / (gpus * 9 / 24))
        assert gpus * 9 * batches / 24 == 48
    assert U4GConfig(data="x").prompts_per_iteration == 48
    cfg = yaml.safe_load((ROOT / "configs" / "grpo" / "u4g.yaml").read_text())
    assert cfg["prompts_per_iteration"] == 48 and cfg["prompts_per_iteration"] * cfg["group_size"] % 8 == 0


# ----------------------------------------------------------------------------- launch configs

@pytest.mark.parametrize("stage", ["cold_start", "g4u", "u4g", "all"])
@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_grpo_refuses_fsdp_and_deepspeed_launches(stage, env, tiny_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(env, "true")
    code = train_grpo.main(["--stage", stage, "--data", str(REFS), "--output_dir", str(tmp_path / "run"),
                            "--checkpoint", str(tiny_ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and "not supported by Unified-GRPO" in err and "multi_gpu_ddp.yaml" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and not (tmp_path / "run").exists()
