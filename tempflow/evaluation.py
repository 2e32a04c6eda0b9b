"""Evaluation: deterministic ODE samples of a prompt set, scored with one or more rewards.

Shared by the trainer (held-out evaluation during training) and `tempflow eval` / `tempflow sample`.
Seeds derive from ``(seed, prompt position)``, so the same prompts get the same noise in every evaluation
and before/after comparisons see only the change in the model.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .editing import source_images
from .policies import FlowPolicy
from .prompts import metadata_columns
from .rollout import RolloutEngine


def evaluation_seeds(seed: int, positions: list[int], sample: int = 0) -> list[int]:
    """The noise seed of each prompt position; ``sample`` j > 0 gives the j-th further independent seed of each
    (sample 0 is the one every evaluation uses)."""
    key = [] if sample == 0 else [sample]
    return [int(np.random.SeedSequence([seed, 7, p, *key]).generate_state(1)[0]) for p in positions]


SCORING_CHUNK_SIZE = 32


def _chunks(count: int, size: int, description: str, progress: bool):
    """``(start, stop)`` ranges of ``size`` items with a progress bar counting images."""
    bar = tqdm(total=count, desc=description, unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, count, size):
        stop = min(start + size, count)
        yield start, stop
        bar.update(stop - start)
    bar.close()


@torch.no_grad()
def sample_images(
    policy: FlowPolicy,
    engine: RolloutEngine,
    records: list[dict],
    seeds: list[int],
    num_steps: int,
    progress: bool = False,
) -> torch.Tensor:
    """ODE samples ``[B, 3, H, W]`` in [0, 1], one per prompt record and seed, made a rollout batch at a time
    (noise is seeded per sample, so the chunking changes no image)."""
    embeds = policy.encode_records(records)
    images = []
    for start, stop in _chunks(len(records), engine.batch_size, "sampling", progress):
        latents = engine.sample(embeds, list(range(start, stop)), seeds[start:stop], num_steps)
        images.append(policy.decode(latents).cpu())
    return torch.cat(images)


def sample_prompt_set(
    policy: FlowPolicy,
    engine: RolloutEngine,
    records: list[dict],
    positions: list[int],
    seed: int,
    num_steps: int,
    samples_per_prompt: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """The evaluation samples of ``records``, which sit at ``positions`` of their prompt set: ``samples_per_prompt``
    ODE samples each, from :func:`evaluation_seeds`, sample-major (every prompt's first sample, then every
    prompt's second, ...). The trainer's evaluations, ``tempflow eval`` and ``tempflow sample`` all sample here."""
    seeds = [s for j in range(samples_per_prompt) for s in evaluation_seeds(seed, positions, sample=j)]
    return sample_images(policy, engine, records * samples_per_prompt, seeds, num_steps, progress)


def scores_by_task(
    components: dict[str, torch.Tensor],
    labels: list[str],
    tasks: list[str] | None = None,
    mean=lambda values: float(values.nanmean()),
) -> dict[str, dict[str, float]]:
    """``{component: {task: mean}}`` over the samples labelled with each task (NaN scores left out); ``tasks``
    (default: the labels, in first-seen order) fixes which tasks and in what order, and ``mean`` may reduce
    across processes (every process must then pass the same ``tasks``)."""
    tasks = list(dict.fromkeys(labels)) if tasks is None else tasks
    scores = {name: {} for name in components}
    for task in tasks:
        in_task = torch.tensor([label == task for label in labels], dtype=torch.bool)
        for name, values in components.items():
            scores[name][task] = mean(torch.where(in_task.to(values.device), values, torch.full_like(values, math.nan)))
    return scores


def worst_per_task(scores: torch.Tensor, labels: list[str], count: int) -> list[int]:
    """Indices of up to ``count`` samples, the lowest-scoring of each task in turn (tasks in first-seen order,
    ties in file order, NaN last)."""
    by_task: dict[str, list[int]] = {}
    for i in sorted(range(len(labels)), key=lambda i: scores[i].nan_to_num(nan=math.inf).item()):
        by_task.setdefault(labels[i], []).append(i)
    order = list(dict.fromkeys(labels))
    picked = []
    while len(picked) < min(count, len(labels)):
        picked += [by_task[task].pop(0) for task in order if by_task[task]][: count - len(picked)]
    return picked


def best_of_samples(components: dict[str, torch.Tensor], samples_per_prompt: int) -> dict[str, torch.Tensor]:
    """Scores of ``k`` samples per prompt (sample-major: all prompts' first samples, then their second, ...)
    → each prompt's best score over its samples (NaN left out). For a 0/1 reward its mean is pass@k."""
    best = {}
    for name, values in components.items():
        per_sample = values.reshape(samples_per_prompt, -1)
        top = per_sample.masked_fill(per_sample.isnan(), -math.inf).amax(0)
        best[name] = top.masked_fill(top == -math.inf, math.nan)  # no sample of the prompt was scored
    return best


def score_images(
    reward, images: torch.Tensor, records: list[dict], progress: bool = False
) -> tuple[torch.Tensor, dict]:
    """A :class:`~tempflow.rewards.combined.CombinedReward` applied to images of the given records."""
    totals, components = [], {}
    for start, stop in _chunks(len(records), SCORING_CHUNK_SIZE, "scoring", progress):
        chunk = records[start:stop]
        metadata = metadata_columns(chunk)
        sources = source_images(chunk, *images.shape[-2:])
        if sources is not None:  # edits: the rewards see what was edited beside the result
            metadata["source_images"] = sources
        total, parts = reward(images[start:stop], [r["prompt"] for r in chunk], **metadata)
        totals.append(total)
        for name, values in parts.items():
            components.setdefault(name, []).append(values)
    return torch.cat(totals), {name: torch.cat(values) for name, values in components.items()}
