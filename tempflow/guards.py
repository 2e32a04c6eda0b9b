"""Monitors and guards against a run going wrong while its training curve looks fine: reward hacking (the proxy
reward rises while a held-out *gold* reward falls) and diversity collapse (the samples of a group become alike).

- :func:`group_diversity`: the mean pairwise RMS pixel distance between the samples of each advantage group
  (thumbnails of 32×32), averaged over groups; a group of identical images scores 0.
- :class:`Guards`: after each evaluation, ``gold_drop`` fires when the gold score has fallen below its best by more
  than the margin and by more than twice the two scores' combined standard error (a small evaluation set's noise
  never fires it), while the proxy stands above its value at that best; after each iteration, ``diversity_collapse``
  fires when diversity (the mean of the last few iterations) is below a fraction of the first iterations'. A guard
  that fires is recorded (``metrics.json``'s ``guards``, the trackers) and, with ``guard_action: stop``, ends the run
  after a checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

THUMBNAIL = 32
NOISE_SIGMAS = 2.0
"""A gold drop must exceed this many standard errors of the difference of two evaluations to count."""
DIVERSITY_WINDOW = 3
"""Iterations averaged at the start (the reference) and at the end (the current diversity)."""


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3·32·32]`` float16 thumbnails of images ``[B, 3, H, W]`` (videos: their middle frame) in ``[0, 1]``."""
    if images.ndim == 5:
        images = images[:, images.shape[1] // 2]
    small = torch.nn.functional.interpolate(images.float(), size=(THUMBNAIL, THUMBNAIL), mode="area")
    return small.flatten(1).to(torch.float16)


def group_diversity(features: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups (of at least two samples) of the mean pairwise RMS distance between their ``features``;
    NaN when no group has two samples. Non-finite rows (unscored samples) are left out."""
    features = features.float()
    keep = torch.isfinite(features).all(dim=1)
    scores = []
    for group in torch.unique(groups[keep]):
        members = features[keep & (groups == group)]
        if len(members) < 2:
            continue
        distances = torch.cdist(members, members) / members.shape[1] ** 0.5
        count = len(members)
        scores.append(distances.sum() / (count * (count - 1)))
    return float(torch.stack(scores).mean()) if scores else float("nan")


class GuardWarning(UserWarning):
    """A guard fired (with ``guard_action: warn`` the run goes on)."""


@dataclass
class GuardEvent:
    """A guard that fired."""

    guard: str
    iteration: int
    message: str
    action: str


@dataclass
class Guards:
    """The two guards' state across a run (checkpointed with the trainer's state)."""

    gold_drop: float | None
    """Margin below the best gold score that, with the proxy above its value then, fires ``gold_drop``."""
    diversity_fraction: float | None
    """Fraction of the starting diversity below which ``diversity_collapse`` fires."""
    action: str = "stop"
    best_gold: float | None = None
    best_gold_se: float = 0.0
    proxy_at_best: float | None = None
    best_iteration: int | None = None
    diversity: list[float] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def check_evaluation(self, iteration: int, gold: float | None, proxy: float | None,
                         gold_se: float | None = None) -> GuardEvent | None:
        if gold is None or gold != gold:  # no gold reward, or NaN
            return None
        se = gold_se if gold_se is not None and gold_se == gold_se else 0.0
        if self.best_gold is None or gold >= self.best_gold:
            self.best_gold, self.best_gold_se, self.proxy_at_best, self.best_iteration = gold, se, proxy, iteration
            return None
        noise = NOISE_SIGMAS * (self.best_gold_se**2 + se**2) ** 0.5
        if self.gold_drop is None or self.best_gold - gold <= max(self.gold_drop, noise):
            return None
        if proxy is None or self.proxy_at_best is None or proxy <= self.proxy_at_best:
            return None  # both fell: a bad run, not the proxy being gamed
        return self._fire("gold_drop", iteration,
                          f"the gold reward fell from {self.best_gold:.3f} (iteration {self.best_iteration}) to "
                          f"{gold:.3f} while the training reward rose from {self.proxy_at_best:.3f} to {proxy:.3f}: "
                          "the proxy is being gamed")

    def check_iteration(self, iteration: int, diversity: float) -> GuardEvent | None:
        if diversity != diversity:
            return None
        self.diversity.append(diversity)
        if self.diversity_fraction is None or len(self.diversity) < 2 * DIVERSITY_WINDOW:
            return None
        start = sum(self.diversity[:DIVERSITY_WINDOW]) / DIVERSITY_WINDOW
        now = sum(self.diversity[-DIVERSITY_WINDOW:]) / DIVERSITY_WINDOW
        if now >= self.diversity_fraction * start:
            return None
        return self._fire("diversity_collapse", iteration,
                          f"within-group diversity fell to {now:.4f}, {now / start:.0%} of its start ({start:.4f}); "
                          f"below the {self.diversity_fraction:.0%} guard_diversity_fraction")

    def _fire(self, guard: str, iteration: int, message: str) -> GuardEvent:
        event = GuardEvent(guard, iteration, message, self.action)
        self.events.append(asdict(event))
        return event

    def state(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in ("gold_drop", "diversity_fraction",
                                                                                  "action")}

    def load(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
