"""Faults never lose work: killed runs resume exactly, signals checkpoint first, non-finite steps are skipped, and
a damaged checkpoint is never trained on."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tempflow.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from tempflow.config import TempFlowGRPOConfig
from tempflow.trainer import NonFiniteTrainingError, TempFlowGRPOTrainer

TINY_RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")


def _args(model_dir, output_dir, max_steps, *extra):
    return ["train", TINY_RECIPE, "--model_name_or_path", model_dir, "--output_dir", str(output_dir),
            "--max_sequence_length", "16", "--eval_prompts", "none", "--max_steps", str(max_steps), *extra]


def _start(model_dir, output_dir, max_steps):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "tempflow.cli", *_args(model_dir, output_dir, max_steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _lora(directory):
    return load_file(str(Path(directory) / "pytorch_lora_weights.safetensors"))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_sd3_dir, tmp_path):
    steps = 5
    assert main(_args(tiny_sd3_dir, tmp_path / "straight", steps)) == 0

    out = tmp_path / "killed"
    process = _start(tiny_sd3_dir, out, steps)
    _wait_for(out / "checkpoint-2", process)
    process.send_signal(signal.SIGKILL)  # wherever it is: mid-rollout, mid-update or mid-checkpoint
    process.wait()
    assert main(_args(tiny_sd3_dir, out, steps, "--resume_from_checkpoint", "latest")) == 0
    assert json.loads((out / "metrics.json").read_text())["iterations"] == steps
    straight, resumed = _lora(tmp_path / "straight"), _lora(out)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=0)


def test_sigterm_checkpoints_before_exit(tiny_sd3_dir, tmp_path):
    out = tmp_path / "run"
    process = _start(tiny_sd3_dir, out, 1000)
    _wait_for(out / "checkpoint-1", process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED + signal.SIGTERM, stderr[-2000:]
    # notices that used to be printed on every run: diffusers' torch_dtype deprecation, DeepSpeed's CPU fallback
    assert "FutureWarning" not in stderr and "Setting accelerator to CPU" not in stdout + stderr
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["interrupted_by"] == "SIGTERM"
    assert (out / f"checkpoint-{summary['iterations']}" / "trainer_state.json").is_file()


def test_a_damaged_checkpoint_named_explicitly_stops_the_run_untouched(tiny_sd3_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_sd3_dir, out, 1)) == 0
    checkpoint = out / "checkpoint-1"
    lora = bytearray((checkpoint / "pytorch_lora_weights.safetensors").read_bytes())
    lora[-64:-32] = bytes(b ^ 0xFF for b in lora[-64:-32])  # flipped weights: the file still loads
    (checkpoint / "pytorch_lora_weights.safetensors").write_bytes(bytes(lora))
    (checkpoint / "manifest.json").unlink()  # so nothing can tell they changed
    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    capsys.readouterr()

    assert main(_args(tiny_sd3_dir, out, 2, "--resume_from_checkpoint", str(checkpoint))) == EXIT_BAD_INPUT
    stderr = capsys.readouterr().err
    assert [line for line in stderr.splitlines() if line.startswith("tempflow:")] == [
        f"tempflow: error: checkpoint {checkpoint} is damaged: manifest.json is missing, so its files cannot be "
        "verified (written by a tempflow older than manifests?); nothing was resumed"]
    assert "Traceback" not in stderr
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before  # nothing trained


def _config(model_dir, output_dir, **overrides):
    values = dict(output_dir=str(output_dir), model_name_or_path=model_dir, resolution=64, guidance_scale=1.0,
                  num_inference_steps=3, num_generations=2, prompts_per_iteration=1, lora_r=2, lora_alpha=2,
                  per_device_train_batch_size=2, gradient_accumulation_steps=1, reward_funcs=["brightness"],
                  train_prompts="unused", eval_prompts=None, max_sequence_length=16, disable_progress_bar=True)
    values.update(overrides)
    return TempFlowGRPOConfig(**values)


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_sd3_dir, tmp_path, monkeypatch):
    trainer = TempFlowGRPOTrainer(_config(tiny_sd3_dir, tmp_path, max_consecutive_skipped_steps=3),
                                  train_prompts=[{"prompt": "a red square"}])
    original = trainer.compute_loss
    poisoned = {"left": 1}

    def sometimes_nan(rows, embeds):
        loss, stats = original(rows, embeds)
        if poisoned["left"] > 0:
            poisoned["left"] -= 1
            loss = loss * math.nan
        return loss, stats

    monkeypatch.setattr(trainer, "compute_loss", sometimes_nan)
    before = [p.detach().clone() for p in trainer.trainable]
    with pytest.warns(UserWarning, match="non-finite"):
        metrics = trainer.training_step()  # 4 rows in 2 optimizer steps: the poisoned one skipped
    assert metrics["train/skipped_steps"] == 1 and metrics["train/optimizer_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.trainable)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable))

    poisoned["left"] = 10**6
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row") as stop, pytest.warns(UserWarning):
        for _ in range(5):
            trainer.training_step()
    assert "resume from the start (no checkpoint yet)" in str(stop.value)
    trainer.save_checkpoint()
    poisoned["left"] = 10**6
    with pytest.raises(NonFiniteTrainingError, match="the last good checkpoint, .*checkpoint-0"):
        trainer.training_step()
