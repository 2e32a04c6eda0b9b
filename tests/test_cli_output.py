"""What the command line prints for people: `train --help` grouped by concern with every config field once,
`report --help` without reST markup, and a training run that says what it loads from its first second, with
the libraries' loading bars off when the run's progress bars are."""

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from tempflow.cli import main
from tempflow.config import FIELD_GROUPS, TempFlowGRPOConfig

RECIPES = Path(__file__).parents[1] / "recipes"


def test_every_config_field_is_in_exactly_one_group():
    grouped = [name for _, _, names in FIELD_GROUPS for name in names]
    assert sorted(grouped) == sorted(f.name for f in fields(TempFlowGRPOConfig))


def test_train_help_shows_each_field_once_under_its_group(capsys):
    assert main(["train", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    options = [line.split()[0].rstrip(",") for line in lines if re.match(r"  -", line)]
    assert options.count("-h") == 1 and len(options) == len(set(options))  # one -h, no option twice
    assert not [o for o in options if o.startswith("--no_") or "-" in o[2:]]  # no --no_x or --x-y spellings
    headers = [lines.index(f"{title}:") for title, _, _ in FIELD_GROUPS]
    assert headers == sorted(headers)
    for (title, _, names), start, end in zip(FIELD_GROUPS, headers, headers[1:] + [len(lines)]):
        section = [line.split()[0] for line in lines[start:end] if re.match(r"  --", line)]
        assert section == [f"--{name}" for name in names], title
    assert "  --lora_r N = 32" in lines and "  --use_lora [true|false] = true" in lines  # defaults inline


def test_report_help_shows_no_rest_markup(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "metrics.jsonl" in text and "``" not in text


def test_a_run_says_what_it_loads_before_the_heavy_imports(tmp_path):
    """The first line of `tempflow train` comes before torch is imported (the seconds a run used to stay
    silent): the child stops at its first line and reports what was imported by then."""
    code = ("import os, sys\n"
            "class FirstLine:\n"
            "    def write(self, text):\n"
            "        state = 'torch imported' if 'torch' in sys.modules else 'torch not imported'\n"
            "        sys.__stdout__.write(f'{text}|{state}\\n'); sys.__stdout__.flush(); os._exit(0)\n"
            "    def flush(self): pass\n"
            "from tempflow.cli import main\n"
            "sys.stdout = FirstLine()\n"
            "main(['train', sys.argv[1], '--output_dir', sys.argv[2]])\n")
    result = subprocess.run([sys.executable, "-c", code, str(RECIPES / "shapes.yaml"), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    line, state = result.stdout.strip().rsplit("|", 1)
    assert state == "torch not imported", result.stderr[-2000:]
    assert line.startswith("tempflow: training shapes with tempflow_grpo into") and "importing torch" in line


def test_a_quiet_run_prints_its_stages_and_no_loading_bars(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(RECIPES / "tiny.yaml"), "--output_dir", str(out), "--max_steps", "1",
                 "--eval_prompts", "none", "--disable_progress_bar", "true"]) == 0
    captured = capsys.readouterr()
    assert "Loading" not in captured.err and "it/s]" not in captured.err  # diffusers', transformers' bars
    stages = ["training shapes with tempflow_grpo", "prompts: ", "loading rewards brightness ...",
              "loading rewards brightness: done in", "loading the model shapes ...",
              "loading the model shapes: done in", "sd3 transformer of",
              "training tempflow_grpo for 1 iteration of", "iteration 1/1: reward"]
    said = [line.removeprefix("tempflow: ") for line in captured.out.splitlines()
            if line.startswith("tempflow: ")]
    assert len(said) == len(stages) and all(line.startswith(s) for line, s in zip(said, stages)), said


def test_loading_bars_are_switched_off_for_the_block_and_restored():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from tempflow.progress import loading_bars

    switches = (diffusers_logging.is_progress_bar_enabled, transformers_logging.is_progress_bar_enabled)
    before = [on() for on in switches]
    with loading_bars(False):
        assert [on() for on in switches] == [False, False]
    assert [on() for on in switches] == before
