"""Group-relative advantages: rewards normalised within groups of samples that share a starting point.

Flow-GRPO groups the G images of one prompt. TempFlow-GRPO groups the G children branched from one ODE
state (same prompt, same seed, same step: the *seed group*), or, as an ablation, all children of a prompt at
one step (the *prompt group*). Either way the computation is the same: give every sample a group id.

Rewards may hold NaN for samples a reward could not score; they are left out of their group's statistics
and get advantage 0, so they push the policy nowhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import SCALE_REWARDS as SCALE_CHOICES

SPREAD_TOLERANCE = 1e-6
"""A group whose reward std is at most this has no spread: all its advantages are zero."""


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    batch_std: float | None = None,
) -> torch.Tensor:
    """``A = (r − mean_group(r)) / (std + eps)`` for flat ``rewards`` and integer ``group_ids`` of equal shape.

    ``scale_rewards``: ``"group"`` divides by each group's std, ``"batch"`` by the std of the whole batch
    (``batch_std``, e.g. :func:`pooled_std` over all processes; default: of ``rewards``), ``"none"`` only centres.
    Stds are population stds (``unbiased=False``), as in the reference code. ``clip`` clamps the result to ``±clip``.
    """
    if scale_rewards not in SCALE_CHOICES:
        raise ValueError(f"scale_rewards must be one of {SCALE_CHOICES}, got {scale_rewards!r}")
    valid, values, inverse, means, stds = _group_statistics(rewards, group_ids)
    centred = torch.where(valid, values - means[inverse], torch.zeros_like(values))
    if scale_rewards == "group":
        advantages = centred / (stds[inverse] + eps)
    elif scale_rewards == "batch":
        if batch_std is None and valid.any():
            batch_std = float(values[valid].std(unbiased=False))
        advantages = centred if batch_std is None else centred / (batch_std + eps)
    else:
        advantages = centred
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages


def pooled_std(rewards: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
    """Population std of the finite rewards of every process (None if there are none): each process's count, sum
    and sum of squares (float64), summed over ``gather``, which concatenates a tensor over processes (e.g.
    ``Accelerator.gather``; None: this process only). Flow-GRPO's ``global_std`` is this std over the rewards
    gathered from all GPUs."""
    values = rewards.double().flatten()
    values = values[torch.isfinite(values)]
    moments = torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64), values.sum(), (values**2).sum()])
    if gather is not None:
        moments = gather(moments).reshape(-1, 3).sum(dim=0)
    count, total, squares = (float(m) for m in moments)
    if count == 0:
        return None
    mean = total / count
    return max(squares / count - mean * mean, 0.0) ** 0.5


def group_spread(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (in ``torch.unique`` order of the ids): the std of its finite rewards, and whether it has any
    spread at all. A group whose rewards are all equal gets zero advantages: it teaches nothing."""
    stds = _group_statistics(rewards, group_ids)[-1]
    return stds, stds > SPREAD_TOLERANCE


def informative_samples(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Which samples get a non-zero advantage: scored (finite reward) and in a group with reward spread. Decided
    from the spread rather than by comparing advantages with 0, which float rounding of the group mean can miss."""
    valid, _, inverse, _, stds = _group_statistics(rewards, group_ids)
    return valid & (stds > SPREAD_TOLERANCE)[inverse]


def informative_child_slots(rewards: torch.Tensor, group_ids: torch.Tensor, trajectory_ids: torch.Tensor) -> torch.Tensor:
    """Per sample of a branched rollout: whether its *child slot* has any non-zero advantage. TempFlow-GRPO's
    ``train_sd3_pr.py`` stores the k-th children of one ODE path at every branch step as one sample (a row of
    per-step advantages) and drops a sample only when all of its advantages are zero; here the k-th sample of each
    group (in sample order) of one trajectory forms that slot."""
    informative = informative_samples(rewards, group_ids)
    _, groups = torch.unique(group_ids.flatten(), return_inverse=True)
    order = torch.argsort(groups, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order)) - torch.searchsorted(groups[order], groups[order])
    _, slots = torch.unique(torch.stack([trajectory_ids.flatten(), ranks]), dim=1, return_inverse=True)
    slot_informative = torch.zeros(int(slots.max()) + 1 if slots.numel() else 0).index_add_(0, slots, informative.float())
    return slot_informative[slots] > 0


def _group_statistics(rewards: torch.Tensor, group_ids: torch.Tensor):
    """``(valid, values, inverse, means, stds)``: which rewards are finite, the rewards with NaN set to 0, each
    sample's group index, and each group's mean and population std over its finite rewards."""
    rewards = rewards.float().flatten()
    group_ids = group_ids.flatten()
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} differ in shape")
    valid = torch.isfinite(rewards)
    values = torch.where(valid, rewards, torch.zeros_like(rewards))
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups).index_add_(0, inverse, valid.float()).clamp(min=1)
    means = torch.zeros(num_groups).index_add_(0, inverse, values) / counts
    centred = torch.where(valid, values - means[inverse], torch.zeros_like(values))
    stds = (torch.zeros(num_groups).index_add_(0, inverse, centred**2) / counts).sqrt()
    return valid, values, inverse, means, stds
