"""Seventy-five bad command lines over every command (wrong types, out-of-range sizes, nan and inf,
negative counts, missing or empty files, unknown names, bad JSON): each ends with exit status 2 and exactly
one line on stderr that names the field, flag or file, and no traceback. A sample of them runs as real
`tempflow` processes, startup included, in under 2 s each: the cheap checks come before torch loads."""

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tempflow.cli import main

TINY_RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
TRAIN = ["train", TINY_RECIPE, "--output_dir", "{root}/runs/{case}", "--max_steps", "1",
         "--eval_prompts", "none"]
EVAL = ["eval", "--output", "{root}/eval-out", "--limit", "2", "--num-steps", "2"]
SAMPLE = ["sample", "--prompt", "a red square", "--output", "{root}/sample-out", "--num-steps", "2"]

BAD_COMMAND_LINES = [  # (case, argv ({root}: write_inputs' folder, {case}: the case), what the line names)
    ("train-resolution-63", [*TRAIN, "--resolution", "63"], "`resolution`"),
    ("train-resolution-100001", [*TRAIN, "--resolution", "100001"], "`resolution`"),
    ("train-width-60", [*TRAIN, "--width", "60"], "`width`"),
    ("train-num-frames-0", [*TRAIN, "--num_frames", "0"], "`num_frames`"),
    ("train-text-tokens-huge", [*TRAIN, "--max_sequence_length", "1000000"], "`max_sequence_length`"),
    ("train-edit-area-negative", [*TRAIN, "--edit_condition_area", "-5"], "`edit_condition_area`"),
    ("train-seed-negative", [*TRAIN, "--seed", "-1"], "`seed`"),
    ("train-seed-huge", [*TRAIN, "--seed", str(2**40)], "`seed`"),
    ("train-lr-nan", [*TRAIN, "--learning_rate", "nan"], "`learning_rate`"),
    ("train-lr-negative", [*TRAIN, "--learning_rate", "-0.0001"], "`learning_rate`"),
    ("train-guidance-negative", [*TRAIN, "--guidance_scale", "-1"], "`guidance_scale`"),
    ("train-beta-nan", [*TRAIN, "--beta", "nan"], "`beta`"),
    ("train-epsilon-nan", [*TRAIN, "--epsilon", "nan"], "`epsilon`"),
    ("train-adv-clip-inf", [*TRAIN, "--adv_clip_max", "inf"], "`adv_clip_max`"),
    ("train-adam-beta1", [*TRAIN, "--adam_beta1", "1.5"], "`adam_beta1`"),
    ("train-weight-decay-nan", [*TRAIN, "--weight_decay", "nan"], "`weight_decay`"),
    ("train-reward-weight-nan", [*TRAIN, "--reward_weights", "nan"], "`reward_weights`"),
    ("train-reward-timeout-inf", [*TRAIN, "--reward_timeout", "inf"], "`reward_timeout`"),
    ("train-steps-1", [*TRAIN, "--num_inference_steps", "1"], "`num_inference_steps`"),
    ("train-eval-steps-0", [*TRAIN, "--eval_num_inference_steps", "0"], "`eval_num_inference_steps`"),
    ("train-generations-1", [*TRAIN, "--num_generations", "1"], "`num_generations`"),
    ("train-prompts-per-iteration-0", [*TRAIN, "--prompts_per_iteration", "0"], "`prompts_per_iteration`"),
    ("train-max-steps-word", [*TRAIN, "--max_steps", "two"], "`max_steps`"),
    ("train-batch-size-0", [*TRAIN, "--per_device_train_batch_size", "0"], "`per_device_train_batch_size`"),
    ("train-unknown-reward", [*TRAIN, "--reward_funcs", "no_such_reward"], "'no_such_reward'"),
    ("train-unknown-gold-reward", [*TRAIN, "--gold_reward_funcs", "shapes_strictt"], "'shapes_strictt'"),
    ("train-missing-reward-module", [*TRAIN, "--reward_funcs", "no_such_module:score"], "'no_such_module'"),
    ("train-reward-kwargs-json", [*TRAIN, "--reward_kwargs", "{oops"], "`reward_kwargs`"),
    ("train-reward-kwargs-unused", [*TRAIN, "--reward_kwargs", '{"pickscore": {}}'], "`reward_kwargs`"),
    ("train-prompts-missing", [*TRAIN, "--train_prompts", "{root}/missing.txt"], "missing.txt"),
    ("train-prompts-empty", [*TRAIN, "--train_prompts", "{root}/empty.txt"], "empty.txt"),
    ("train-prompts-folder", [*TRAIN, "--train_prompts", "{root}/empty-folder"], "empty-folder"),
    ("train-prompts-not-utf8", [*TRAIN, "--train_prompts", "{root}/latin1.txt"], "latin1.txt"),
    ("train-eval-prompts-missing", [*TRAIN, "--eval_prompts", "{root}/missing.jsonl"], "missing.jsonl"),
    ("train-shapes-set-unknown", [*TRAIN, "--train_prompts", "shapes:nope"], "'nope'"),
    ("train-official-set-unknown", [*TRAIN, "--train_prompts", "geneval:nope"], "geneval:nope"),
    ("train-official-set-offline", [*TRAIN, "--train_prompts", "geneval:test"], "geneval:test"),
    ("train-model-missing", [*TRAIN, "--model_name_or_path", "{root}/no-model"], "no-model"),
    ("train-model-empty-folder", [*TRAIN, "--model_name_or_path", "{root}/empty-folder"], "model_index.json"),
    ("train-model-file", [*TRAIN, "--model_name_or_path", "{root}/a-file.txt"], "a-file.txt"),
    ("train-output-dir-holds-run", [*TRAIN, "--output_dir", "{root}/old-run"], "old-run"),
    ("train-output-dir-file", [*TRAIN, "--output_dir", "{root}/a-file.txt"], "a-file.txt"),
    ("train-recipe-missing", ["train", "{root}/missing.yaml"], "missing.yaml"),
    ("train-recipe-bad-yaml", ["train", "{root}/bad.yaml", "--output_dir", "{root}/runs/{case}"], "bad.yaml"),
    ("train-recipe-unknown-key", ["train", "{root}/typo.yaml", "--output_dir", "{root}/runs/{case}"],
     "learning_rat"),
    ("train-unknown-option", [*TRAIN, "--learning_rat", "1"], "learning_rat"),
    ("eval-steps-0", [*EVAL, "--num-steps", "0"], "--num-steps"),
    ("eval-steps-negative", [*EVAL, "--num-steps", "-1"], "--num-steps"),
    ("eval-resolution-63", [*EVAL, "--resolution", "63"], "--resolution"),
    ("eval-resolution-100001", [*EVAL, "--resolution", "100001"], "--resolution"),
    ("eval-seed-negative", [*EVAL, "--seed", "-1"], "--seed"),
    ("eval-guidance-negative", [*EVAL, "--guidance-scale", "-1"], "--guidance-scale"),
    ("eval-guidance-nan", [*EVAL, "--guidance-scale", "nan"], "--guidance-scale"),
    ("eval-unknown-reward", [*EVAL, "--rewards", "shapes", "no_such_reward"], "'no_such_reward'"),
    ("eval-prompts-missing", [*EVAL, "--prompts", "{root}/missing.txt"], "missing.txt"),
    ("eval-prompts-empty", [*EVAL, "--prompts", "{root}/empty.txt"], "empty.txt"),
    ("eval-model-missing", [*EVAL, "--model", "{root}/no-model"], "no-model"),
    ("eval-lora-missing", [*EVAL, "--lora", "{root}/no-lora"], "no-lora"),
    ("eval-samples-per-prompt-0", [*EVAL, "--samples-per-prompt", "0"], "--samples-per-prompt"),
    ("eval-limit-0", [*EVAL, "--limit", "0"], "--limit"),
    ("sample-resolution-63", [*SAMPLE, "--resolution", "63"], "--resolution"),
    ("sample-lora-truncated", [*SAMPLE, "--lora", "{root}/lora-truncated"], "lora_weights.safetensors"),
    ("sample-lora-without-weights", [*SAMPLE, "--lora", "{root}/empty-folder"], "empty-folder"),
    ("sample-steps-0", [*SAMPLE, "--num-steps", "0"], "--num-steps"),
    ("sample-video-format", [*SAMPLE, "--video-format", "avi"], "--video-format"),
    ("sample-width-huge", [*SAMPLE, "--width", "100000"], "--width"),
    ("plan-recipe-missing", ["plan", "{root}/missing.yaml"], "missing.yaml"),
    ("plan-gpus-0", ["plan", TINY_RECIPE, "--gpus", "0"], "--gpus"),
    ("check-recipe-missing", ["check-recipe", "{root}/missing.yaml"], "missing.yaml"),
    ("check-recipe-processes-0", ["check-recipe", TINY_RECIPE, "--num-processes", "0"], "--num-processes"),
    ("serve-reward-port", ["serve-reward", "brightness", "--port", "70000"], "--port"),
    ("serve-reward-kwargs-json", ["serve-reward", "brightness", "--reward-kwargs", "{x"], "--reward-kwargs"),
    ("report-missing", ["report", "{root}/no-run"], "no-run"),
    ("prompts-unknown-set", ["prompts", "download", "no_such_set"], "no_such_set"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
]


def write_inputs(root: Path) -> dict[str, str]:
    """The files the bad command lines name, under ``root``; returns the environment they run in (an empty
    cache, offline)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.txt").write_text("\n  \n")
    (root / "latin1.txt").write_bytes("a caf\xe9 on a street\n".encode("latin-1"))
    (root / "empty-folder").mkdir(exist_ok=True)
    (root / "a-file.txt").write_text("not a folder\n")
    (root / "old-run" / "checkpoint-1").mkdir(parents=True, exist_ok=True)
    (root / "old-run" / "metrics.jsonl").write_text("{}\n")
    (root / "bad.yaml").write_text("beta: [0.1\n")
    (root / "typo.yaml").write_text("learning_rat: 0.1\n")
    (root / "lora-truncated").mkdir(exist_ok=True)
    (root / "lora-truncated" / "pytorch_lora_weights.safetensors").write_bytes(safetensors_bytes(64)[:-40])
    return {"TEMPFLOW_CACHE": str(root / "cache"), "TEMPFLOW_OFFLINE": "1"}


def safetensors_bytes(num_floats: int) -> bytes:
    """A safetensors file of one float32 tensor, written by hand (its format: header size, JSON header,
    data)."""
    tensor = {"dtype": "F32", "shape": [num_floats], "data_offsets": [0, 4 * num_floats]}
    header = json.dumps({"lora.weight": tensor})
    return struct.pack("<Q", len(header)) + header.encode() + bytes(4 * num_floats)


def argv_of(case: str, root: Path) -> list[str]:
    template = dict((name, argv) for name, argv, _ in BAD_COMMAND_LINES)[case]
    return [arg.replace("{root}", str(root)).replace("{case}", case) for arg in template]


def run_in_process(argv: list[str]) -> tuple[int, list[str], str]:
    """``main(argv)``'s exit status, the non-blank lines it wrote to stderr, and all it wrote there."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse (and the commands that use it) exit instead of returning
            code = exit_.code
    return code, [line for line in err.getvalue().splitlines() if line.strip()], err.getvalue()


def test_the_table_holds_75_distinct_cases():
    assert len(BAD_COMMAND_LINES) == 75 and len({case for case, _, _ in BAD_COMMAND_LINES}) == 75


@pytest.mark.parametrize("case, named", [(case, named) for case, _, named in BAD_COMMAND_LINES],
                         ids=[case for case, _, _ in BAD_COMMAND_LINES])
def test_a_bad_command_line_is_one_line_naming_the_problem(case, named, tmp_path, monkeypatch):
    for variable, value in write_inputs(tmp_path).items():
        monkeypatch.setenv(variable, value)
    code, lines, text = run_in_process(argv_of(case, tmp_path))
    assert "Traceback" not in text, text
    assert code == 2 and len(lines) == 1, (code, lines[:4])
    assert named in lines[0], lines[0]
    assert not (tmp_path / "runs" / case).exists()


HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate")
IMPORTS_AFTER_EACH_CASE = """
import contextlib, io, json, sys
from tempflow.cli import main
for case, argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    print(case, *[name for name in json.loads(sys.argv[2]) if name in sys.modules])
"""


def test_no_bad_train_eval_or_sample_line_imports_torch(tmp_path):
    """Why they answer at once: every check runs before the heavy imports. One process runs them all in turn
    and lists what each left imported."""
    env = {**os.environ, **write_inputs(tmp_path)}
    cases = [(case, argv_of(case, tmp_path)) for case, argv, _ in BAD_COMMAND_LINES
             if argv[0] in ("train", "eval", "sample")]
    result = subprocess.run([sys.executable, "-c", IMPORTS_AFTER_EACH_CASE, json.dumps(cases),
                             json.dumps(HEAVY_MODULES)], env=env, capture_output=True, text=True)
    assert result.stdout.split() == [case for case, _ in cases], result.stdout + result.stderr[-2000:]


TIMED_CASES = ("train-resolution-63", "train-unknown-reward", "train-output-dir-holds-run",
               "train-prompts-empty", "train-model-empty-folder", "train-official-set-offline",
               "eval-steps-0", "eval-unknown-reward", "sample-lora-truncated", "sample-resolution-63")
WALL_TIME_LIMIT_S = 2.0


def test_bad_command_lines_answer_within_2_s_in_a_real_process(tmp_path):
    """Startup included: ``python -m tempflow.cli`` is what the ``tempflow`` script runs. A case gets a
    second try, so that a moment of load on a shared machine does not fail it; one importing torch fails
    both."""
    env = {**os.environ, **write_inputs(tmp_path)}
    for case in TIMED_CASES:
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "tempflow.cli", *argv_of(case, tmp_path)], env=env,
                                    capture_output=True, text=True)
            seconds.append(time.perf_counter() - start)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, (case, result.stderr)
            if seconds[-1] < WALL_TIME_LIMIT_S:
                break
        assert min(seconds) < WALL_TIME_LIMIT_S, (case, seconds)


