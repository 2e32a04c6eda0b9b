"""The ShapesWorld demo path on the shipped pipeline: `tempflow train recipes/shapes.yaml` writes its pictures
and LoRA, a short run moves the reward, and `tempflow sample` / `tempflow eval` work with and without LoRA."""

import json
from pathlib import Path

import pytest
import yaml

from tempflow.cli import main
from tempflow.shapes.world import TASKS

SHAPES_RECIPE = str(Path(__file__).parents[1] / "recipes" / "shapes.yaml")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-demo")
    assert main(["train", SHAPES_RECIPE, "--output_dir", str(out), "--max_steps", "3", "--prompts_per_iteration",
                 "4", "--num_eval_prompts", "8", "--eval_num_inference_steps", "8", "--eval_steps", "100",
                 "--learning_rate", "3e-3", "--disable_progress_bar", "true"]) == 0
    return out


def test_shapes_recipe_writes_pictures_weights_and_metrics(demo_run):
    for name in ("reward_curve.png", "samples/before.png", "samples/after.png", "samples/before_after.png",
                 "pytorch_lora_weights.safetensors", "metrics.json"):
        assert (demo_run / name).is_file(), name
    summary = json.loads((demo_run / "metrics.json").read_text())
    assert {"eval/shapes", "eval/shapes_strict"} <= set(summary["final"])
    by_task = {key.rsplit("/", 1)[1] for key in summary["final"] if key.startswith("eval_task/shapes_strict/")}
    trained = yaml.safe_load(Path(SHAPES_RECIPE).read_text())["prompt_tasks"]
    assert set(trained) < set(TASKS) and by_task == set(trained)  # held-out prompts of the trained tasks only
    before, after = summary["evaluations"][0], summary["evaluations"][-1]
    assert after["eval/shapes"] != before["eval/shapes"]  # three updates move the held-out reward


@pytest.mark.parametrize("with_lora", [False, True])
def test_sample_and_eval_on_the_shipped_pipeline(demo_run, tmp_path, with_lora):
    lora = ["--lora", str(demo_run)] if with_lora else []
    assert main(["sample", "--prompt", "a photo of a red circle", "--num-steps", "4", "--output",
                 str(tmp_path / "samples"), *lora]) == 0
    assert (tmp_path / "samples" / "0000.png").is_file()
    assert main(["eval", "--limit", "6", "--num-steps", "4", "--output", str(tmp_path / "eval"), *lora]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert 0.0 <= result["rewards"]["shapes_strict"] <= 1.0 and result["num_prompts"] == 6
    per_task = result["per_task"]["shapes_strict"]  # the first held-out prompts are single objects then pairs
    assert set(per_task) <= set(TASKS) and per_task
