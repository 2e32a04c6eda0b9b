"""Evaluation: deterministic ODE samples of a prompt set, scored with one or more rewards.

Shared by the trainer (held-out evaluation during training) and `tempflow eval` / `tempflow sample`.
Seeds derive from ``(seed, prompt position)``, so the same prompts get the same noise in every evaluation
and before/after comparisons see only the change in the model.
"""

from __future__ import annotations

import numpy as np
import torch

from .policies import FlowPolicy
from .prompts import metadata_columns
from .rollout import RolloutEngine


def evaluation_seeds(seed: int, positions: list[int]) -> list[int]:
    return [int(np.random.SeedSequence([seed, 7, p]).generate_state(1)[0]) for p in positions]


@torch.no_grad()
def sample_images(
    policy: FlowPolicy, engine: RolloutEngine, records: list[dict], seeds: list[int], num_steps: int
) -> torch.Tensor:
    """ODE samples ``[B, 3, H, W]`` in [0, 1], one per prompt record and seed."""
    embeds = policy.encode_prompts([r["prompt"] for r in records])
    latents = engine.sample(embeds, list(range(len(records))), seeds, num_steps)
    return policy.decode(latents).cpu()


def score_images(reward, images: torch.Tensor, records: list[dict]) -> tuple[torch.Tensor, dict]:
    """A :class:`~tempflow.rewards.combined.CombinedReward` applied to images of the given records."""
    return reward(images, [r["prompt"] for r in records], **metadata_columns(records))
