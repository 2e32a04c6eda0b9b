"""Score rewards in the background while the trainer keeps working (Flow-GRPO scores a batch in a thread pool
while it samples the next). :class:`AsyncRewardScorer` wraps any reward callable; ``submit`` returns a
:class:`concurrent.futures.Future` whose ``result()`` is exactly what the reward returns for that batch, in
the batch's order, and whose exception names the reward."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from .combined import RewardError


class AsyncRewardScorer:
    """Scores batches with ``reward`` in worker threads.

    Args:
        reward (callable): ``reward(images, prompts, **metadata)``, e.g. a registered reward or a
            :class:`~tempflow.rewards.combined.CombinedReward`.
        name (str, optional): the reward's name in errors (defaults to its ``__name__`` or class name).
        max_workers (int, default 1): batches scored at once; above 1 the reward must be thread-safe.

    Use as a context manager, or call :meth:`close`, to wait for pending batches and stop the workers.
    """

    def __init__(self, reward, name: str | None = None, max_workers: int = 1):
        self.reward = reward
        self.name = name or getattr(reward, "__name__", type(reward).__name__)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"reward-{self.name}")

    def submit(self, images, prompts, **metadata) -> Future:
        """Start scoring one batch; the caller must not modify ``images`` in place until the result is in."""
        return self._executor.submit(self._score, images, list(prompts), metadata)

    def _score(self, images, prompts, metadata):
        try:
            return self.reward(images, prompts, **metadata)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward {self.name!r} raised {type(err).__name__}: {err}") from err

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> AsyncRewardScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
