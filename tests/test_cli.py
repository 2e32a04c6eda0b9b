"""The command line: train from a recipe with overrides, eval and sample, and clear failures on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tempflow.cli import EXIT_BAD_INPUT, main

TINY_RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")


def _train_args(model_dir, output_dir, *extra):
    return ["train", TINY_RECIPE, "--model_name_or_path", model_dir, "--output_dir", str(output_dir),
            "--max_sequence_length", "16", "--max_steps", "2", *extra]


def test_train_from_recipe_with_overrides(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(tiny_sd3_dir, out, "--num_eval_prompts", "2")) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "reward_curve.png").is_file()
    assert "eval/brightness" in summary["final"]

    evaluated = tmp_path / "eval"
    assert main(["eval", "--model", tiny_sd3_dir, "--lora", str(out), "--rewards", "brightness", "shapes_strict",
                 "--limit", "3", "--num-steps", "2", "--max-sequence-length", "16", "--output", str(evaluated)]) == 0
    result = json.loads((evaluated / "eval.json").read_text())
    assert set(result["rewards"]) == {"brightness", "shapes_strict"} and result["num_prompts"] == 3
    assert (evaluated / "eval_grid.png").is_file()

    samples = tmp_path / "samples"
    assert main(["sample", "--model", tiny_sd3_dir, "--prompt", "a red square", "a blue circle", "--num-steps", "2",
                 "--max-sequence-length", "16", "--output", str(samples)]) == 0
    assert sorted(p.name for p in samples.iterdir()) == ["0000.png", "0001.png", "grid.png"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward_funcs", "no_such_reward"], "unknown reward 'no_such_reward'"),
        (["--train_prompts", "EMPTY"], "holds no prompts"),
        (["--train_prompts", "BROKEN"], "line 2: not valid JSON"),
        (["--train_prompts", "/no/such/prompts.txt"], "does not exist"),
        (["--num_generations", "1"], "`num_generations`"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tiny_sd3_dir, tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    extra = [{"EMPTY": str(tmp_path / "empty.txt"), "BROKEN": str(tmp_path / "broken.jsonl")}.get(e, e) for e in extra]
    out = tmp_path / "run"
    assert main(_train_args(tiny_sd3_dir, out, *extra)) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_fails_clearly(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(str(tmp_path / "no-model"), out)) == EXIT_BAD_INPUT
    assert "no-model" in capsys.readouterr().err
    assert not out.exists()


def test_entry_point_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tempflow.cli", "train", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == EXIT_BAD_INPUT
    assert "missing.yaml" in result.stderr and "does not exist" in result.stderr


def test_train_help_lists_the_config_fields(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "{config_help}" not in text
    assert "--block_sparse_density" in text and "--learning_rate" in text
