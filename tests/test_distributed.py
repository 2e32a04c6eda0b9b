"""Two CPU processes under `accelerate launch` (torchrun + gloo): ranks stay in sync, rewards are gathered,
and a two-process checkpoint resumes on one process.

accelerate's `--cpu --num_processes 2` starts a single process unless an MPI host file is given; several CPU
processes come from the torchrun launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tempflow.cli import main

TINY_RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")


def test_two_process_training_and_single_process_resume(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--model_name_or_path", tiny_sd3_dir, "--output_dir", str(out), "--max_sequence_length", "16",
              "--num_eval_prompts", "3"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "tempflow.cli", "train", TINY_RECIPE, *common, "--max_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "metrics.json").read_text())
    processes, prompts, children, branch_steps = 2, 2, 3, 3
    for step in summary["history"]:
        assert step["reward/count"] == processes * prompts * branch_steps * children
        assert step["train/rank_weight_divergence"] == 0.0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    assert main(["train", TINY_RECIPE, *common, "--max_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["iterations"] == 3 and len(resumed["history"]) == 3


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_accelerate_launch_configs_load_with_accelerates_own_reader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.mixed_precision == "no"  # the recipe's mixed_precision decides; see the file's comment
