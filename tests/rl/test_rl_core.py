"""RL core: SDE / CPS steps and their log-probabilities, advantages, the PPO-clip loss."""

import math

import pytest
import torch

from uae.rl.grpo import flow_kl, group_advantages, ppo_clip_loss
from uae.rl.sde import sde_step, sde_window


def _state(seed=0, shape=(3, 4, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("sigma, sigma_next", [(0.9, 0.8), (0.5, 0.3), (1.0, 0.95)])
def test_sde_log_prob_is_the_gaussian_log_density(sigma, sigma_next):
    v, x = _state()
    a = 0.7
    step = sde_step(v, x, sigma, sigma_next, a, sigma_max=0.95, generator=torch.Generator().manual_seed(1))
    # Independent closed form, written out again from the paper's formulas.
    denom = 1 - (0.95 if sigma == 1 else sigma)
    s = a * math.sqrt(sigma / denom)
    d = sigma_next - sigma
    mu = x + (v + s * s / (2 * sigma) * (x + (1 - sigma) * v)) * d
    std = s * math.sqrt(-d)
    ref = torch.distributions.Normal(mu, std).log_prob(step.prev_sample).mean(dim=(1, 2, 3))
    assert torch.allclose(step.log_prob, ref, atol=1e-5)
    assert torch.allclose(step.mean, mu, atol=1e-6)
    again = sde_step(v, x, sigma, sigma_next, a, sigma_max=0.95, prev_sample=step.prev_sample)
    assert torch.allclose(again.log_prob, step.log_prob, atol=1e-6)


def test_cps_log_prob_and_mean():
    v, x = _state(2)
    step = sde_step(v, x, 0.6, 0.4, 0.8, kind="cps", generator=torch.Generator().manual_seed(3))
    x0, x1 = x - 0.6 * v, x + 0.4 * v
    s = 0.4 * math.sin(0.8 * math.pi / 2)
    mu = 0.6 * x0 + math.sqrt(0.4 ** 2 - s * s) * x1
    assert torch.allclose(step.mean, mu, atol=1e-6)
    assert torch.allclose(step.log_prob, -((step.prev_sample - mu) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_is_the_schedulers_euler_step(kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    v, x = _state(4)
    for i in (0, 4, 8):
        ours = sde_step(v, x, sched.sigmas[i], sched.sigmas[i + 1], 0.0, kind=kind, sigma_max=sched.sigmas[1]).prev_sample
        sched._step_index = None
        ref = sched.step(v, sched.timesteps[i], x).prev_sample
        assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_sde_window():
    assert sde_window(10, None) == [True] * 9 + [False]
    assert sde_window(10, (2, 4)) == [False, False, True, True] + [False] * 6
    with pytest.raises(ValueError):
        sde_window(10, (5, 12))


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    gid = torch.tensor([0, 0, 1, 1, 2, 2])
    adv = group_advantages(r, gid)
    e = 1e-4  # group 0: mean 2, std 1; group 1: no variance; group 2: mean 2, std 2
    expected = torch.tensor([-1 / (1 + e), 1 / (1 + e), 0.0, 0.0, -2 / (2 + e), 2 / (2 + e)])
    assert torch.allclose(adv.values, expected, atol=1e-6)
    assert adv.keep.tolist() == [True, True, False, False, True, True] and adv.skipped_groups == 1 and adv.groups == 3
    batch = group_advantages(r, gid, scale="batch")
    assert torch.allclose(batch.values, (r - torch.tensor([2, 2, 2, 2, 2, 2.0])) / (r.std(unbiased=False) + 1e-4))
    clipped = group_advantages(torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 100]), torch.zeros(8, dtype=torch.long), clip=2.0)
    assert clipped.values.max() == 2.0


def test_ppo_clip_loss_ratio_one_and_clipping():
    adv = torch.tensor([1.0, -1.0, 2.0])
    lp = torch.zeros(3, requires_grad=True)
    loss, stats = ppo_clip_loss(lp, lp.detach(), adv, 1e-4)
    assert abs(loss.item() + adv.mean().item()) < 1e-7 and stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0
    loss.backward()
    assert torch.allclose(lp.grad, -adv / 3)                              # raises log p where A > 0
    far = torch.tensor([1.0, 1.0, 1.0])                                   # ratio e: clipped for A > 0
    loss2, stats2 = ppo_clip_loss(far, torch.zeros(3), adv, 0.2)
    assert stats2["clip_frac"] == 1.0
    assert abs(loss2.item() - (-(1.2 * 1) + math.e * 1 - 1.2 * 2) / 3) < 1e-5


def test_flow_kl():
    m = torch.randn(2, 3, 4, 4)
    std = torch.tensor([0.5, 0.5]).view(2, 1, 1, 1)
    assert torch.equal(flow_kl(m, m, std), torch.zeros(2))
    assert torch.allclose(flow_kl(m + 1, m, std), torch.full((2,), 1 / (2 * 0.25)))


def test_per_sample_generators_make_noise_independent_of_batching():
    from uae.training.seeding import generator_for

    v, x = _state(5)
    whole = sde_step(v, x, 0.8, 0.6, 0.7, generator=[generator_for(0, j) for j in range(3)])
    parts = [sde_step(v[j:j + 1], x[j:j + 1], 0.8, 0.6, 0.7, generator=[generator_for(0, j)]) for j in range(3)]
    assert torch.allclose(whole.prev_sample, torch.cat([p.prev_sample for p in parts]))
