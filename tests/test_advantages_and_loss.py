"""Group-relative advantages, noise-aware weights and the clipped GRPO loss (DESIGN §3)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tempflow.advantages import group_advantages, group_spread
from tempflow.loss import clipped_policy_loss, noise_aware_weights


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups, "group", eps=0.0)
    for g in (0, 1):
        chunk = adv[groups == g]
        assert chunk.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert chunk.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)


def test_batch_std_and_none_scaling():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    batch = group_advantages(rewards, groups, "batch", eps=0.0)
    torch.testing.assert_close(batch, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / rewards.std(unbiased=False))
    none = group_advantages(rewards, groups, "none")
    torch.testing.assert_close(none, torch.tensor([-1.0, 1.0, -2.0, 2.0]))


def test_advantages_clip_and_constant_groups():
    adv = group_advantages(torch.tensor([0.0] * 9 + [1.0]), torch.zeros(10, dtype=torch.long), clip=2.0)
    assert adv.max().item() == 2.0
    flat = group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert torch.all(flat == 0)


def test_nan_rewards_get_zero_advantage_and_leave_stats_alone():
    rewards = torch.tensor([1.0, math.nan, 3.0])
    adv = group_advantages(rewards, torch.zeros(3, dtype=torch.long), eps=0.0)
    assert adv[1].item() == 0.0
    torch.testing.assert_close(adv[[0, 2]], torch.tensor([-1.0, 1.0]))


def test_bad_scale_rewards_is_rejected():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), "std")


def _sd35_sigmas(steps=10):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas


def test_noise_aware_weights_match_design_values_for_sd35():
    sigmas = _sd35_sigmas()
    weights = noise_aware_weights(sigmas[:9], sigmas[1:10], 0.7)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    expected = [1.58, 1.67, 1.21, 1.00, 0.88, 0.79, 0.72, 0.64, 0.51]
    assert weights.tolist() == pytest.approx(expected, abs=0.02)
    # beyond the σ = 1 special case of the first step, weights fall as σ falls
    assert all(a > b for a, b in zip(weights[1:].tolist(), weights[2:].tolist()))


def test_loss_is_minus_weighted_advantage_at_ratio_one():
    logp = torch.tensor([0.5, -0.3, 1.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    weights = torch.tensor([2.0, 1.0, 0.5])
    loss, stats = clipped_policy_loss(logp, logp.detach(), adv, 1e-4, weights)
    assert loss.item() == pytest.approx(-(adv * weights).mean().item())
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_fraction"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -(adv * weights) / 3)


def test_loss_clips_ratio():
    old = torch.zeros(2)
    logp = torch.tensor([0.1, -0.1], requires_grad=True)  # ratios ≈ 1.105 and 0.905
    adv = torch.tensor([1.0, -1.0])
    loss, stats = clipped_policy_loss(logp, old, adv, 0.01)
    # both ratios moved in the advantage's direction past the clip: the clipped (constant) term wins
    assert loss.item() == pytest.approx((-1.0 * 1.01 + 1.0 * 0.99) / 2, rel=1e-5)
    loss.backward()
    assert torch.all(logp.grad == 0)
    assert stats["clip_fraction"].item() == 1.0


def test_group_spread_finds_groups_that_teach_nothing():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 0.5])
    stds, spread = group_spread(rewards, torch.tensor([0, 0, 1, 1, 2, 2]))
    torch.testing.assert_close(stds, torch.tensor([0.0, 0.5, 0.0]))
    assert spread.tolist() == [False, True, False]  # group 2 has one scored sample: no spread