# --- the checks behind the lines ------------------------------------------------------------------------
def _sampled_size(directory: str, resolution: int, **video) -> tuple[int, int] | None:
    """Height and width of one 2-step ODE sample at ``resolution``, or None where the model cannot make it."""
    from tempflow.evaluation import sample_prompt_set
    from tempflow.policies import load_policy
    from tempflow.rollout import RolloutEngine

    try:
        policy = load_policy(directory, resolution=resolution, guidance_scale=1.0, max_sequence_length=16,
                             **video)
        engine = RolloutEngine(policy, 0.0, batch_size=1)
        sample = sample_prompt_set(policy, engine, [{"prompt": "a red square"}], [0], seed=0, num_steps=2)
    except (ValueError, RuntimeError):
        return None
    return tuple(sample.shape[-2:])


@pytest.mark.parametrize("fixture, video", [("tiny_sd3_dir", {}), ("tiny_flux_dir", {}),
                                            ("tiny_qwen_image_dir", {}), ("tiny_wan_dir", {"num_frames": 1})])
def test_the_pixel_multiple_is_what_the_model_can_sample(fixture, video, request):
    """Two multiples sample at their size; half a multiple more fails or samples another size (SD3: a tensor
    shape error in the transformer; FLUX and Qwen-Image: rounded down; Wan: refused)."""
    from tempflow.limits import pixel_multiple

    directory = request.getfixturevalue(fixture)
    multiple, why = pixel_multiple(directory)
    assert why.startswith(fixture.removeprefix("tiny_").removesuffix("_dir"))
    assert _sampled_size(directory, 2 * multiple, **video) == (2 * multiple, 2 * multiple)
    between = 2 * multiple + multiple // 2
    assert _sampled_size(directory, between, **video) != (between, between)


