"""Evaluation sampling and scoring in chunks (for progress bars) give what one pass gives; scores split by task;
held-out subsets keep every task."""

from collections import Counter

import pytest
import torch

from tempflow.evaluation import (
    SCORING_CHUNK_SIZE,
    best_of_samples,
    evaluation_seeds,
    sample_images,
    score_images,
    scores_by_task,
    worst_per_task,
)
from tempflow.prompts import load_prompts, record_task, select_tasks, spread_subset, task_labels
from tempflow.rewards.combined import CombinedReward
from tempflow.rollout import RolloutEngine
from tempflow.shapes.world import TASKS


def _tagged(images, prompts, tag, **metadata):
    return [float(image.mean()) + t for image, t in zip(images, tag)]


def test_chunked_sampling_gives_the_same_images_as_one_packed_call(sd3_policy, capsys):
    records = [{"prompt": p} for p in ["a red square", "two blue circles", "a green triangle"] * 2]
    seeds = evaluation_seeds(0, list(range(len(records))))
    one_pass = sample_images(sd3_policy, RolloutEngine(sd3_policy, 0.0, batch_size=64), records, seeds, 3)
    chunked = sample_images(sd3_policy, RolloutEngine(sd3_policy, 0.0, batch_size=4), records, seeds, 3,
                            progress=True)
    torch.testing.assert_close(chunked, one_pass, atol=1e-5, rtol=0)
    assert "sampling" in capsys.readouterr().err


def test_chunked_scoring_keeps_each_image_with_its_own_metadata():
    count = 2 * SCORING_CHUNK_SIZE + 3
    records = [{"prompt": f"p{i}", "tag": i} for i in range(count)]
    images = torch.full((count, 3, 4, 4), 0.5)
    total, components = score_images(CombinedReward({"tagged": _tagged}), images, records, progress=True)
    torch.testing.assert_close(total, torch.arange(count, dtype=total.dtype) + 0.5)
    torch.testing.assert_close(components["tagged"], total)


def test_record_task_reads_task_geneval_tag_and_shapes_spec():
    assert record_task({"prompt": "p", "task": "counting"}) == "counting"
    assert record_task({"prompt": "p", "tag": "position", "include": []}) == "position"
    assert record_task({"prompt": "p", "spec": {"task": "colors", "objects": []}}) == "colors"
    assert record_task({"prompt": "p"}) is None


def test_prompt_tasks_keeps_the_named_tasks_in_order_and_names_a_task_that_has_no_prompt():
    train = load_prompts("shapes:train")
    kept = select_tasks(train, ["counting", "colors"], "shapes:train")
    assert {record_task(r) for r in kept} == {"counting", "colors"}
    assert kept == [r for r in train if record_task(r) in ("counting", "colors")]
    assert select_tasks(train, None, "shapes:train") is train
    with pytest.raises(ValueError, match=r"'shapes:train' has no prompt of task\(s\) countng; its tasks: color_attr, colors, counting"):
        select_tasks(train, ["counting", "countng"], "shapes:train")


def test_scores_by_task_averages_each_component_within_its_task_and_skips_nan():
    records = [{"prompt": "p", "task": t} for t in ["b", "a", "b", "a", "b"]]
    components = {"strict": torch.tensor([1.0, 0.0, 0.0, 1.0, float("nan")]), "other": torch.arange(5.0)}
    labels = task_labels(records)
    assert scores_by_task(components, labels) == {"strict": {"b": 0.5, "a": 0.5}, "other": {"b": 2.0, "a": 2.0}}
    assert list(scores_by_task(components, labels)["strict"]) == ["b", "a"]  # first-seen order
    assert task_labels([{"prompt": "p"}] * 5) is None
    mixed = task_labels(records[:4] + [{"prompt": "p"}])
    assert scores_by_task(components, mixed)["other"] == {"b": 1.0, "a": 2.0, "(none)": 4.0}
    # A shard may lack a task that another process has: fixed tasks keep every process's reductions in step.
    fixed = scores_by_task(components, labels, tasks=["a", "b", "c"], mean=lambda v: int(v.isfinite().sum()))
    assert fixed["strict"] == {"a": 2, "b": 2, "c": 0}


def test_a_held_out_subset_spreads_over_every_task_of_a_task_sorted_file():
    records = load_prompts("shapes:eval")  # grouped by task, 200 prompts
    subset = spread_subset(records, 100)
    counts = Counter(record_task(r) for r in subset)
    assert len(subset) == 100 and set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1
    position = {id(r): i for i, r in enumerate(records)}  # by identity: the eval set repeats some prompts
    positions = [position[id(r)] for r in subset]
    assert positions == sorted(set(positions))  # in file order, no record twice
    assert spread_subset(records, None) == records and spread_subset(records, 500) == records
    assert spread_subset(records, 1) == records[:1]


def test_best_of_samples_is_pass_at_k_for_a_0_1_reward():
    # 3 prompts x 2 samples, sample-major: prompt 0 fails twice, prompt 1 passes once, prompt 2 has one NaN sample
    strict = torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0, 1.0])
    partial = torch.tensor([0.2, 0.9, float("nan"), 0.4, 0.1, float("nan")])
    best = best_of_samples({"strict": strict, "partial": partial}, samples_per_prompt=2)
    assert best["strict"].tolist() == [0.0, 1.0, 1.0]
    assert best["partial"][:2].tolist() == pytest.approx([0.4, 0.9]) and best["partial"][2].isnan()


def test_further_samples_get_their_own_seeds_and_sample_0_keeps_the_usual_ones():
    positions = list(range(5))
    first, second = evaluation_seeds(3, positions, sample=0), evaluation_seeds(3, positions, sample=1)
    assert first == evaluation_seeds(3, positions)
    assert len(set(first) | set(second)) == 10


def test_before_after_panel_takes_the_worst_prompt_of_each_task_in_turn():
    labels = ["a", "a", "a", "b", "b", "c"]
    scores = torch.tensor([1.0, 0.0, 0.5, float("nan"), 1.0, 0.0])
    assert worst_per_task(scores, labels, count=4) == [1, 4, 5, 2]
    assert sorted(worst_per_task(scores, labels, count=10)) == list(range(6))
