"""DiffusionNFT (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``): policy
optimisation on the forward (noising) process, with no likelihood and any sampler.

A rollout's final samples x₀ are re-noised, x_t = (1 − t)·x₀ + t·ε, at t drawn from the sampling schedule. The
current velocity v_θ and the old policy's v_old (a soft, EMA-like copy of θ that also draws the rollouts) define
two implicit policies,

    v⁺ = β·v_θ + (1 − β)·v_old        v⁻ = (1 + β)·v_old − β·v_θ,

and the loss pulls v⁺ toward x₀ in proportion to the sample's optimality probability r ∈ [0, 1] and v⁻ in
proportion to 1 − r, each squared x₀ error divided by its own detached mean absolute error (the official
"adaptive weighting"):

    L = C/β · mean_samples[ r·‖x̂₀⁺ − x₀‖²/w⁺ + (1 − r)·‖x̂₀⁻ − x₀‖²/w⁻ ],   x̂₀^± = x_t − t·v^±,

with C = ``adv_clip_max`` and r = clamp(clamp(A, ±C)/(2C) + ½, 0, 1) from the group-relative advantage A.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .rollout import Rows

ADAPTIVE_WEIGHT_FLOOR = 1e-5
"""The official lower clip of the adaptive weight (a sample predicted exactly would otherwise divide by 0)."""


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r = clamp(clamp(A, ±C)/C/2 + 1/2, 0, 1): advantage −C ↦ 0, 0 ↦ ½, +C ↦ 1."""
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2 + 0.5).clamp(0, 1)


def _per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def _adaptively_weighted_error(x0_prediction: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per sample: mean((x̂₀ − x₀)²) / mean|x̂₀ − x₀| (the divisor detached, in float64, floored)."""
    with torch.no_grad():
        weight = (x0_prediction.double() - x0.double()).abs()
        weight = weight.mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=ADAPTIVE_WEIGHT_FLOOR)
    return _per_sample_mean((x0_prediction - x0) ** 2 / weight)


def diffusion_nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    clean_latents: torch.Tensor,
    noised_latents: torch.Tensor,
    sigmas: torch.Tensor,
    optimality: torch.Tensor,
    mix_beta: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample DiffusionNFT loss (the module docstring's L before the mean) and detached statistics.

    ``velocity`` carries the gradient; ``old_velocity`` is detached here. ``sigmas`` are the per-sample t (``[B]``),
    ``optimality`` the per-sample r."""
    t = sigmas.view(-1, *([1] * (clean_latents.ndim - 1)))
    old_velocity = old_velocity.detach()
    positive = mix_beta * velocity + (1 - mix_beta) * old_velocity
    negative = (1 + mix_beta) * old_velocity - mix_beta * velocity
    positive_error = _adaptively_weighted_error(noised_latents - t * positive, clean_latents)
    negative_error = _adaptively_weighted_error(noised_latents - t * negative, clean_latents)
    per_sample = (optimality * positive_error + (1 - optimality) * negative_error) / mix_beta * adv_clip_max
    with torch.no_grad():
        stats = {
            "nft/positive_loss": positive_error.mean(),
            "nft/negative_loss": negative_error.mean(),
            "nft/old_deviation": ((velocity - old_velocity) ** 2).mean(),
            "nft/optimality_mean": optimality.mean(),
        }
    return per_sample, stats


def old_policy_decay(optimizer_steps: int, flat_steps: float, rate: float, maximum: float) -> float:
    """The old policy's soft-update decay after ``optimizer_steps`` steps: 0 for the first ``flat_steps``, then
    rising by ``rate`` per step up to ``maximum`` (the official ``return_decay``: decay_type 1 is (0, 0.001, 0.5),
    2 is (75, 0.0075, 0.999), 0 is (0, 0, 0): the old policy is θ)."""
    if optimizer_steps < flat_steps:
        return 0.0
    return min((optimizer_steps - flat_steps) * rate, maximum)


class OldPolicy:
    """θ_old: a copy of the trainable weights that draws the rollouts and gives v_old, updated after every
    iteration as θ_old ← d·θ_old + (1 − d)·θ. Swapping it in exchanges tensor storage with the live weights (no
    copy), for forward passes without gradient; FSDP gathers its weights from buffers of its own, so sharded
    weights are exchanged by value instead (``swap_by_copy``, one weight's shard of scratch memory at a time).
    Checkpoints keep its weights (``tempflow.state_files``; under FSDP each process its slice)."""

    def __init__(self, parameters: list[torch.nn.Parameter], swap_by_copy: bool = False):
        self.parameters = parameters
        self.weights = [p.detach().clone() for p in parameters]
        self.swap_by_copy = swap_by_copy

    @contextlib.contextmanager
    def swapped_in(self):
        """The live parameters hold θ_old inside the block (for no-grad forwards only)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for parameter, old in zip(self.parameters, self.weights):
            if self.swap_by_copy:
                live = parameter.detach().clone()
                parameter.detach().copy_(old)
                old.copy_(live)
            else:
                live = parameter.data
                parameter.data = old.data
                old.data = live

    @torch.no_grad()
    def soft_update(self, decay: float) -> None:
        for parameter, old in zip(self.parameters, self.weights):
            old.mul_(decay).add_(parameter.detach().to(old.dtype), alpha=1 - decay)


@dataclass
class ForwardRows(Rows):
    """DiffusionNFT's training rows: one (final sample, t) pair each; the loss re-noises the sample at t with
    noise drawn from ``noise_seed``."""

    clean_latents: torch.Tensor
    sigmas: torch.Tensor
    noise_seed: torch.Tensor
    prompt_index: torch.Tensor
    sample_index: torch.Tensor
    step_index: torch.Tensor
    """Index of t in the rollout's σ schedule."""
    advantages: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.clean_latents.device
