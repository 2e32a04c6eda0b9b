"""One run per output_dir, and checkpoints that are verified before they are resumed (damaged ones set aside)."""

import argparse
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import PROMPTS
from test_trainer import _config as _trainer_config

from tempflow.run_directory import (
    MANIFEST,
    append_jsonl_record,
    check_output_dir,
    checkpoint_problem,
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


def _notices(capsys):
    """tempflow's own lines on stderr (diffusers' loading bars print there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("tempflow:")]


def _checkpoint_dir(parent, name="checkpoint-1"):
    """A checkpoint with the kinds of files a real one holds: JSON state, safetensors (nested too), a torch file."""
    checkpoint = parent / name
    (checkpoint / "tensor_state" / "ema").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    save_file({"weight": torch.arange(512, dtype=torch.float32)}, str(checkpoint / "model.safetensors"))
    save_file({"0": torch.ones(64)}, str(checkpoint / "tensor_state" / "ema" / "part-0.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
               checkpoint / "optimizer.bin")
    write_manifest(checkpoint)
    return checkpoint


def test_manifest_names_the_damaged_file(tmp_path):
    checkpoint = _checkpoint_dir(tmp_path)
    assert verify_checkpoint(checkpoint) is None and checkpoint_problem(checkpoint) is None
    assert set(json.loads((checkpoint / MANIFEST).read_text())["files"]) == {
        "trainer_state.json", "model.safetensors", "optimizer.bin", "tensor_state/ema/part-0.safetensors"}

    pristine = (checkpoint / "model.safetensors").read_bytes()
    _flip_bytes(checkpoint / "model.safetensors")
    assert "model.safetensors does not match its checksum" in verify_checkpoint(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(pristine)
    ema_part = checkpoint / "tensor_state" / "ema" / "part-0.safetensors"
    size = ema_part.stat().st_size
    _truncate(ema_part)
    assert verify_checkpoint(checkpoint).startswith(f"tensor_state/ema/part-0.safetensors has {size // 2} bytes, "
                                                    f"{size} when written")
    ema_part.unlink()
    assert verify_checkpoint(checkpoint) == "tensor_state/ema/part-0.safetensors is missing"
    (checkpoint / MANIFEST).write_text("{not json")
    assert verify_checkpoint(checkpoint).startswith(f"{MANIFEST} is unreadable")
    (checkpoint / MANIFEST).write_text(json.dumps({"files": {"../outside": {"size": 1, "sha256": "0"}}}))
    assert verify_checkpoint(checkpoint).startswith(f"{MANIFEST} is unreadable")


def _without_manifest(checkpoint):
    (checkpoint / MANIFEST).unlink()


def _not_weights_only(checkpoint):
    torch.save(argparse.Namespace(lr=0.1), checkpoint / "optimizer.bin")  # a pickle weights_only refuses
    write_manifest(checkpoint)  # it verifies: what it holds is the fault


DAMAGES = {  # what is done to a checkpoint, and what its one line must say
    "flipped-bytes": (lambda c: _flip_bytes(c / "model.safetensors"), "model.safetensors does not match"),
    "flipped-bytes-without-manifest": (lambda c: (_flip_bytes(c / "model.safetensors"), _without_manifest(c)),
                                       f"{MANIFEST} is missing, so its files cannot be verified"),
    "truncated-optimizer-without-manifest": (lambda c: (_truncate(c / "optimizer.bin"), _without_manifest(c)),
                                             "optimizer.bin is not a complete torch file"),
    "truncated-safetensors-in-manifest": (lambda c: (_truncate(c / "model.safetensors"), write_manifest(c)),
                                          "model.safetensors cannot be read (Error while deserializing header"),
    "optimizer-not-weights-only": (_not_weights_only, "optimizer.bin cannot be loaded (UnpicklingError: Weights only"),
    "file-outside-manifest": (lambda c: (c / "tensor_state" / "extra.bin").write_bytes(b"x"),
                              f"tensor_state/extra.bin is not listed in {MANIFEST}"),
    "no-trainer-state": (lambda c: (c / "trainer_state.json").unlink(),
                         "trainer_state.json is missing (the checkpoint is incomplete)"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_every_damaged_checkpoint_is_set_aside_with_one_line(tmp_path, capsys, damage):
    damage_checkpoint, expected = DAMAGES[damage]
    older, newer = _checkpoint_dir(tmp_path, "checkpoint-1"), _checkpoint_dir(tmp_path, "checkpoint-2")
    damage_checkpoint(newer)
    assert expected in checkpoint_problem(newer)

    assert checkpoint_to_resume(tmp_path, "latest") == older
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "damaged-checkpoint-2"]
    notice = f"tempflow: warning: checkpoint {newer} is damaged: {expected}"
    [line] = _notices(capsys)
    assert line.startswith(notice) and line.endswith("moved it to damaged-checkpoint-2, resuming from checkpoint-1")


def test_damaged_explicit_or_all_damaged_checkpoints_refuse_to_resume(tmp_path):
    checkpoint = _checkpoint_dir(tmp_path)
    _flip_bytes(checkpoint / "model.safetensors")
    with pytest.raises(ValueError, match="checkpoint-1 is damaged: model.safetensors does not match"):
        checkpoint_to_resume(tmp_path, str(checkpoint))
    with pytest.raises(ValueError, match="no checkpoint .* can be resumed.*checkpoint-1: model.safetensors"):
        checkpoint_to_resume(tmp_path, "latest")
    _without_manifest(checkpoint)
    with pytest.raises(ValueError, match=f"checkpoint-1 is damaged: {MANIFEST} is missing.*nothing was resumed"):
        checkpoint_to_resume(tmp_path, str(checkpoint))
    with pytest.raises(FileNotFoundError, match="checkpoint-9' is not a directory"):
        checkpoint_to_resume(tmp_path, str(tmp_path / "checkpoint-9"))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # nothing set aside with nothing to fall back to
    assert checkpoint_to_resume(tmp_path / "empty", "latest") is None


@pytest.fixture(scope="module")
def trained_runs(tiny_sd3_dir, tmp_path_factory):
    """A 3-iteration run with checkpoints 2 and 3, and the same run's final LoRA."""
    root = tmp_path_factory.mktemp("trained")
    _train(_config(tiny_sd3_dir, root / "straight", eval_prompts="unused"), eval_prompts=PROMPTS[:2])
    _train(_config(tiny_sd3_dir, root / "run", eval_prompts="unused"), eval_prompts=PROMPTS[:2])
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    return root


RUN_DAMAGES = {  # what is done to the newest checkpoint of a real run, and what its one line must say
    "flipped-bytes": (lambda c: _flip_bytes(c / LORA_FILE), f"{LORA_FILE} does not match its checksum"),
    "flipped-bytes-without-manifest": (lambda c: (_flip_bytes(c / LORA_FILE), _without_manifest(c)),
                                       f"{MANIFEST} is missing"),
    "truncated-optimizer-without-manifest": (lambda c: (_truncate(c / "optimizer.bin"), _without_manifest(c)),
                                             "optimizer.bin is not a complete torch file"),
}
"""The other damages (DAMAGES) take the same path through the trainer; each resume here costs ~10 s."""


@pytest.mark.parametrize("damage", RUN_DAMAGES, ids=list(RUN_DAMAGES))
def test_resume_falls_back_past_a_damaged_checkpoint(tiny_sd3_dir, trained_runs, tmp_path, capsys, damage):
    damage_checkpoint, expected = RUN_DAMAGES[damage]
    run = tmp_path / "run"
    shutil.copytree(trained_runs / "run", run)
    damage_checkpoint(run / "checkpoint-3")
    (run / "samples" / "before_after.png").unlink()
    capsys.readouterr()

    summary = _train(_config(tiny_sd3_dir, run, eval_prompts="unused", resume_from_checkpoint="latest"),
                     eval_prompts=PROMPTS[:2])
    [line] = _notices(capsys)
    assert line.startswith(f"tempflow: warning: checkpoint {run / 'checkpoint-3'} is damaged: {expected}")
    assert line.endswith("moved it to damaged-checkpoint-3, resuming from checkpoint-2")
    assert summary["iterations"] == 3 and len(summary["history"]) == 3
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "damaged-checkpoint-3"]
    assert checkpoint_problem(run / "checkpoint-3") is None
    assert (run / "samples" / "before_after.png").is_file()  # drawn by the resumed run, from the first evaluation
    expected_lora, resumed = load_file(trained_runs / "straight" / LORA_FILE), load_file(run / LORA_FILE)
    for key in expected_lora:
        torch.testing.assert_close(resumed[key], expected_lora[key], atol=1e-6, rtol=0)


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


def test_resume_latest_with_no_checkpoint_says_it_starts_fresh(tiny_sd3_dir, tmp_path, capsys):
    summary = _train(_config(tiny_sd3_dir, tmp_path, max_steps=1, resume_from_checkpoint="latest"))
    assert _notices(capsys) == [f"tempflow: warning: resume_from_checkpoint: latest found no checkpoint in {tmp_path}; "
                                "starting a fresh run"]
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


def test_a_metrics_line_cut_by_a_crash_is_dropped_before_the_resumed_run_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"iteration": 1, "reward": 0.5}\n{"iteration": 2, "rew')  # killed mid-write
    append_jsonl_record(path, {"iteration": 2, "reward": 0.6})
    append_jsonl_record(path, {"iteration": 3, "reward": 0.7})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3] and records[1]["reward"] == 0.6
    fresh = tmp_path / "fresh.jsonl"
    append_jsonl_record(fresh, {"iteration": 1})
    assert fresh.read_text() == '{"iteration": 1}\n'