def test_hub_models_and_missing_paths():
    from tempflow.limits import pixel_multiple

    assert pixel_multiple("black-forest-labs/FLUX.1-dev")[0] == 16  # from the published configs
    assert pixel_multiple("someone/an-sd3-finetune")[0] == 16  # any hub id: every family's published factor
    assert pixel_multiple("/no/such/model") is None  # the model check names the path instead


def test_reward_names_are_read_without_importing_the_rewards():
    from tempflow import rewards
    from tempflow.preflight import registered_reward_names

    code = ("import sys; from tempflow.preflight import registered_reward_names as names; names(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False"
    assert registered_reward_names() == tuple(rewards.available())


def test_safetensors_layout_problems(tmp_path):
    import numpy
    from safetensors.numpy import save_file

    from tempflow.preflight import safetensors_problem

    whole = tmp_path / "whole.safetensors"
    save_file({"a": numpy.ones((3, 5), dtype="float32")}, str(whole))
    assert safetensors_problem(whole) is None
    damaged = [("short", whole.read_bytes()[:-7], "cut short: the header describes 60 bytes"),
               ("long", whole.read_bytes() + b"\0", "1 bytes follow"),
               ("stub", b"\x10\0", "too few for a safetensors header"),
               ("huge header", struct.pack("<Q", 10**6) + b"{}", "the header alone needs 1000000"),
               ("not json", struct.pack("<Q", 2) + b"[]", "not a table of tensors")]
    for name, data, problem in damaged:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        assert problem in safetensors_problem(path), name


def test_a_reward_returning_strings_is_named_with_the_value():
    import torch

    from tempflow.errors import RewardError
    from tempflow.rewards.combined import CombinedReward

    images, prompts = torch.zeros(2, 3, 8, 8), ["a", "b"]
    wordy = CombinedReward({"wordy": lambda images, prompts: ["0.5", "0.7"]})
    with pytest.raises(RewardError, match=r"reward 'wordy' returned '0.5' \(str\), not a number"):
        wordy(images, prompts)
    total, _ = CombinedReward({"numeric": lambda images, prompts: [torch.tensor(0.5), 1]})(images, prompts)
    assert total.tolist() == [0.5, 1.0]
