"""Guards against a run going wrong while its curve looks fine: the diversity measure, the two guards' decisions
(evaluation noise never fires them), and on ShapesWorld a deliberately hackable proxy reward that the gold guard
catches and stops, with the run report showing it."""

import json
from pathlib import Path

import pytest
import torch

from tempflow.cli import main
from tempflow.guards import Guards, group_diversity

RECIPE = str(Path(__file__).parents[1] / "recipes" / "shapes.yaml")


def test_diversity_is_the_mean_pairwise_rms_distance_within_groups():
    a, b = torch.zeros(4), torch.ones(4)
    features = torch.stack([a, a, a, b, b * 2])
    groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one sample: left out
    assert group_diversity(features, groups) == pytest.approx((0.0 + 1.0) / 2)
    assert group_diversity(torch.stack([a, a, a]), torch.tensor([0, 0, 0])) == 0.0  # identical samples
    unscored = torch.stack([a, torch.full((4,), float("nan")), b])
    assert group_diversity(unscored, torch.tensor([0, 0, 0])) == pytest.approx(1.0)


def test_gold_guard_fires_on_a_real_drop_with_a_rising_proxy_only():
    guards = Guards(gold_drop=0.05, diversity_fraction=None)
    assert guards.check_evaluation(0, gold=0.60, proxy=0.20, gold_se=0.05) is None
    assert guards.check_evaluation(1, gold=0.50, proxy=0.30, gold_se=0.05) is None  # 0.10 < 2·0.07: noise
    assert guards.check_evaluation(2, gold=0.40, proxy=0.15, gold_se=0.02) is None  # the proxy fell too
    event = guards.check_evaluation(3, gold=0.40, proxy=0.35, gold_se=0.02)
    assert event.guard == "gold_drop" and event.iteration == 3 and "from 0.600 (iteration 0) to 0.400" in event.message
    restored = Guards(gold_drop=0.05, diversity_fraction=None)
    restored.load(json.loads(json.dumps(guards.state())))  # checkpointed with the trainer's state
    assert restored.best_gold == 0.60 and len(restored.events) == 1


def test_diversity_guard_compares_the_last_iterations_with_the_first():
    guards = Guards(gold_drop=None, diversity_fraction=0.5)
    fired = [guards.check_iteration(i, d) for i, d in enumerate([0.2, 0.2, 0.2, 0.15, 0.12, 0.11, 0.05, 0.04])]
    assert fired[:6] == [None] * 6  # the last three (0.15, 0.12, 0.11) are still above half the first three
    assert fired[6] is not None and fired[6].guard == "diversity_collapse"


def test_a_hackable_proxy_is_caught_by_the_gold_guard_and_reported(tmp_path, capsys):
    """ShapesWorld with shapes_color_area (the share of pixels in the prompt's colours) as the training reward and
    the detector's strict accuracy as gold: the policy learns to paint colour instead of shapes, the gold guard stops
    the run with exit 3, and the report shows why."""
    out = tmp_path / "run"
    code = main(["train", RECIPE, "--output_dir", str(out), "--reward_funcs", "shapes_color_area",
                 "--gold_reward_funcs", "shapes_strict", "--eval_reward_funcs", "shapes_strict",
                 "--learning_rate", "3e-3", "--eval_steps", "3", "--max_steps", "12", "--num_eval_prompts", "48",
                 "--prompts_per_iteration", "4", "--save_steps", "100"])
    assert code == 3
    assert "training stopped by guard gold_drop" in capsys.readouterr().err
    summary = json.loads((out / "metrics.json").read_text())
    first, last = summary["evaluations"][0], summary["evaluations"][-1]
    assert summary["stopped_by_guard"]["guard"] == "gold_drop" and last["iteration"] < 12
    assert first["eval/gold"] - last["eval/gold"] > 2 * (first["eval/gold_se"] ** 2 + last["eval/gold_se"] ** 2) ** 0.5
    assert last["eval/reward"] > first["eval/reward"]  # the proxy rose while the gold fell
    assert (out / f"checkpoint-{last['iteration']}").is_dir()
    assert all(h["monitor/diversity"] > 0 for h in summary["history"]) and "monitor/kl_to_reference" in last

    assert main(["report", str(out)]) == 0
    page = (out / "report" / "report.html").read_text()
    assert "stopped by guard gold_drop" in page and "the proxy is being gamed" in page
    assert page.count("data:image/svg+xml;base64,") == 2  # reward curve and monitors: readable on its own,
    assert page.count("data:image/png;base64,") == 2  # with the samples before training and where it stopped
