"""The sampler steps against the formulas of DESIGN §2."""

import math

import pytest
import torch

from tempflow.sampling import (
    cps_step,
    gaussian_log_prob,
    ode_step,
    sde_noise_scale,
    sde_step,
    sde_step_std,
    step_kl,
)


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 6, 6, generator=g), torch.randn(b, 4, 6, 6, generator=g)


def test_ode_step_is_euler():
    x, v = _batch()
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    out = ode_step(x, v, sigma, sigma_next)
    expected = x + (sigma_next - sigma).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(out.next_latents, expected)
    assert torch.all(out.log_prob == 0)


def test_sde_mean_matches_formula_per_sample():
    x, v = _batch()
    a = 0.7
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.1])
    out = sde_step(x, v, sigma, sigma_next, a, noise=torch.zeros_like(x))
    for i in range(3):
        s_, sn = sigma[i].item(), sigma_next[i].item()
        s = a * math.sqrt(s_ / (1 - s_))
        dt = sn - s_
        mean = x[i] * (1 + s**2 / (2 * s_) * dt) + v[i] * (1 + s**2 * (1 - s_) / (2 * s_)) * dt
        torch.testing.assert_close(out.mean[i], mean)
        assert out.std[i].item() == pytest.approx(s * math.sqrt(-dt), rel=1e-6)
    torch.testing.assert_close(out.next_latents, out.mean)


def test_sde_scale_uses_next_sigma_at_sigma_one():
    scale = sde_noise_scale(torch.tensor([1.0]), torch.tensor([0.9]), 0.7)
    assert scale.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.9)))
    assert torch.isfinite(scale).all()


def test_sde_log_prob_is_gaussian_density():
    x, v = _batch()
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.1])
    out = sde_step(x, v, sigma, sigma_next, 0.7, generator=torch.Generator().manual_seed(1))
    for i in range(3):
        dist = torch.distributions.Normal(out.mean[i], out.std[i])
        assert out.log_prob[i].item() == pytest.approx(dist.log_prob(out.next_latents[i]).mean().item(), rel=1e-5)
    # scoring a given sample gives the same log-prob as drawing it
    again = sde_step(x, v, sigma, sigma_next, 0.7, next_latents=out.next_latents)
    torch.testing.assert_close(again.log_prob, out.log_prob)


def test_sde_children_statistics_match_mean_and_std():
    x, v = _batch(b=1)
    n = 4000
    sigma, sigma_next = torch.full((n,), 0.6), torch.full((n,), 0.45)
    out = sde_step(x.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), sigma, sigma_next, 0.7,
                   generator=torch.Generator().manual_seed(0))
    expected_std = sde_step_std(sigma[:1], sigma_next[:1], 0.7).item()
    torch.testing.assert_close(out.next_latents.mean(0), out.mean[0], atol=4 * expected_std / math.sqrt(n) * 1.5, rtol=0)
    assert out.next_latents.std(0).mean().item() == pytest.approx(expected_std, rel=0.02)


def test_sde_step_computes_in_float32_from_bf16():
    x, v = _batch()
    out = sde_step(x.bfloat16(), v.bfloat16(), torch.tensor([0.9] * 3), torch.tensor([0.8] * 3), 0.7)
    assert out.next_latents.dtype == torch.float32 and torch.isfinite(out.log_prob).all()


def test_cps_step_formula():
    x, v = _batch()
    a = 0.7
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.1])
    noise = torch.randn_like(x)
    out = cps_step(x, v, sigma, sigma_next, a, noise=noise)
    for i in range(3):
        s, sn = sigma[i].item(), sigma_next[i].item()
        std = sn * math.sin(a * math.pi / 2)
        mean = (1 - sn) * (x[i] - s * v[i]) + math.sqrt(sn**2 - std**2) * (x[i] + (1 - s) * v[i])
        torch.testing.assert_close(out.mean[i], mean)
        torch.testing.assert_close(out.next_latents[i], mean + std * noise[i])
        assert out.log_prob[i].item() == pytest.approx(-((std * noise[i]) ** 2).mean().item(), rel=1e-5)


def test_step_kl_is_exact_gaussian_kl():
    mean_a, mean_b = _batch(b=2)
    std = torch.tensor([0.3, 0.5])
    kl = step_kl(mean_a, mean_b, std)
    for i in range(2):
        p = torch.distributions.Normal(mean_a[i], std[i])
        q = torch.distributions.Normal(mean_b[i], std[i])
        assert kl[i].item() == pytest.approx(torch.distributions.kl_divergence(p, q).mean().item(), rel=1e-5)


def test_gaussian_log_prob_broadcasts_per_sample_std():
    sample, mean = _batch(b=2)
    value = gaussian_log_prob(sample, mean, torch.tensor([1.0, 2.0]))
    assert value.shape == (2,)
