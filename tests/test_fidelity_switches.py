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
