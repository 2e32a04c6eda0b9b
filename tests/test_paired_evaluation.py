"""Paired evaluation: the panel is the same for every method and run, its standard error is the noise-seed error of
the mean, pairing shrinks the error of a difference, and the bootstrap's intervals cover what they should."""

import numpy as np
import pytest

from tempflow.paired_evaluation import (
    Panel,
    Run,
    bootstrap_comparison,
    bootstrap_final_difference,
    first_crossing,
    mean_and_standard_error,
    paired_difference,
)

RECORDS = [{"prompt": p, "task": t} for p, t in (("a", "x"), ("b", "y"), ("a", "x"), ("c", "y"))]


def test_panel_is_every_distinct_prompt_times_fixed_seeds():
    panel = Panel.of(RECORDS, num_seeds=3, stream=0)
    assert [r["prompt"] for r in panel.prompts] == ["a", "b", "c"]
    assert [r["prompt"] for r in panel.records] == ["a", "b", "c"] * 3
    assert panel.seeds == Panel.of(RECORDS, 3, 0).seeds  # a function of the panel alone: paired across runs
    assert len(set(panel.seeds)) == 9 and not set(panel.seeds) & set(Panel.of(RECORDS, 3, 1).seeds)
    matrix = panel.matrix(list(range(9)))
    assert matrix.shape == (3, 3) and matrix[1].tolist() == [1, 4, 7]  # prompt b at seeds 0, 1, 2
    with pytest.raises(ValueError, match="expected 9 scores"):
        panel.matrix([0.0] * 8)
    with pytest.raises(ValueError, match="at least 2 noise seeds"):
        Panel.of(RECORDS, 1, 0)


def test_standard_error_matches_the_spread_of_repeated_panels():
    """Simulate the panel many times (fixed per-prompt success rates, fresh noise seeds): the formula's SE equals
    the observed std of the panel mean within a few percent."""
    rng = np.random.default_rng(0)
    rates = rng.uniform(0.1, 0.95, size=30)
    means, errors = [], []
    for _ in range(4000):
        matrix = (rng.random((30, 32)) < rates[:, None]).astype(float)
        mean, error = mean_and_standard_error(matrix)
        means.append(mean)
        errors.append(error)
    assert np.mean(errors) == pytest.approx(np.std(means), rel=0.05)
    assert np.mean(errors) < 0.015  # 30 prompts x 32 seeds resolves the bar


def test_pairing_shrinks_the_error_of_a_difference():
    rng = np.random.default_rng(1)
    shared = rng.random((30, 32))
    a = (shared < 0.7).astype(float)
    b = (shared < 0.65).astype(float)  # the same noise decides both methods' samples, as on one panel
    difference, error = paired_difference(a, b)
    assert difference == pytest.approx(a.mean() - b.mean())
    assert error < 0.5 * np.hypot(mean_and_standard_error(a)[1], mean_and_standard_error(b)[1])


def test_first_crossing_interpolates_and_says_never():
    assert first_crossing([0, 100, 200], [0.3, 0.35, 0.55], 0.45) == pytest.approx(150.0)
    assert first_crossing([0, 100], [0.5, 0.6], 0.4) == 0.0
    assert first_crossing([0, 100], [0.5, 0.6], 0.7) is None


def _runs(final_rate, seeds, rng, budget=1000.0, seconds=100.0, start=0.3):
    runs = []
    for _ in range(seeds):
        rate = final_rate + rng.normal(0, 0.01)
        panels = [(rng.random((30, 16)) < r).astype(float) for r in (start, (start + rate) / 2, rate)]
        runs.append(Run([0.0, budget / 2, budget], [0.0, seconds / 2, seconds], panels))
    return runs


def test_bootstrap_separates_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(2)
    runs = {"reference": _runs(0.6, 3, rng), "better": _runs(0.8, 3, rng), "same": _runs(0.6, 3, rng)}
    comparison = bootstrap_comparison(runs, "reference", draws=300)
    better = comparison["better"]["evals_to_target_ratio"]
    assert better["low"] <= better["estimate"] <= better["high"] < 1.0  # reaches the target well before the budget
    assert comparison["reference"]["final_accuracy"]["estimate"] == pytest.approx(
        np.mean([r.panels[-1].mean() for r in runs["reference"]]))
    gap = bootstrap_final_difference(runs["better"], runs["reference"], draws=300)
    null = bootstrap_final_difference(runs["same"], runs["reference"], draws=300)
    assert gap["resolved"] and gap["low"] > 0.1
    assert not null["resolved"] and null["low"] < 0 < null["high"]


def test_a_method_that_never_reaches_the_target_has_an_unbounded_interval():
    rng = np.random.default_rng(3)
    runs = {"reference": _runs(0.7, 3, rng), "worse": _runs(0.35, 3, rng)}
    ratio = bootstrap_comparison(runs, "reference", draws=100)["worse"]["evals_to_target_ratio"]
    assert ratio["estimate"] == float("inf") and ratio["high"] == float("inf")
