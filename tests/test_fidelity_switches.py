"""The switches that pick a peer's convention (kl_normalization, cfg_uncond_gradient, loss_mean_over), each
against a hand computation on small tensors, and the stochastic step that rollout and loss share."""

import math

import pytest
import torch

from tempflow.advantages import informative_samples
from tempflow.policies import load_policy
from tempflow.policies.base import classifier_free_guidance
from tempflow.sampling import StochasticStep, step_kl


def test_kl_normalization_divides_by_the_step_variance_or_by_the_noise_scale():
    # σ = 0.5 → σ' = 0.25, a = 0.7: s = 0.7·sqrt(0.5 / 0.5) = 0.7; the step's std s·sqrt(−Δ) = 0.7·0.5 = 0.35
    step = StochasticStep("sde", 0.7)
    x, v = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    sigma, sigma_next = torch.tensor([0.5]), torch.tensor([0.25])
    out = step(x, v, sigma, sigma_next, noise=torch.zeros(1, 2, 2, 2))
    reference_mean = out.mean + 0.1  # every dimension 0.1 away
    exact = step_kl(out.mean, reference_mean, step.kl_std(out, sigma, sigma_next, "step_variance"))
    flow_grpo = step_kl(out.mean, reference_mean, step.kl_std(out, sigma, sigma_next, "noise_scale"))
    assert exact.item() == pytest.approx(0.01 / (2 * 0.35**2), rel=1e-5)  # 0.0408
    assert flow_grpo.item() == pytest.approx(0.01 / (2 * 0.7**2), rel=1e-5)  # 0.0102: 1/(−Δ) = 4× weaker

    cps = StochasticStep("cps", 0.7)  # no separate scale: both divide by σ'·sin(aπ/2)
    out = cps(x, v, sigma, sigma_next, noise=torch.zeros(1, 2, 2, 2))
    for normalization in ("step_variance", "noise_scale"):
        assert cps.kl_std(out, sigma, sigma_next, normalization).item() == pytest.approx(
            0.25 * math.sin(0.7 * math.pi / 2), rel=1e-6)


def test_stochastic_step_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="sde_type"):
        StochasticStep("ddim", 0.7)


@pytest.mark.parametrize("uncond_gradient", [True, False])
def test_cfg_gradient_reaches_the_unconditional_branch_only_when_asked(uncond_gradient):
    v_uncond, v_cond = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0, -1.0], requires_grad=True)
    guided = classifier_free_guidance(v_uncond, v_cond, 4.5, uncond_gradient)
    torch.testing.assert_close(guided.detach(), torch.tensor([1 + 4.5 * 2, 2 + 4.5 * -3]))  # the value is the same
    guided.sum().backward()
    torch.testing.assert_close(v_cond.grad, torch.full((2,), 4.5))
    expected_uncond = torch.full((2,), 1 - 4.5) if uncond_gradient else None  # d/du [u + s(c − u)] = 1 − s
    if expected_uncond is None:
        assert v_uncond.grad is None
    else:
        torch.testing.assert_close(v_uncond.grad, expected_uncond)


