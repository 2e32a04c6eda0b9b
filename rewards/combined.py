"""Several rewards as one: a weighted sum, with each component kept for logging and bad scores handled."""

from __future__ import annotations

import functools
import math
import threading
import warnings

import torch

from ..errors import RewardError
from . import get_reward
from .video import score_frames

__all__ = ["CombinedReward", "RewardError"]


class CombinedReward:
    """Score images with every reward; ``total = Σ wᵢ·rᵢ``. A sample that a reward could not score (``None``,
    NaN or inf, or the whole batch when the reward raises or exceeds ``timeout`` seconds) gets NaN in the
    total, or, with ``error_policy="raise"``, stops with the reward's name. Videos ``[B, F, 3, H, W]`` go whole to
    video rewards and frame by frame (``frames``, default all; averaged) to image rewards."""

    def __init__(self, rewards: dict, weights: list[float] | None = None, error_policy: str = "raise",
                 timeout: float | None = None, frames: list[int] | None = None):
        self.rewards = rewards
        self.weights = list(weights) if weights is not None else [1.0] * len(rewards)
        self.error_policy = error_policy
        self.timeout = timeout
        self.frames = frames

    @classmethod
    def from_names(cls, names: list[str], weights=None, error_policy: str = "raise",
                   kwargs: dict[str, dict] | None = None, timeout: float | None = None,
                   frames: list[int] | None = None) -> CombinedReward:
        """Resolve rewards by name; ``kwargs[name]`` goes to that reward's constructor."""
        kwargs = kwargs or {}
        return cls({name: get_reward(name, **kwargs.get(name, {})) for name in names}, weights, error_policy, timeout,
                   frames)

    def __call__(self, images: torch.Tensor, prompts: list[str], **metadata) -> tuple[torch.Tensor, dict]:
        components = {name: self._score(name, func, images, prompts, metadata) for name, func in self.rewards.items()}
        total = sum(w * c for w, c in zip(self.weights, components.values()))
        return total, components

    def _score(self, name, func, images, prompts, metadata) -> torch.Tensor:
        if images.ndim == 5 and not getattr(func, "video_reward", False):
            func = functools.partial(score_frames, func, frames=self.frames)
        try:
            scores = list(_call_with_timeout(func, self.timeout, images, prompts, **metadata))
        except Exception as err:
            if self.error_policy == "raise":
                raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
            warnings.warn(f"reward {name!r} raised {type(err).__name__}: {err}; its samples are skipped", stacklevel=2)
            return torch.full((len(prompts),), math.nan)
        if len(scores) != len(prompts):
            raise RewardError(f"reward {name!r} returned {len(scores)} scores for {len(prompts)} images")
        values = torch.tensor([_score_value(name, s) for s in scores], dtype=torch.float32)
        unscored = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if unscored:
            which = "; ".join(repr(prompts[i]) for i in unscored[:3]) + ("; ..." if len(unscored) > 3 else "")
            if self.error_policy == "raise":
                raise RewardError(f"reward {name!r} returned {len(unscored)} None/NaN/inf score(s) of {len(scores)} "
                                  f"(prompts: {which})")
            warnings.warn(f"reward {name!r} could not score {len(unscored)} sample(s), skipped (prompts: {which})",
                          stacklevel=2)
            values[~torch.isfinite(values)] = math.nan
        return values


def _score_value(name: str, score) -> float:
    """A score as a float (None: unscored, NaN). Anything but a number, a string "0.5" included, is a bug in
    the reward: named, with the value."""
    if score is None:
        return math.nan
    if not isinstance(score, (str, bytes)) and hasattr(score, "__float__"):
        try:
            return float(score)
        except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
            pass
    shown = repr(score) if len(repr(score)) <= 80 else repr(score)[:77] + "..."
    raise RewardError(f"reward {name!r} returned {shown} ({type(score).__name__}), not a number")


def _call_with_timeout(func, timeout: float | None, *args, **kwargs):
    """``func(*args, **kwargs)``, or ``TimeoutError`` after ``timeout`` seconds. A Python call cannot be killed:
    a timed-out reward runs on in a daemon thread and its result is dropped."""
    if timeout is None:
        return func(*args, **kwargs)
    outcome = {}

    def run():
        try:
            outcome["value"] = func(*args, **kwargs)
        except BaseException as err:  # handed to the caller, which decides by the error policy
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True, name="tempflow-reward")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no scores after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
