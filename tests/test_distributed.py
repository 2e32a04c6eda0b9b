"""Two CPU processes under `accelerate launch`: DDP (torchrun + gloo), DeepSpeed ZeRO-2 and FSDP2. Ranks stay in
sync, rewards are gathered, a DDP checkpoint resumes on one process, and ZeRO-2 and FSDP2 train to the same weights
as DDP and resume from their own checkpoints; under FSDP2 every weight set (policy, KL reference, EMA, old policy) is
sharded.

accelerate's `--cpu --num_processes 2` starts a single process unless an MPI host file is given; several CPU
processes come from the torchrun launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=1. DeepSpeed must run *without*
ACCELERATE_USE_CPU (with it, accelerate silently falls back to DDP); on a machine without GPUs DeepSpeed picks its CPU
accelerator and gloo, and JIT-builds its shared-memory op once (minutes; cached in ~/.cache/torch_extensions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tempflow.cli import main

TINY_RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
ZERO2_CONFIG = str(Path(__file__).parents[1] / "recipes" / "accelerate" / "deepspeed_zero2.yaml")
FSDP2_LAUNCH = ["--config_file", str(Path(__file__).parents[1] / "recipes" / "accelerate" / "fsdp2_1x8.yaml"),
                "--num_processes", "2"]
# 2 prompts x 3 branch steps x 3 children = 18 rows a process: micro-batches of 4, 4 | 4, 4 | 2, so the last
# optimizer step of each iteration accumulates fewer micro-batches than the others
UNEVEN_ACCUMULATION = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
REWARDS_PER_ITERATION = 2 * 2 * 3 * 3  # processes x prompts x branch steps x children


def _launch(launcher_args: list[str], train_args: list[str], env: dict) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args,
               "-m", "tempflow.cli", "train", TINY_RECIPE, *train_args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def _fsdp_env() -> dict:
    """FSDP2 on CPUs: no ACCELERATE_USE_CPU (with it accelerate runs DDP) and no GPU in sight (the trainer then
    shards over gloo: trainer_setup.enable_fsdp_on_cpu)."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _train_args(model_dir, out, *extra) -> list[str]:
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--max_sequence_length", "16",
            *UNEVEN_ACCUMULATION, *extra]