def test_sd3_velocity_without_uncond_gradient_trains_the_conditional_branch_times_the_scale(tiny_sd3_dir):
    """With the unconditional prediction detached, the gradient of the guided velocity is 4.5 × that of the
    conditional prediction alone (a policy at guidance 1, same weights); with it attached it is not."""
    gradients = {}
    for scale, uncond_gradient in ((4.5, False), (4.5, True), (1.0, False)):
        policy = load_policy(tiny_sd3_dir, resolution=64, guidance_scale=scale, max_sequence_length=16)
        policy.cfg_uncond_gradient = uncond_gradient
        latents = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
        embeds = policy.encode_prompts(["a red square", "two blue circles"])
        policy.velocity(latents, torch.tensor([0.9, 0.4]), embeds).sum().backward()
        gradients[scale, uncond_gradient] = torch.cat(
            [p.grad.flatten() for p in policy.transformer.parameters() if p.grad is not None])
    conditional = gradients[1.0, False]
    torch.testing.assert_close(gradients[4.5, False], 4.5 * conditional, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(gradients[4.5, True], 4.5 * conditional, rtol=1e-2, atol=1e-3)


def test_informative_samples_are_the_scored_ones_of_groups_with_spread():
    rewards = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 1.0, math.nan, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    assert informative_samples(rewards, groups).tolist() == [False] * 3 + [True, True, False] + [False] * 2


def test_child_slots_are_dropped_only_when_zero_at_every_branch_step():
    """A direct transcription of train_sd3_pr.py: the advantages of one ODE path form a [children, steps] table
    (child k's column holds the k-th child of every branch step); a row leaves the loss only if it is all zero."""
    from tempflow.advantages import group_advantages, informative_child_slots

    steps, children = 3, 4
    rewards = torch.tensor([
        [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],  # path 0: spread at step 0 only
        [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]],  # path 1: no spread anywhere
    ])  # [path, step, child], samples in the engine's order: path-major, then step, then child
    paths = torch.arange(2).repeat_interleave(steps * children)
    groups = torch.arange(2 * steps).repeat_interleave(children)
    flat = rewards.flatten()
    counted = informative_child_slots(flat, groups, paths).view(2, steps, children)

    advantages = group_advantages(flat, groups).view(2, steps, children)
    official_mask = advantages.transpose(1, 2).abs().sum(dim=2) != 0  # [path, child]: samples["advantages"] rows
    assert torch.equal(counted, official_mask[:, None, :].expand(2, steps, children))
    assert counted[0].all() and not counted[1].any()  # path 0's zero-advantage rows at steps 1-2 stay in the mean


def test_pooled_std_is_the_std_of_every_process_rewards():
    from tempflow.advantages import pooled_std

    first, second = torch.tensor([0.0, 1.0, float("nan"), 3.0]), torch.tensor([10.0, -2.0])
    everything = torch.tensor([0.0, 1.0, 3.0, 10.0, -2.0], dtype=torch.float64)
    second_moments = torch.tensor([2.0, 8.0, 104.0], dtype=torch.float64)  # its count, sum and sum of squares

    def gather(local):  # what Accelerator.gather brings: every process's moments, concatenated
        return torch.cat([local, second_moments])

    assert pooled_std(first, gather) == pytest.approx(float(everything.std(unbiased=False)), rel=1e-12)
    assert pooled_std(second) == pytest.approx(6.0)  # this process alone
    assert pooled_std(torch.tensor([float("nan")])) is None


def test_ema_updates_every_eighth_step_with_the_official_decay(tiny_sd3_dir):
    """EMAModuleWrapper (flow_grpo/ema.py) with decay 0.9 and update_step_interval 8, transcribed: after optimizer
    step n, if (n + 1) % 8 == 0, ema += (1 − min((1 + n)/(10 + n), 0.9))·(p − ema)."""
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    from tempflow.trainer_optimize import OptimizeMixin

    weight = torch.nn.Parameter(torch.zeros(3))
    probe = SimpleNamespace(config=SimpleNamespace(ema_update_interval=8), optimizer_steps=0,
                            ema=EMAModel([weight], decay=0.9), _ema_inputs=lambda: [weight])
    official = torch.zeros(3)
    for n in range(1, 101):
        with torch.no_grad():
            weight.add_(1.0)  # the trained weight after optimizer step n
        probe.optimizer_steps = n
        OptimizeMixin._update_ema(probe)
        if (n + 1) % 8 == 0:
            official += (1 - min((1 + n) / (10 + n), 0.9)) * (weight.detach() - official)
        torch.testing.assert_close(probe.ema.shadow_params[0], official, rtol=1e-6, atol=1e-5)
    assert not torch.equal(official, torch.zeros(3))  # it updated at n = 7, 15, ..., 95


def test_the_trainer_warns_when_launched_on_another_process_count_than_the_recipe_was_derived_for():
    from types import SimpleNamespace

    from tempflow.trainer_setup import SetupMixin

    probe = SimpleNamespace(config=SimpleNamespace(recipe_num_processes=48),
                            accelerator=SimpleNamespace(num_processes=8, is_main_process=True))
    with pytest.warns(UserWarning, match="derived for 48 processes, and 8 are running.*--num-processes 8"):
        SetupMixin._warn_on_process_count(probe)
    probe.accelerator.num_processes = 48
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SetupMixin._warn_on_process_count(probe)
