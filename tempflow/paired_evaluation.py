"""Paired evaluation: comparisons of training methods that stand outside their own noise.

Every method is scored on one fixed *panel* of (prompt, noise seed) samples, so the noise that all methods share
cancels from their differences. A panel score is a matrix ``[prompts, seeds]``; its mean's standard error counts
the noise seeds (the prompts are the population asked about, all of them evaluated). Across training runs, a
hierarchical bootstrap resamples the training seeds of each method and, shared by every method (paired), the
panel's noise seeds, so an interval holds both sources of noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

PANEL_STREAM = 11  # key of the panel's noise seeds (evaluation_seeds uses 7)


@dataclass(frozen=True)
class Panel:
    """``len(prompts) × num_seeds`` samples: sample ``k·P + i`` is prompt i with noise seed index k."""

    prompts: list[dict]
    """One record per distinct prompt."""
    num_seeds: int
    stream: int
    """Which family of noise seeds (one panel for validation, another for test)."""

    @classmethod
    def of(cls, records: Sequence[dict], num_seeds: int, stream: int) -> Panel:
        """The distinct prompts of ``records`` (first occurrence kept, in order) with ``num_seeds`` noise seeds."""
        if num_seeds < 2:
            raise ValueError(f"a panel needs at least 2 noise seeds for its standard error, got {num_seeds}")
        first = {}
        for record in records:
            first.setdefault(record["prompt"], record)
        distinct = list(first.values())
        if not distinct:
            raise ValueError("a panel needs at least one prompt")
        return cls(distinct, num_seeds, stream)

    @property
    def records(self) -> list[dict]:
        return [r for _ in range(self.num_seeds) for r in self.prompts]

    @property
    def seeds(self) -> list[int]:
        """The noise seed of every sample: a function of (stream, prompt index, seed index) only, so every method
        and every run samples the same panel."""
        return [int(np.random.SeedSequence([PANEL_STREAM, self.stream, i, k]).generate_state(1)[0])
                for k in range(self.num_seeds) for i in range(len(self.prompts))]

    def matrix(self, scores: Sequence[float]) -> np.ndarray:
        """Per-sample scores (in :attr:`records` order) as ``[prompts, seeds]``."""
        values = np.asarray(scores, dtype=np.float64)
        if values.shape != (len(self.prompts) * self.num_seeds,):
            raise ValueError(f"expected {len(self.prompts) * self.num_seeds} scores, got {values.shape}")
        return values.reshape(self.num_seeds, len(self.prompts)).T


def mean_and_standard_error(matrix: np.ndarray) -> tuple[float, float]:
    """Mean of a ``[prompts, seeds]`` panel score and its standard error over noise seeds:
    ``sqrt(Σ_i s_i² / K) / P`` with ``s_i²`` prompt i's variance over its K seeds (ddof 1)."""
    prompts, seeds = matrix.shape
    variance = matrix.var(axis=1, ddof=1)
    return float(matrix.mean()), float(np.sqrt(variance.sum() / seeds) / prompts)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a − b`` over the same panel and its standard error (smaller than either's when they correlate)."""
    return mean_and_standard_error(a - b)


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The x at which ``ys`` first reaches ``target``, interpolated linearly between points; 0 when the first
    point already does, None when no point does."""
    if len(ys) and ys[0] >= target:
        return float(xs[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 >= target > y0:
            return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))
    return None


@dataclass
class Run:
    """One training run's evaluation points: cost so far (transformer evaluations, seconds) and panel scores."""

    model_evals: list[float]
    seconds: list[float]
    panels: list[np.ndarray]
    """``[prompts, seeds]`` per point."""


def _run_curves(runs: list[Run], seed_index: np.ndarray) -> list[np.ndarray]:
    return [np.array([p[:, seed_index].mean() for p in run.panels]) for run in runs]


def _reach(runs: list[Run], curves: list[np.ndarray], target: float, key: str) -> float:
    """Mean over runs of the cost to reach ``target``; inf when a run never does."""
    costs = [first_crossing(getattr(run, key), curve, target) for run, curve in zip(runs, curves)]
    return float("inf") if any(c is None for c in costs) else float(np.mean(costs))


def _estimates(runs: dict[str, list[Run]], reference: str, seed_index: np.ndarray) -> dict[str, dict[str, float]]:
    curves = {m: _run_curves(r, seed_index) for m, r in runs.items()}
    target = float(np.mean([c[-1] for c in curves[reference]]))
    reference_evals = float(np.mean([r.model_evals[-1] for r in runs[reference]]))
    reference_seconds = float(np.mean([r.seconds[-1] for r in runs[reference]]))
    out = {}
    for method, method_runs in runs.items():
        out[method] = {
            "final_accuracy": float(np.mean([c[-1] for c in curves[method]])),
            "evals_to_target_ratio": _reach(method_runs, curves[method], target, "model_evals") / reference_evals,
            "seconds_to_target_ratio": _reach(method_runs, curves[method], target, "seconds") / reference_seconds,
            "target": target,
        }
    return out


def bootstrap_comparison(
    runs: dict[str, list[Run]],
    reference: str,
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per method: its final panel accuracy (mean over runs), and the evaluations and seconds it needs to reach the
    ``reference`` method's final accuracy as fractions of the reference's own budget, each with a ``level`` interval
    from a hierarchical bootstrap (training runs per method, panel noise seeds shared). A run that never reaches the
    target makes its draw's ratio inf; an interval's upper end is then inf."""
    rng = np.random.default_rng(seed)
    num_seeds = runs[reference][0].panels[0].shape[1]
    every_seed = np.arange(num_seeds)
    point = _estimates(runs, reference, every_seed)
    samples = {m: {k: [] for k in point[m]} for m in runs}
    for draw in range(draws):
        resampled = {m: [r[i] for i in rng.integers(len(r), size=len(r))] for m, r in runs.items()}
        estimates = _estimates(resampled, reference, rng.integers(num_seeds, size=num_seeds))
        for method, values in estimates.items():
            for key, value in values.items():
                samples[method][key].append(value)
        if progress is not None:
            progress(draw)
    return {
        method: {key: {"estimate": point[method][key], **_interval(values, level)}
                 for key, values in samples[method].items()}
        for method in runs
    }


def bootstrap_final_difference(a: list[Run], b: list[Run], draws: int = 2000, seed: int = 0,
                               level: float = 0.95) -> dict[str, float]:
    """Final panel accuracy of method ``a`` minus ``b`` (means over runs), with its hierarchical-bootstrap interval,
    and whether the interval excludes 0 (a difference resolvable at this budget)."""
    rng = np.random.default_rng(seed)
    num_seeds = a[0].panels[-1].shape[1]

    def difference(runs_a, runs_b, seed_index):
        return (np.mean([r.panels[-1][:, seed_index].mean() for r in runs_a])
                - np.mean([r.panels[-1][:, seed_index].mean() for r in runs_b]))

    values = [difference([a[i] for i in rng.integers(len(a), size=len(a))],
                         [b[i] for i in rng.integers(len(b), size=len(b))],
                         rng.integers(num_seeds, size=num_seeds)) for _ in range(draws)]
    interval = _interval(values, level)
    return {"estimate": float(difference(a, b, np.arange(num_seeds))), **interval,
            "resolved": bool(interval["low"] > 0 or interval["high"] < 0)}


def _interval(values: Sequence[float], level: float) -> dict[str, float]:
    """Percentile interval; "nearest" ranks, so draws of inf (a target never reached) give inf, not NaN."""
    tail = 100 * (1 - level) / 2
    return {"low": float(np.percentile(values, tail, method="nearest")),
            "high": float(np.percentile(values, 100 - tail, method="nearest"))}
