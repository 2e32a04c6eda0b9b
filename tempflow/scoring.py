"""Reward scoring that overlaps with the rollout: finished samples are decoded as the engine produces them and
scored in a background thread while the transformer keeps working on the rest.

In a branched rollout children finish all along (those branched late finish first), so most of the decoding
and scoring is hidden behind transformer work instead of following it. Results are assembled by sample index,
so they do not depend on the order in which samples finish.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .evaluation import score_images
from .guards import thumbnails
from .policies import FlowPolicy


class StreamingScorer:
    """Collects finished samples (``add``), decodes them in chunks of ``chunk_size`` and scores each chunk on a
    worker thread; ``results`` waits for all and returns the total reward and its components by sample. It also
    keeps a thumbnail of every decoded sample (:attr:`thumbnails` after ``results``: ``[samples, 3·32·32]``, for the
    diversity monitor of :mod:`tempflow.guards`)."""

    def __init__(self, policy: FlowPolicy, reward, records: list[dict], chunk_size: int):
        self.policy = policy
        self.reward = reward
        self.records = records
        self.chunk_size = chunk_size
        self._pending: list[tuple[int, int, torch.Tensor]] = []
        self._scored: list[tuple[list[int], Future]] = []
        self._thumbnails: list[tuple[list[int], torch.Tensor]] = []
        self.thumbnails: torch.Tensor | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tempflow-reward")

    def add(self, sample_index: list[int], prompt_index: list[int], latents: torch.Tensor) -> None:
        self._pending.extend(zip(sample_index, prompt_index, latents.split(1)))
        while len(self._pending) >= self.chunk_size:
            self._submit(self._pending[: self.chunk_size])
            self._pending = self._pending[self.chunk_size :]

    def _submit(self, chunk) -> None:
        sample_index = [s for s, _, _ in chunk]
        images = self.policy.decode(torch.cat([latent for _, _, latent in chunk]))
        self._thumbnails.append((sample_index, thumbnails(images)))
        records = [self.records[p] for _, p, _ in chunk]
        self._scored.append((sample_index, self._executor.submit(score_images, self.reward, images, records)))

    def results(self, num_samples: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._pending:
            self._submit(self._pending)
            self._pending = []
        total = torch.full((num_samples,), math.nan)
        components: dict[str, torch.Tensor] = {}
        if self._thumbnails:
            self.thumbnails = torch.full((num_samples, self._thumbnails[0][1].shape[1]), math.nan, dtype=torch.float16)
            for sample_index, small in self._thumbnails:
                self.thumbnails[sample_index] = small
        try:
            for sample_index, future in self._scored:
                chunk_total, chunk_components = future.result()
                total[sample_index] = chunk_total
                for name, values in chunk_components.items():
                    components.setdefault(name, torch.full((num_samples,), math.nan))[sample_index] = values
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)
        return total, components
