"""Sampler steps for flow-matching models: ODE (Euler), Flow-GRPO's SDE, and coefficients-preserving (CPS).

Conventions follow diffusers' ``FlowMatchEulerDiscreteScheduler``: ``x_σ = (1 − σ)·x₀ + σ·ε``, σ runs from
≈1 (noise) to 0 (data), the model predicts the velocity ``v ≈ ε − x₀`` and a step goes from ``sigma`` to
``sigma_next`` with ``dt = sigma_next − sigma < 0``. ``sigma`` and ``sigma_next`` are per-sample tensors of
shape ``[B]`` so one call can step a batch whose samples sit at different timesteps.

Every function computes in float32 (bf16 overflows in ``s²/σ``) and returns a :class:`StepOutput`. The
log-probability of a sample is the Gaussian log-density averaged over all latent dimensions, as in Flow-GRPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    next_latents: torch.Tensor
    """The sample ``x'`` at ``sigma_next``."""
    log_prob: torch.Tensor
    """``[B]`` log-density of ``next_latents`` under the step's Gaussian, mean over latent dims (0 for ODE)."""
    mean: torch.Tensor
    """The step's mean ``μ``."""
    std: torch.Tensor
    """``[B]`` standard deviation of the step's noise (0 for ODE)."""


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[B]`` tensor so it broadcasts against ``like`` (``[B, ...]``)."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_over_latent_dims(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``sample`` under ``N(mean, std²)`` per element, averaged over latent dims → ``[B]``."""
    std = _per_sample(std, sample)
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _mean_over_latent_dims(log_density)


def sde_noise_scale(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's ``s(σ) = a·sqrt(σ / (1 − σ))``; at σ = 1 the next σ stands in the denominator."""
    sigma, sigma_next = sigma.float(), sigma_next.float()
    denominator = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def sde_step_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Standard deviation ``s(σ)·sqrt(−Δ)`` of one SDE step's noise, ``[B]``."""
    dt = sigma_next.float() - sigma.float()
    return sde_noise_scale(sigma, sigma_next, noise_level) * torch.sqrt(-dt)


def _resolve_sample(mean, std, noise, next_latents, generator):
    if next_latents is not None:
        return next_latents.float()
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return mean + _per_sample(std, mean) * noise.float()


def sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    noise: torch.Tensor | None = None,
    next_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One Flow-GRPO SDE step from ``sigma`` to ``sigma_next``.

    ``μ = x·(1 + s²/(2σ)·Δ) + v·(1 + s²·(1−σ)/(2σ))·Δ`` and ``x' = μ + s·sqrt(−Δ)·z``. Pass ``next_latents``
    to score a given sample (log-prob recomputation) instead of drawing one; pass ``noise`` to fix ``z``.
    """
    x, v = latents.float(), velocity.float()
    s = _per_sample(sde_noise_scale(sigma, sigma_next, noise_level), x)
    sig = _per_sample(sigma.float(), x)
    dt = _per_sample(sigma_next.float() - sigma.float(), x)
    mean = x * (1 + s**2 / (2 * sig) * dt) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt
    std = sde_step_std(sigma, sigma_next, noise_level)
    sample = _resolve_sample(mean, std, noise, next_latents, generator)
    return StepOutput(sample, gaussian_log_prob(sample, mean, std), mean, std)


def cps_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    noise: torch.Tensor | None = None,
    next_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One coefficients-preserving step: re-mix the predicted data and noise so the marginal stays on the path.

    ``std = σ'·sin(aπ/2)``, ``x̂₀ = x − σ·v``, ``x̂₁ = x + (1−σ)·v``, ``μ = (1−σ')·x̂₀ + sqrt(σ'² − std²)·x̂₁``.
    The log-prob is ``−‖x' − μ‖²`` (mean over dims): constant terms are dropped, as in the reference code,
    because only differences between policies enter the ratio.
    """
    x, v = latents.float(), velocity.float()
    sig = _per_sample(sigma.float(), x)
    sig_next = sigma_next.float()
    std = sig_next * math.sin(noise_level * math.pi / 2)
    pred_data = x - sig * v
    pred_noise = x + (1 - sig) * v
    sig_next_b = _per_sample(sig_next, x)
    std_b = _per_sample(std, x)
    mean = (1 - sig_next_b) * pred_data + torch.sqrt(torch.clamp(sig_next_b**2 - std_b**2, min=0)) * pred_noise
    sample = _resolve_sample(mean, std, noise, next_latents, generator)
    log_prob = -_mean_over_latent_dims((sample - mean) ** 2)
    return StepOutput(sample, log_prob, mean, std)


def ode_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> StepOutput:
    """Plain Euler step ``x' = x + Δ·v`` (deterministic: log-prob and std are zero)."""
    x = latents.float()
    dt = _per_sample(sigma_next.float() - sigma.float(), x)
    mean = x + dt * velocity.float()
    zeros = torch.zeros(x.shape[0], device=x.device)
    return StepOutput(mean, zeros, mean, zeros)


STOCHASTIC_STEPS = {"sde": sde_step, "cps": cps_step}


@dataclass(frozen=True)
class StochasticStep:
    """The one stochastic step of a run: its kind (``"sde"`` or ``"cps"``) and noise level ``a``. The rollout draws
    its samples with it and the loss rescores them with it, so the two cannot disagree on either."""

    kind: str
    noise_level: float

    def __post_init__(self) -> None:
        if self.kind not in STOCHASTIC_STEPS:
            raise ValueError(f"unknown sde_type {self.kind!r}; expected one of {sorted(STOCHASTIC_STEPS)}")

    def __call__(self, latents, velocity, sigma, sigma_next, noise=None, next_latents=None, generator=None) -> StepOutput:
        return STOCHASTIC_STEPS[self.kind](latents, velocity, sigma, sigma_next, self.noise_level, noise=noise,
                                           next_latents=next_latents, generator=generator)

    def kl_std(self, out: StepOutput, sigma: torch.Tensor, sigma_next: torch.Tensor, normalization: str) -> torch.Tensor:
        """The std that the KL term divides by, ``[B]``: the step's own noise std ``s·sqrt(−Δ)``
        (``step_variance``: the exact Gaussian KL, as TempFlow-GRPO's code computes it), or Flow-GRPO's ``s(σ)``
        without the ``sqrt(−Δ)`` (``noise_scale``). CPS steps have no separate scale: both give their std."""
        if normalization == "noise_scale" and self.kind == "sde":
            return sde_noise_scale(sigma, sigma_next, self.noise_level).to(out.std.device)
        return out.std


def step_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Exact KL between two Gaussian steps of equal std: ``mean((μ_θ − μ_ref)²) / (2·std²)`` per sample, ``[B]``."""
    return _mean_over_latent_dims((mean.float() - reference_mean.float()) ** 2) / (2 * std.float() ** 2)
