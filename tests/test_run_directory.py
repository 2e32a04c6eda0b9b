"""One run per output_dir, and checkpoints that are verified before they are resumed (damaged ones set aside)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import PROMPTS
from test_trainer import _config as _trainer_config

from tempflow.run_directory import (
    MANIFEST,
    check_output_dir,
    checkpoint_to_resume,
    remove_previous_run,
    verify_checkpoint,
    write_manifest,
)
from tempflow.trainer import TempFlowGRPOTrainer

LORA_FILE = "pytorch_lora_weights.safetensors"


def _config(model_dir, output_dir, **overrides):
    return _trainer_config(model_dir, output_dir, **{"max_steps": 3, **overrides})


def _train(config, **kwargs):
    return TempFlowGRPOTrainer(config, train_prompts=PROMPTS, **kwargs).train()


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    for offset in range(len(data) - 64, len(data) - 32):  # inside the tensor data: the file still loads
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _checkpoint_dir(tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    (checkpoint / "sub").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (checkpoint / "sub" / "optimizer.bin").write_bytes(b"x" * 100)
    write_manifest(checkpoint)
    return checkpoint


def test_manifest_names_the_damaged_file(tmp_path):
    checkpoint = _checkpoint_dir(tmp_path)
    assert verify_checkpoint(checkpoint) is None
    assert set(json.loads((checkpoint / MANIFEST).read_text())["files"]) == {
        "trainer_state.json", "weights.bin", "sub/optimizer.bin"}

    _flip_bytes(checkpoint / "weights.bin")
    assert "weights.bin does not match its checksum" in verify_checkpoint(checkpoint)
    _truncate(checkpoint / "sub" / "optimizer.bin")
    (checkpoint / "weights.bin").write_bytes(bytes(range(256)) * 8)
    assert verify_checkpoint(checkpoint).startswith("sub/optimizer.bin has 50 bytes, 100 when written")
    (checkpoint / "sub" / "optimizer.bin").unlink()
    assert verify_checkpoint(checkpoint) == "sub/optimizer.bin is missing"
    (checkpoint / MANIFEST).write_text("{not json")
    assert verify_checkpoint(checkpoint) == f"{MANIFEST} is unreadable"


def test_checkpoint_without_manifest_resumes_with_a_warning(tmp_path):
    checkpoint = _checkpoint_dir(tmp_path)
    (checkpoint / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="no manifest.json"):
        assert checkpoint_to_resume(tmp_path, "latest") == checkpoint


def test_damaged_explicit_or_all_damaged_checkpoints_refuse_to_resume(tmp_path):
    checkpoint = _checkpoint_dir(tmp_path)
    _flip_bytes(checkpoint / "weights.bin")
    with pytest.raises(ValueError, match="checkpoint-1 is damaged: weights.bin does not match"):
        checkpoint_to_resume(tmp_path, str(checkpoint))
    with pytest.raises(ValueError, match="no checkpoint .* can be resumed.*checkpoint-1: weights.bin"):
        checkpoint_to_resume(tmp_path, "latest")
    assert checkpoint.is_dir()  # nothing set aside when there is nothing to fall back to
    assert checkpoint_to_resume(tmp_path / "empty", "latest") is None


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate], ids=["flipped-bytes", "truncated"])
def test_resume_falls_back_past_a_damaged_checkpoint(tiny_sd3_dir, tmp_path, damage):
    straight = tmp_path / "straight"
    _train(_config(tiny_sd3_dir, straight, eval_prompts="unused"), eval_prompts=PROMPTS[:2])

    run = tmp_path / "run"
    _train(_config(tiny_sd3_dir, run, eval_prompts="unused"), eval_prompts=PROMPTS[:2])
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    damage(run / "checkpoint-3" / LORA_FILE)
    (run / "samples" / "before_after.png").unlink()

    with pytest.warns(UserWarning, match=f"checkpoint-3 is damaged \\({LORA_FILE}.*resuming from checkpoint-2"):
        summary = _train(_config(tiny_sd3_dir, run, eval_prompts="unused", resume_from_checkpoint="latest"),
                         eval_prompts=PROMPTS[:2])
    assert summary["iterations"] == 3 and len(summary["history"]) == 3
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "damaged-checkpoint-3"]
    assert verify_checkpoint(run / "checkpoint-3") is None
    assert (run / "samples" / "before_after.png").is_file()  # drawn by the resumed run, from the first evaluation
    expected, resumed = load_file(straight / LORA_FILE), load_file(run / LORA_FILE)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)


def test_a_fresh_run_refuses_a_directory_holding_another_run(tiny_sd3_dir, tmp_path):
    run = tmp_path / "run"
    _train(_config(tiny_sd3_dir, run, max_steps=2))
    (run / "notes.txt").write_text("mine")
    listing = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match="already holds a run .*checkpoint-1.*--overwrite_output_dir"):
        TempFlowGRPOTrainer(_config(tiny_sd3_dir, run), train_prompts=PROMPTS)
    assert sorted(p.name for p in run.iterdir()) == listing

    summary = _train(_config(tiny_sd3_dir, run, max_steps=1, overwrite_output_dir=True))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0] and summary["iterations"] == 1
    assert (run / "notes.txt").read_text() == "mine"  # files that are not a run's stay


def test_resume_latest_with_no_checkpoint_says_it_starts_fresh(tiny_sd3_dir, tmp_path):
    with pytest.warns(UserWarning, match="found no checkpoint .* starting a fresh run"):
        summary = _train(_config(tiny_sd3_dir, tmp_path, max_steps=1, resume_from_checkpoint="latest"))
    assert summary["iterations"] == 1


def test_output_dir_that_cannot_be_written_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output_dir .*file' is a file"):
        check_output_dir(tmp_path / "file", overwrite=False, resuming=False)
    with pytest.raises(ValueError, match="lies under .*file, which is a file"):
        check_output_dir(tmp_path / "file" / "run", overwrite=False, resuming=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_output_dir(tmp_path / "new" / "run", overwrite=False, resuming=False)
    assert not (tmp_path / "new").exists()


def test_remove_previous_run_keeps_other_files(tmp_path):
    for name in ("checkpoint-3/x", "damaged-checkpoint-2/x", ".tmp-checkpoint-4/x", "samples/a.png", "tempflow/e"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "mine.txt").write_text("")
    remove_previous_run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