@pytest.fixture(scope="module")
def ddp_run(tiny_sd3_dir, tmp_path_factory):
    """Two DDP processes, two iterations; its history and LoRA are read before any test resumes it."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    _launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"], _train_args(tiny_sd3_dir, out, "--num_eval_prompts", "3", "--max_steps", "2"),
            env)
    return {"out": out, "summary": json.loads((out / "metrics.json").read_text()),
            "lora": load_file(str(out / "pytorch_lora_weights.safetensors"))}


def test_two_process_training_and_single_process_resume(tiny_sd3_dir, ddp_run):
    out, summary = ddp_run["out"], ddp_run["summary"]
    for step in summary["history"]:
        assert step["reward/count"] == REWARDS_PER_ITERATION
        assert step["train/rank_weight_divergence"] == 0.0
        assert step["train/optimizer_steps"] == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # Three eval prompts spread over the file: three tasks of one prompt each, split 2 + 1 over the ranks, so
    # rank 1 has no sample of two of them; the per-task means still come from both ranks' reductions.
    final = summary["final"]
    per_task = {k: v for k, v in final.items() if k.startswith("eval_task/brightness/")}
    assert sorted(per_task) == [f"eval_task/brightness/{t}" for t in ("color_attr", "counting", "single_object")]
    assert sum(per_task.values()) / 3 == pytest.approx(final["eval/brightness"], rel=1e-6)

    common = _train_args(tiny_sd3_dir, out, "--num_eval_prompts", "3")
    assert main(["train", TINY_RECIPE, *common, "--max_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["iterations"] == 3 and len(resumed["history"]) == 3


def test_deepspeed_zero2_trains_like_ddp_and_resumes(tiny_sd3_dir, ddp_run, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    launcher = ["--config_file", ZERO2_CONFIG, "--num_processes", "2"]
    _launch(launcher, _train_args(tiny_sd3_dir, out, "--eval_prompts", "none", "--max_steps", "1"), env)

    # a DeepSpeed checkpoint: ZeRO optimizer shards of both ranks, the adapter but not the frozen base weights,
    # and the LoRA in the diffusers format beside it
    shards = out / "checkpoint-1" / "pytorch_model"
    assert sorted(p.name for p in shards.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    model_state = torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert model_state["dp_world_size"] == 2
    assert model_state["ds_config"]["zero_optimization"]["stage"] == 2
    # the recipe's micro-batch and accumulation, written into the DeepSpeed config by the trainer
    assert model_state["ds_config"]["train_micro_batch_size_per_gpu"] == 4
    assert model_state["ds_config"]["gradient_accumulation_steps"] == 2
    saved_weights = set(model_state["module"]) - set(model_state["buffer_names"])
    assert saved_weights and all("lora" in name for name in saved_weights)
    assert (out / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()

    _launch(launcher, _train_args(tiny_sd3_dir, out, "--eval_prompts", "none", "--max_steps", "2",
                                  "--resume_from_checkpoint", "latest"), env)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 2 and len(summary["history"]) == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for step, reference in zip(summary["history"], ddp_run["summary"]["history"], strict=True):
        assert step["reward/count"] == REWARDS_PER_ITERATION
        assert step["train/rank_weight_divergence"] == 0.0
        assert step["train/optimizer_steps"] == 3 and step["train/skipped_steps"] == 0
        assert step["reward/mean"] == pytest.approx(reference["reward/mean"], abs=1e-6)
        assert step["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=1e-4)

    # ZeRO-2, stopped after one iteration and resumed, ends with the weights of two uninterrupted DDP iterations
    lora, reference = load_file(str(out / "pytorch_lora_weights.safetensors")), ddp_run["lora"]
    assert lora.keys() == reference.keys()
    assert any(value.abs().max() > 0 for name, value in lora.items() if "lora_B" in name)  # B starts at zero
    for name in lora:
        torch.testing.assert_close(lora[name], reference[name], atol=1e-5, rtol=0)


def _nft_args(model_dir, out, *extra) -> list[str]:
    return ["--model_name_or_path", model_dir, "--output_dir", str(out), "--max_sequence_length", "16",
            "--algorithm", "diffusion_nft", "--scale_rewards", "batch", "--gradient_accumulation_steps", "3",
            "--eval_prompts", "none", *extra]


@pytest.fixture(scope="module")
def nft_ddp_run(tiny_sd3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nft") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    _launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"], _nft_args(tiny_sd3_dir, out, "--max_steps", "2"), env)
    return {"history": json.loads((out / "metrics.json").read_text())["history"],
            "lora": load_file(str(out / "pytorch_lora_weights.safetensors"))}


def test_diffusion_nft_trains_on_two_processes_in_sync(nft_ddp_run):
    """DiffusionNFT under DDP: rewards gathered, weights equal across ranks, the old policy updated after every
    iteration (its decay from the optimizer steps taken: 1 and 2 of the official decay_type 1)."""
    history = nft_ddp_run["history"]
    assert [step["nft/old_policy_decay"] for step in history] == pytest.approx([0.001, 0.002])
    for step in history:
        assert step["reward/count"] == 2 * 2 * 3  # processes x prompts x generations
        assert step["train/optimizer_steps"] == 1  # 18 rows a process: 3 micro-batches of 6, accumulated
        assert step["train/rank_weight_divergence"] == 0.0


def _assert_same_lora(lora: dict, reference: dict) -> None:
    assert lora.keys() == reference.keys()
    assert any(value.abs().max() > 0 for name, value in lora.items() if "lora_B" in name)  # B starts at zero
    for name in lora:
        torch.testing.assert_close(lora[name], reference[name], atol=1e-6, rtol=0)


def test_fsdp2_lora_trains_like_ddp_and_resumes_exactly(tiny_sd3_dir, ddp_run, tmp_path):
    """FSDP2 (2 CPU processes, gloo), stopped after one iteration and resumed from its sharded checkpoint, ends with
    the weights of two uninterrupted DDP iterations."""
    out = tmp_path / "fsdp"
    _launch(FSDP2_LAUNCH, _train_args(tiny_sd3_dir, out, "--eval_prompts", "none", "--max_steps", "1"), _fsdp_env())
    checkpoint = out / "checkpoint-1"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: one file per process
        assert sorted(p.name for p in (checkpoint / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    _launch(FSDP2_LAUNCH, _train_args(tiny_sd3_dir, out, "--eval_prompts", "none", "--max_steps", "2",
                                      "--resume_from_checkpoint", "latest"), _fsdp_env())
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["iterations"] == 2
    for step, reference in zip(summary["history"], ddp_run["summary"]["history"], strict=True):
        assert step["reward/count"] == REWARDS_PER_ITERATION and step["train/optimizer_steps"] == 3
        assert step["reward/mean"] == pytest.approx(reference["reward/mean"], abs=1e-6)
        assert step["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=1e-4)
    _assert_same_lora(load_file(str(out / "pytorch_lora_weights.safetensors")), ddp_run["lora"])


def test_fsdp2_diffusion_nft_resumes_its_sharded_old_policy(tiny_sd3_dir, nft_ddp_run, tmp_path):
    """DiffusionNFT's old policy lives on the shards (swapped in by value) and is checkpointed per process: FSDP2
    stopped after one iteration and resumed ends where two DDP iterations do."""
    out = tmp_path / "nft-fsdp"
    _launch(FSDP2_LAUNCH, _nft_args(tiny_sd3_dir, out, "--max_steps", "1"), _fsdp_env())
    shards = out / "checkpoint-1" / "tensor_state" / "old_policy"
    assert sorted(p.name for p in shards.iterdir()) == ["part-0.safetensors", "part-1.safetensors"]
    _launch(FSDP2_LAUNCH, _nft_args(tiny_sd3_dir, out, "--max_steps", "2", "--resume_from_checkpoint", "latest"),
            _fsdp_env())
    history = json.loads((out / "metrics.json").read_text())["history"]
    for step, reference in zip(history, nft_ddp_run["history"], strict=True):
        assert step["reward/mean"] == pytest.approx(reference["reward/mean"], abs=1e-6)
        assert step["nft/old_policy_decay"] == pytest.approx(reference["nft/old_policy_decay"])
    _assert_same_lora(load_file(str(out / "pytorch_lora_weights.safetensors")), nft_ddp_run["lora"])


def test_fsdp2_full_fine_tuning_with_kl_and_ema_exports_the_weights_of_ddp(tiny_sd3_dir, tmp_path):
    """Full fine-tuning under FSDP2, with the sharded frozen KL reference, the sharded EMA (updated every step) and
    gradient checkpointing inside the shard units, exports (gathered, in the diffusers format) the transformer DDP
    exports."""
    from diffusers import SD3Transformer2DModel

    extra = ["--use_lora", "false", "--beta", "0.01", "--use_ema", "true", "--ema_update_interval", "1",
             "--gradient_checkpointing", "true", "--learning_rate", "1e-4", "--eval_prompts", "none", "--max_steps", "1"]
    _launch(FSDP2_LAUNCH, _train_args(tiny_sd3_dir, tmp_path / "fsdp", *extra), _fsdp_env())
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoint-1" / "tensor_state" / "ema").iterdir()) == [
        "part-0.safetensors", "part-1.safetensors"]
    _launch(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"], _train_args(tiny_sd3_dir, tmp_path / "ddp", *extra),
            {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})
    kl = [json.loads((tmp_path / run / "metrics.json").read_text())["history"][0]["train/kl"] for run in ("fsdp", "ddp")]
    assert kl[0] > 0 and kl[0] == pytest.approx(kl[1], rel=1e-4)
    sharded, reference = (SD3Transformer2DModel.from_pretrained(tmp_path / run / "transformer").state_dict()
                          for run in ("fsdp", "ddp"))
    initial = SD3Transformer2DModel.from_pretrained(Path(tiny_sd3_dir) / "transformer").state_dict()
    assert sharded.keys() == reference.keys()
    assert max(float((sharded[k] - initial[k]).abs().max()) for k in sharded) > 1e-5  # it trained
    for name in sharded:
        torch.testing.assert_close(sharded[name], reference[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["full_fine_tuning", "diffusion_nft"])
def test_fsdp2_shards_every_weight_set(tiny_sd3_dir, tmp_path, case):
    """No process holds a whole copy of what trains or of what is kept beside it: the policy, the KL reference of
    full fine-tuning, the EMA and DiffusionNFT's old policy are all shards, about half the weights each."""
    extra = (["--use_lora", "false", "--beta", "0.01", "--use_ema", "true"] if case == "full_fine_tuning"
             else ["--algorithm", "diffusion_nft"])
    command = [sys.executable, "-m", "accelerate.commands.launch", *FSDP2_LAUNCH,
               str(Path(__file__).parent / "distributed_fsdp.py"), TINY_RECIPE, str(tmp_path),
               "--model_name_or_path", tiny_sd3_dir, "--max_sequence_length", "16", "--output_dir",
               str(tmp_path / "run"), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=_fsdp_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {"full_fine_tuning": {"trainable", "model", "ema", "reference"},
                "diffusion_nft": {"trainable", "model", "old_policy"}}[case]
    assert set(ranks[0]) == expected
    for name in expected:
        assert all(rank[name]["sharded"] for rank in ranks), name
        whole = ranks[0][name]["whole"]
        assert sum(rank[name]["local"] for rank in ranks) == whole  # the two slices make one copy
        assert all(rank[name]["local"] < 0.6 * whole for rank in ranks), name


@pytest.mark.parametrize("bad", ["block class", "evaluation prompts"])
def test_fsdp2_bad_settings_stop_with_one_line_naming_them(tiny_sd3_dir, tmp_path, bad):
    import yaml

    config = yaml.safe_load(Path(FSDP2_LAUNCH[1]).read_text())
    extra = ["--num_eval_prompts", "3"] if bad == "evaluation prompts" else []
    if bad == "block class":
        config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = "FluxTransformerBlock"
    launch_config = tmp_path / "fsdp.yaml"
    launch_config.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
               "--num_processes", "2", "-m", "tempflow.cli", "train", TINY_RECIPE, "--model_name_or_path", tiny_sd3_dir,
               "--output_dir", str(tmp_path / "run"), "--max_sequence_length", "16", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=_fsdp_env(), timeout=600)
    assert result.returncode != 0
    expected = {"block class": "tempflow: error: FSDP: model family sd3 has no block class FluxTransformerBlock; "
                               "its transformer's block classes are: JointTransformerBlock",
                "evaluation prompts": "tempflow: error: FSDP needs the same number of evaluation prompts on every "
                                      "process"}[bad]
    assert expected in result.stderr
    assert not (tmp_path / "run" / "checkpoint-1").exists()


