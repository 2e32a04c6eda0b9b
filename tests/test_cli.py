"""The command line: train from a recipe with overrides, eval and sample, and clear failures on bad input."""

import json
import os
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
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red square\ntwo blue circles\na green triangle\n")
    out = tmp_path / "run"
    assert main(_train_args(tiny_sd3_dir, out, "--eval_prompts", str(prompts))) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "reward_curve.png").is_file()
    assert "eval/brightness" in summary["final"]

    # the exported LoRA (tiny.yaml: r 4, alpha 8), scored by `tempflow eval` on the trainer's own evaluation
    # prompts, seeds and sampler, gives the trainer's final score: the same images
    evaluated = tmp_path / "eval"
    assert main(["eval", "--model", tiny_sd3_dir, "--lora", str(out), "--rewards", "brightness", "jpeg_compressibility",
                 "--prompts", str(prompts), "--seed", "42", "--num-steps", "4", "--guidance-scale", "1",
                 "--max-sequence-length", "16", "--output", str(evaluated)]) == 0
    result = json.loads((evaluated / "eval.json").read_text())
    assert set(result["rewards"]) == {"brightness", "jpeg_compressibility"} and result["num_prompts"] == 3
    assert result["rewards"]["brightness"] == pytest.approx(summary["final"]["eval/brightness"], abs=1e-6)
    assert summary["evaluations"][0]["eval/brightness"] != pytest.approx(result["rewards"]["brightness"], abs=1e-4)
    assert (evaluated / "eval_grid.png").is_file()

    several = tmp_path / "eval-k"
    assert main(["eval", "--model", tiny_sd3_dir, "--rewards", "brightness", "--prompts", str(prompts), "--seed", "42",
                 "--num-steps", "2", "--max-sequence-length", "16", "--samples-per-prompt", "3",
                 "--output", str(several)]) == 0
    result = json.loads((several / "eval.json").read_text())
    assert result["samples_per_prompt"] == 3 and result["best_of_k"]["brightness"] > result["rewards"]["brightness"]

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


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write to: by its mode, or, for root (whom modes do not stop), by a
    read-only mount."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("running as root where a read-only tmpfs cannot be mounted")
    yield path
    subprocess.run(["umount", str(path)], check=True)


BAD_INPUT = {  # case: (recipe lines added to tiny.yaml, extra arguments, output_dir, what the one line says)
    "fractional int": (["num_generations: 2.5"], [], None, "config `num_generations`: must be an integer (got 2.5)"),
    "scalar for a list": (["reward_funcs: brightness"], [], None, "`reward_funcs`: must be a list of strings"),
    "word for a number": (["max_steps: two"], [], None, "config `max_steps`: invalid int value: 'two'"),
    "typo in recipe": (["max_stepz: 3"], [], None, "key max_stepz is not a config field (did you mean max_steps?)"),
    "typo in option": ([], ["--learning_rat", "1"], None, "option --learning_rat is not a config field"),
    "bad YAML": (["beta: [0.1"], [], None, "not valid YAML"),
    "reward import raises": ([], ["--reward_funcs", "exploding_reward:score"], None,
                             "cannot import module 'exploding_reward' (RuntimeError: no GPU here)"),
    "output_dir is a file": ([], [], "FILE", "is a file"),
    "read-only output_dir": ([], [], "READ_ONLY", "is not writable"),
    "output_dir holds a run": ([], [], "OLD_RUN", "already holds a run (checkpoint-1, metrics.jsonl)"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(case, tiny_sd3_dir, tmp_path, capsys,
                                                                      monkeypatch, request):
    recipe_lines, extra, output_dir, message = BAD_INPUT[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Path(TINY_RECIPE).read_text() + "\n".join(recipe_lines) + "\n")
    (tmp_path / "exploding_reward.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    if output_dir == "FILE":
        out.write_text("")
    elif output_dir == "READ_ONLY":
        out = request.getfixturevalue("read_only_dir") / "run"
    elif output_dir == "OLD_RUN":
        (out / "checkpoint-1").mkdir(parents=True)
        (out / "metrics.jsonl").write_text("{}\n")
    before = sorted(out.rglob("*")) if out.is_dir() else None

    args = ["train", str(recipe), "--model_name_or_path", tiny_sd3_dir, "--output_dir", str(out),
            "--max_sequence_length", "16", *extra]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("tempflow: error: ") and "\n" not in err, err
    assert message in err
    if output_dir in (None, "READ_ONLY"):
        assert not out.exists()
    elif output_dir == "OLD_RUN":
        assert sorted(out.rglob("*")) == before


def test_a_config_error_is_reported_before_torch_is_imported(tmp_path):
    """What makes a bad recipe fail in about a second: nothing heavy is imported before the config is checked."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_generations: 2.5\n")
    code = ("import sys; from tempflow.cli import main; code = main(['train', sys.argv[1]]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True)
    assert result.returncode == EXIT_BAD_INPUT and "`num_generations`" in result.stderr
    assert result.stdout.strip() == "torch not imported"


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
    assert all(family in text for family in ("sd3", "flux", "qwen_image", "wan"))  # the model families
    assert "--num_frames" in text and "--reward_frames" in text


def test_sample_writes_videos_and_a_grid_of_frame_strips(tiny_wan_dir, tmp_path):
    from PIL import Image

    assert main(["sample", "--model", tiny_wan_dir, "--prompt", "a red square", "--num-steps", "2", "--resolution",
                 "32", "--width", "48", "--num-frames", "5", "--max-sequence-length", "16",
                 "--output", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000.webp", "grid.png"]
    with Image.open(tmp_path / "0000.webp") as video:
        assert video.n_frames == 5 and video.size == (48, 32)
