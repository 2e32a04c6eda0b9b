"""The clipped GRPO objective and TempFlow-GRPO's noise-aware timestep weights (DESIGN §3.1, §3.3)."""

from __future__ import annotations

import torch

from .sampling import sde_step_std


def noise_aware_weights(sigmas: torch.Tensor, sigmas_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """``w_i = s_i·sqrt(−Δ_i) / mean_k(s_k·sqrt(−Δ_k))`` over the trained steps given: mean 1, and larger where
    the step injects more noise (high σ), where exploration changes the outcome most."""
    stds = sde_step_std(sigmas, sigmas_next, noise_level)
    return stds / stds.mean()


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO surrogate ``mean(w·max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))`` with ``ρ = exp(logp − logp_old)``.

    Returns the loss and detached statistics (clip fraction, approximate KL to the rollout policy, ratios).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sample = per_sample * weights
    with torch.no_grad():
        stats = {
            "clip_fraction": (torch.abs(ratio - 1) > epsilon).float().mean(),
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "abs_log_ratio": (log_prob - old_log_prob).abs().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
        }
    return per_sample.mean(), stats