TWO_MACHINES = str(Path(__file__).parents[1] / "recipes" / "accelerate" / "two_machines_one_host.sh")


def _free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_two_machines_on_one_host_train_as_one_job(tiny_sd3_dir, tmp_path):
    """`--num_machines 2 --machine_rank 0/1` with a static rendezvous at 127.0.0.1: one job of two processes whose
    weights stay equal, whose prompts do not overlap, and whose logs and exports come from the main process alone
    (each process writes only its own part of a checkpoint)."""
    out = tmp_path / "run"
    env = {**os.environ, "PORT": _free_port(), "TIMEOUT": "120"}
    result = subprocess.run(["bash", TWO_MACHINES, TINY_RECIPE, "--model_name_or_path", tiny_sd3_dir,
                             "--output_dir", str(out), "--max_sequence_length", "16", "--num_eval_prompts", "2",
                             "--max_steps", "2"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 2 iterations") == 1  # the main process reports; the other is silent
    history = json.loads((out / "metrics.json").read_text())["history"]
    for step in history:
        assert step["train/rank_weight_divergence"] == 0.0
        assert step["reward/count"] == REWARDS_PER_ITERATION
        assert step["rollout/distinct_prompts"] == 2 * 2  # processes x prompts: no prompt on both machines
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 + 2  # two iterations, two evaluations
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        files = sorted(p.name for p in (out / checkpoint).iterdir())
        assert [f for f in files if f.startswith("rng_state")] == ["rng_state_0.safetensors", "rng_state_1.safetensors"]
        assert not [f for f in files if f.endswith(".pkl")]  # nothing pickled
        assert files.count("manifest.json") == 1 and files.count("trainer_state.json") == 1
    assert not list(out.glob(".tmp-*"))  # no half-written checkpoint left


def test_a_machine_that_never_joins_stops_the_other_within_the_timeout(tiny_sd3_dir, tmp_path):
    env = {**os.environ, "PORT": _free_port(), "TIMEOUT": "5", "MACHINES": "0"}
    result = subprocess.run(["bash", TWO_MACHINES, TINY_RECIPE, "--model_name_or_path", tiny_sd3_dir,
                             "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode != 0
    assert "1/2 clients joined" in result.stderr  # torch's DistStoreError: "Timed out after ... seconds waiting"
    assert not (tmp_path / "run").exists()


def test_batch_reward_std_pools_the_rewards_of_every_process(tmp_path):
    """`scale_rewards: batch` (Flow-GRPO's global_std) divides by the std of all processes' rewards, not each its own."""
    from distributed_advantages import GROUPS, REWARDS

    from tempflow.advantages import group_advantages

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(Path(__file__).parent / "distributed_advantages.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pooled = torch.tensor([r for rank in REWARDS for r in rank], dtype=torch.float64).std(unbiased=False).item()
    for rank, rewards in enumerate(REWARDS):
        got = torch.tensor(json.loads((tmp_path / f"rank{rank}.json").read_text()))
        expected = group_advantages(torch.tensor(rewards), torch.tensor(GROUPS), "batch", batch_std=pooled)
        torch.testing.assert_close(got, expected)
        own = group_advantages(torch.tensor(rewards), torch.tensor(GROUPS), "batch")  # this rank's std alone
        assert not torch.allclose(got, own)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes" / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_accelerate_launch_configs_load_with_accelerates_own_reader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
    assert config.mixed_precision == "no"  # the recipe's mixed_precision decides; see the file's comment
