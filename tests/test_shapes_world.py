"""ShapesWorld: prompts, renderer, detector and the registered rewards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tempflow.rewards as rewards
from tempflow.shapes.detector import detect, partial_score, strict_score
from tempflow.shapes.world import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    TASKS,
    VOCABULARY,
    all_specs,
    draw_layout,
    load_prompt_set,
    prompt_for_spec,
    render_scene,
    sample_layout,
    sample_prompt,
)


@pytest.fixture(scope="module")
def rendered():
    """504 ground-truth scenes, 84 per task: (spec, image, detections)."""
    rng = np.random.default_rng(0)
    scenes = []
    for task in TASKS:
        for _ in range(84):
            spec = sample_prompt(rng, task=task)["spec"]
            image = render_scene(spec, rng)
            scenes.append((spec, image, detect(image)))
    return scenes


def _degenerate_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    images = {
        "blank": np.full((64, 64, 3), BACKGROUND, np.uint8),
        "white": np.full((64, 64, 3), 255, np.uint8),
    }
    for name, rgb in COLORS.items():
        images[f"all-{name}"] = np.broadcast_to(np.array(rgb, np.uint8), (64, 64, 3)).copy()
    for index in range(3):
        images[f"noise-{index}"] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return images


def test_sampled_prompts_are_consistent():
    rng = np.random.default_rng(0)
    for _ in range(300):
        item = sample_prompt(rng)
        assert item["prompt"] == prompt_for_spec(item["spec"])
        assert set(item["prompt"].split()) <= set(VOCABULARY)
        assert json.loads(json.dumps(item["spec"])) == item["spec"]
    assert sample_prompt(np.random.default_rng(3)) == sample_prompt(np.random.default_rng(3))
    prompts = [prompt_for_spec(spec) for task in TASKS for spec in all_specs(task)]
    assert len(prompts) == len(set(prompts)), "a prompt string belongs to two specs"


def test_detector_strict_accuracy_on_ground_truth(rendered):
    accuracy = np.mean([strict_score(image, spec, detections=found) for spec, image, found in rendered])
    assert accuracy >= 0.99
    assert min(partial_score(image, spec, detections=found) for spec, image, found in rendered) >= 0.99


def test_detector_tolerates_blur_and_noise():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    scores = []
    for _ in range(60):
        spec = sample_prompt(rng)["spec"]
        image = ndimage.gaussian_filter(render_scene(spec, rng).astype(float), (0.7, 0.7, 0))
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        scores.append(strict_score(image, spec))
    assert np.mean(scores) >= 0.95


def test_detector_is_resolution_independent():
    rng = np.random.default_rng(4)
    for size in (128, 512):
        spec = sample_prompt(rng, task="position")["spec"]
        assert strict_score(render_scene(spec, rng, size=size), spec) == 1.0


@pytest.mark.parametrize("name", list(_degenerate_images()))
def test_partial_score_near_zero_on_degenerate_images(name):
    image = _degenerate_images()[name]
    rng = np.random.default_rng(5)
    for task in TASKS:
        spec = sample_prompt(rng, task=task)["spec"]
        assert partial_score(image, spec) < 0.1
        assert strict_score(image, spec) == 0.0


def _objects_of(spec: dict) -> list[tuple]:
    return sorted((item["shape"], item["color"], item["count"]) for item in spec["objects"])


def test_wrong_scene_scores_zero(rendered):
    # pairs mostly within a task, some across; scenes with the same objects may be equivalent (a colors prompt
    # and a single_object prompt; "a left of b" and "b right of a"), so only different objects must fail
    n_compared = 0
    for (spec, _, _), (other_spec, _, found) in zip(rendered, rendered[7:] + rendered[:7]):
        if _objects_of(spec) != _objects_of(other_spec):
            assert strict_score(None, spec, detections=found) == 0.0
            assert partial_score(None, spec, detections=found) < 1.0
            n_compared += 1
    assert n_compared > 400


def test_swapped_colours_and_relations_fail():
    spec = {
        "task": "color_attr",
        "objects": [
            {"shape": "circle", "color": "red", "count": 1},
            {"shape": "triangle", "color": "green", "count": 1},
        ],
        "relation": None,
    }
    swapped = {
        **spec,
        "objects": [{**spec["objects"][0], "color": "green"}, {**spec["objects"][1], "color": "red"}],
    }
    image = render_scene(swapped, np.random.default_rng(0))
    assert strict_score(image, spec) == 0.0
    assert 0.0 < partial_score(image, spec) < 1.0
    position = {**spec, "task": "position", "relation": "left of"}
    mirrored = render_scene({**position, "relation": "right of"}, np.random.default_rng(0))
    assert strict_score(mirrored, position) == 0.0
    assert partial_score(mirrored, position) <= 0.6 + 1e-6


def test_counting_is_exact_and_extra_objects_fail():
    spec = {
        "task": "counting",
        "objects": [{"shape": "square", "color": "blue", "count": 3}],
        "relation": None,
    }
    rng = np.random.default_rng(0)
    four = render_scene({**spec, "objects": [{**spec["objects"][0], "count": 4}]}, rng)
    assert strict_score(four, spec) == 0.0 and strict_score(four, spec, allow_extra=True) == 0.0
    assert 0.5 < partial_score(four, spec) < 1.0
    single = {
        "task": "single_object",
        "objects": [{"shape": "square", "color": "blue", "count": 1}],
        "relation": None,
    }
    assert strict_score(four, single) == 0.0
    assert strict_score(four, single, allow_extra=True) == 1.0


def test_rendered_layouts_satisfy_their_spec():
    rng = np.random.default_rng(6)
    for task in TASKS:
        for _ in range(50):
            spec = sample_prompt(rng, task=task)["spec"]
            layout = sample_layout(spec, rng)
            assert len(layout) == sum(item["count"] for item in spec["objects"])
            for index, item in enumerate(layout):
                assert 10 <= item["side"] <= 20
                assert 0 <= item["x0"] and item["x0"] + item["side"] <= 64
                for other in layout[index + 1 :]:
                    apart_x = (
                        item["x0"] + item["side"] <= other["x0"] or other["x0"] + other["side"] <= item["x0"]
                    )
                    apart_y = (
                        item["y0"] + item["side"] <= other["y0"] or other["y0"] + other["side"] <= item["y0"]
                    )
                    assert apart_x or apart_y
            if spec["relation"] is not None:
                (ax, ay), (bx, by) = (
                    (item["x0"] + item["side"] / 2, item["y0"] + item["side"] / 2) for item in layout
                )
                expected = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}
                assert expected[spec["relation"]]
                found = {(d["shape"], d["color"]): d for d in detect(draw_layout(layout))}
                a, b = (found[(item["shape"], item["color"])] for item in spec["objects"])
                expected = {"left of": a["cx"] < b["cx"], "right of": a["cx"] > b["cx"]}
                assert {**expected, "above": a["cy"] < b["cy"], "below": a["cy"] > b["cy"]}[spec["relation"]]
    assert {spec["relation"] for spec in all_specs("position")} == set(RELATIONS)


def test_prompt_sets_load():
    train, evaluation = load_prompt_set("train"), load_prompt_set("eval")
    assert len(train) >= 1000 and len(evaluation) >= 100
    assert {item["spec"]["task"] for item in evaluation} == set(TASKS)
    assert not {item["prompt"] for item in train} & {item["prompt"] for item in evaluation}
    for item in train[:50] + evaluation:
        assert item["prompt"] == prompt_for_spec(item["spec"])
    with pytest.raises(ValueError):
        load_prompt_set("test")


def test_rewards_registered_and_scoring_a_batch():
    assert {"shapes", "shapes_strict"} <= set(rewards.available())
    items = load_prompt_set("eval")[:4]
    rng = np.random.default_rng(0)
    arrays = [render_scene(item["spec"], rng, size=128) for item in items]
    arrays[-1] = np.full((128, 128, 3), BACKGROUND, np.uint8)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    prompts = [item["prompt"] for item in items]
    specs = [item["spec"] for item in items]
    partial = rewards.get_reward("shapes")(images, prompts, spec=specs)
    strict = rewards.get_reward("shapes_strict")(images, prompts, spec=specs)
    assert partial[:3] == pytest.approx([1.0] * 3, abs=0.01) and partial[3] < 0.1
    assert strict == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="spec"):
        rewards.get_reward("shapes")(images, prompts)
