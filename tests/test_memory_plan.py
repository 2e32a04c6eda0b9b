"""`tempflow plan`: the memory a recipe needs per GPU, computed on the meta device, against what a real training step
on the CPU holds (every tensor followed by the same tracker the planner runs on meta tensors), the layouts' arithmetic,
and the command."""

from pathlib import Path

import pytest

from tempflow.cli import main
from tempflow.config import parse_config
from tempflow.memory_plan import LAYOUTS, LiveTensorBytes, ModelMemory, Plan, per_gpu, plan
from tempflow.trainer import TempFlowGRPOTrainer

RECIPES = Path(__file__).parents[1] / "recipes"
MADE_IN_A_STEP = ("gradients", "optimizer (AdamW)", "rollout rows", "activations (training, rollout, decode peak)")
"""The plan's parts that a run's first iteration allocates; weights, the EMA, the KL reference and the old policy
exist before it."""

CASES = {  # name -> (recipe, model fixture or None for the recipe's, overrides)
    "shapes-lora": ("shapes.yaml", None, ["--prompts_per_iteration", "2", "--per_device_train_batch_size", "8",
                                           "--rollout_batch_size", "16"]),
    "shapes-full-checkpointing-kl-ema": ("shapes.yaml", None, [
        "--prompts_per_iteration", "2", "--per_device_train_batch_size", "8", "--rollout_batch_size", "16",
        "--use_lora", "false", "--gradient_checkpointing", "true", "--beta", "0.01", "--use_ema", "true",
        "--learning_rate", "1e-5"]),
    "sd3-nft": ("tiny.yaml", "tiny_sd3_dir", ["--max_sequence_length", "16", "--algorithm", "diffusion_nft"]),
    "flux": ("tiny.yaml", "tiny_flux_dir", ["--max_sequence_length", "16", "--guidance_scale", "3.5"]),
    "wan": ("tiny.yaml", "tiny_wan_dir", ["--max_sequence_length", "16", "--resolution", "32", "--num_frames", "9",
                                          "--guidance_scale", "5"]),
    "qwen-image": ("tiny.yaml", "tiny_qwen_image_dir", ["--max_sequence_length", "16", "--guidance_scale", "4"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_the_memory_a_cpu_training_step_takes(case, request, tmp_path):
    recipe, fixture, overrides = CASES[case]
    model = ["--model_name_or_path", request.getfixturevalue(fixture)] if fixture else []
    config = parse_config(str(RECIPES / recipe), [*model, *overrides, "--output_dir", str(tmp_path),
                                                  "--eval_prompts", "none"])
    parts = plan(config, gpus=1, gpu_memory_gb=80).rows["ddp"]
    predicted = sum(parts[name] for name in MADE_IN_A_STEP)
    trainer = TempFlowGRPOTrainer(config)
    with LiveTensorBytes() as measured:
        trainer.training_step()
    ratio = measured.peak / predicted
    assert 0.8 <= ratio <= 1.2, f"{case}: measured {measured.peak} bytes, planned {predicted} ({ratio:.3f})"


def _memory(**overrides) -> ModelMemory:
    values = dict(transformer=800, trainable=80, largest_block=40, components={"text": 100}, activations=300,
                  activations_other=900, rollout_call=200, decode_call=50, rollout_rows=10)
    return ModelMemory(**{**values, **overrides})


def test_layouts_shard_what_they_say():
    lora = parse_config(str(RECIPES / "tiny.yaml"), ["--use_ema", "true"])
    memory = _memory()
    ddp, zero2, fsdp2 = (per_gpu(memory, lora, layout, 4) for layout in ("ddp", "zero2", "fsdp2"))
    assert ddp["transformer weights"] == zero2["transformer weights"] == 800 and fsdp2["transformer weights"] == 200
    assert ddp["optimizer (AdamW)"] == 160 and zero2["optimizer (AdamW)"] == fsdp2["optimizer (AdamW)"] == 40
    assert ddp["EMA"] == zero2["EMA"] == 80 and fsdp2["EMA"] == 20  # tempflow's EMA lives on the FSDP shards
    assert ddp["DDP gradient buckets"] == 80 and fsdp2["gathered blocks (FSDP prefetch: 2)"] == 80
    assert all(p["activations (training, rollout, decode peak)"] == 300 for p in (ddp, zero2, fsdp2))
    assert "full fine-tuning" in per_gpu(memory, lora, "zero3", 4)  # ZeRO-3 refuses LoRA
    full = parse_config(str(RECIPES / "tiny.yaml"), ["--use_lora", "false", "--beta", "0.01"])
    zero3, fsdp2 = per_gpu(memory, full, "zero3", 4), per_gpu(memory, full, "fsdp2", 4)
    assert zero3["KL reference"] == 800 and fsdp2["KL reference"] == 200  # ZeRO-3 keeps the frozen copy whole


def test_the_smallest_layout_that_fits_has_the_fewest_gpus_then_the_simplest_layout():
    full = parse_config(str(RECIPES / "tiny.yaml"), ["--use_lora", "false", "--use_ema", "false"])
    memory = _memory(transformer=8 * 2**30, trainable=8 * 2**30, largest_block=2**28, components={},
                     activations=2**30, rollout_call=0, decode_call=0, rollout_rows=0)
    result = Plan(full, memory, 1, 12.0, {k: per_gpu(memory, full, k, 1) for k in LAYOUTS})
    # 32 GiB of weights, gradients and AdamW states: FSDP2 on 4 takes 8 + 1 (activations) + 0.5 (two gathered
    # blocks); ZeRO-2 keeps the 8 GiB of weights whole and needs 8 processes (8 + 3 + 1), DDP fits nowhere
    assert result.fitting() == [] and result.smallest_fit() == ("fsdp2", 4)
    assert "the smallest layout that does is FSDP2 on 4 GPUs" in "\n".join(result.lines())


def test_plan_command_on_a_hub_recipe_and_bad_input(capsys):
    assert main(["plan", str(RECIPES / "wan21_1_3b_pickscore.yaml"), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("DDP", "DeepSpeed ZeRO-2", "FSDP2", "DeepSpeed ZeRO-3", "text encoders + VAE"))
    assert "fits: DDP (recipes/accelerate/multi_gpu.yaml)" in out
    assert main(["plan", str(RECIPES / "wan21_1_3b_pickscore.yaml"), "--gpu-memory", "8"]) == 1
    assert "no layout fits at any process count" in capsys.readouterr().out
    assert main(["plan", "missing.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "tempflow plan: error: recipe 'missing.yaml' does not exist"
