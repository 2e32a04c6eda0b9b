"""`lora_dtype: bfloat16`, the official TempFlow-GRPO FLUX script's bf16 adapter: it trains in bf16 (weights,
gradients, AdamW state, EMA, old policy), starts on-policy, resumes bit-identically and exports a LoRA that diffusers
loads; the combinations that cannot train a bf16 adapter stop with one line naming the field."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from tempflow.config import TempFlowGRPOConfig
from tempflow.policies import load_policy
from tempflow.trainer import TempFlowGRPOTrainer
from tempflow.trainer_setup import SetupMixin

PROMPTS = [{"prompt": p} for p in ("a red square", "two blue circles", "a green triangle")]
BLOCK_SPARSE_GATES = dict(block_sparse_density=0.5, block_sparse_tile=[2, 2], block_sparse_layers=[0, 1],
                          block_sparse_gate=True, block_sparse_kernel="torch", attention_backend="sdpa")


def _config(model_dir, output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir), model_name_or_path=model_dir, resolution=64, guidance_scale=1.0,
        num_inference_steps=3, eval_num_inference_steps=3, num_generations=2, prompts_per_iteration=2,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, lora_r=4, lora_alpha=8, learning_rate=1e-2, epsilon=0.2, max_steps=1,
        save_steps=1, reward_funcs=["brightness"], train_prompts="unused", eval_prompts=None,
        disable_progress_bar=True, max_sequence_length=16, mixed_precision="bf16", lora_dtype="bfloat16",
    )
    values.update(overrides)
    return TempFlowGRPOConfig(**values)


def _trainer(config):
    return TempFlowGRPOTrainer(config, train_prompts=PROMPTS)


@pytest.mark.parametrize("mixed_precision, extra, ratio_tolerance", [
    ("bf16", BLOCK_SPARSE_GATES, 1e-3),  # the suite's bf16 tolerance: kernels may round by batch shape
    ("no", {}, 1e-5),  # float32 base weights, bf16 adapter
])
def test_a_bf16_adapter_trains_in_bf16_from_an_on_policy_first_step(tiny_sd3_dir, tmp_path, mixed_precision, extra,
                                                                     ratio_tolerance):
    trainer = _trainer(_config(tiny_sd3_dir, tmp_path, mixed_precision=mixed_precision, beta=0.1, use_ema=True,
                               **extra))
    assert {p.dtype for p in trainer.trainable} == {torch.bfloat16}
    gates = trainer.policy.block_sparse_gates()
    assert bool(gates) == bool(extra) and all(g.dtype == torch.bfloat16 and g.requires_grad for g in gates.values())
    frozen = {p.dtype for p in trainer.policy.transformer.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if mixed_precision == "bf16" else torch.float32}

    with trainer.accelerator.autocast():
        rollout = trainer.rollout(trainer._sample_prompts())
        trainer.compute_advantages(rollout, torch.randn(len(rollout.final_latents)))
        with torch.no_grad():
            _, stats = trainer.compute_loss(rollout.transitions, rollout.embeds)
    assert abs(stats["ratio_min"].item() - 1) <= ratio_tolerance
    assert abs(stats["ratio_max"].item() - 1) <= ratio_tolerance

    gradient_dtypes = set()
    for p in trainer.trainable:
        p.register_post_accumulate_grad_hook(lambda p: gradient_dtypes.add(p.grad.dtype))
    before = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.training_step()
    assert metrics["train/optimizer_steps"] == 2 and metrics["train/skipped_steps"] == 0  # 8 rows, 4 a step
    assert gradient_dtypes == {torch.bfloat16}
    assert {p.dtype for p in trainer.trainable} == {torch.bfloat16}
    assert sum(not torch.equal(a, b) for a, b in zip(before, trainer.trainable)) > len(before) // 2
    if gates:
        assert any(g.abs().max() > 0 for g in gates.values())  # moved off their zero init
    adam = [state for state in trainer.optimizer.state.values()]
    assert adam and {state[k].dtype for state in adam for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    assert {s.dtype for s in trainer.ema.shadow_params} == {torch.bfloat16}  # as the official wrapper's clone


def test_diffusion_nft_keeps_its_old_policy_in_the_adapter_dtype(tiny_sd3_dir, tmp_path):
    config = _config(tiny_sd3_dir, tmp_path, algorithm="diffusion_nft", scale_rewards="batch",
                     gradient_accumulation_steps=2, old_policy_decay=[0, 0.25, 0.5])
    trainer = _trainer(config)
    old = trainer.old_policy
    start = [w.clone() for w in old.weights]
    trainer.training_step()
    assert {w.dtype for w in old.weights} == {torch.bfloat16}
    assert any(not torch.equal(a, b) for a, b in zip(start, old.weights))  # soft-updated toward θ (decay 0.25)
    live, old_weights = [p.detach().clone() for p in trainer.trainable], [w.clone() for w in old.weights]
    with old.swapped_in():
        assert all(torch.equal(p, w) for p, w in zip(trainer.trainable, old_weights))
    assert all(torch.equal(p, w) for p, w in zip(trainer.trainable, live))


def test_a_resumed_run_ends_with_the_bit_identical_weights(tiny_sd3_dir, tmp_path):
    settings = dict(max_steps=2, use_ema=True, ema_decay=0.5, ema_update_interval=1)
    straight = _trainer(_config(tiny_sd3_dir, tmp_path / "straight", **settings))
    straight.train()
    resumed = _trainer(_config(tiny_sd3_dir, tmp_path / "resumed", **settings,
                               resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1")))
    resumed.train()
    assert resumed.optimizer_steps == straight.optimizer_steps == 4
    for a, b in zip(straight.trainable, resumed.trainable, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    for a, b in zip(straight.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_the_exported_lora_loads_into_diffusers_and_reproduces_the_trained_transformer(tiny_sd3_dir, tmp_path):
    trainer = _trainer(_config(tiny_sd3_dir, tmp_path, mixed_precision="no", learning_rate=5e-2))
    trainer.train()
    exported = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    trained = get_peft_model_state_dict(trainer.policy.transformer)
    assert exported.keys() == {f"transformer.{name}" for name in trained}
    assert all(exported[f"transformer.{name}"].dtype == torch.bfloat16 and torch.equal(exported[f"transformer.{name}"],
                                                                                        value)
               for name, value in trained.items())

    loaded = load_policy(tiny_sd3_dir, resolution=64, guidance_scale=1.0, max_sequence_length=16)
    loaded.load_lora(tmp_path)  # pipeline.load_lora_weights, as a diffusers user loads it
    latents = torch.randn(4, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.9, 0.6, 0.3, 0.1])
    embeds = loaded.encode_prompts([p["prompt"] for p in PROMPTS] + [PROMPTS[0]["prompt"]])
    with torch.no_grad():
        trained_velocity = trainer.policy.velocity(latents, sigmas, embeds)
        with trainer.policy.reference() as base:
            base_velocity = trainer.policy.velocity(latents, sigmas, embeds, model=base)
        loaded_velocity = loaded.velocity(latents, sigmas, embeds)
    # diffusers holds the adapter in float32 (the same values), so only the adapter's bf16 rounding differs
    lora_effect = (trained_velocity - base_velocity).abs().max()
    assert lora_effect > 0.1
    assert (loaded_velocity - trained_velocity).abs().max() < 0.01 * lora_effect
    for name, p in loaded.transformer.named_parameters():
        if "lora" in name:
            p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded.velocity(latents, sigmas, embeds), trained_velocity)


@pytest.mark.parametrize("change, message", [
    (dict(lora_dtype="float16"), "must be one of ['float32', 'bfloat16']"),
    (dict(use_lora=False), "is for LoRA adapters (use_lora true)"),
    (dict(mixed_precision="fp16"), "bfloat16 needs mixed_precision bf16"),
])
def test_bad_lora_dtype_settings_stop_with_one_line_naming_the_field(tmp_path, change, message):
    with pytest.raises(ValueError) as error:
        _config("unused", tmp_path, **change)
    text = str(error.value)
    assert text.startswith("config `lora_dtype`: ") and message in text and "\n" not in text


@pytest.mark.parametrize("launcher, mixed_precision, message", [
    ("deepspeed", "bf16", "cannot train under DeepSpeed, whose ZeRO optimizer keeps float32 master weights"),
    ("deepspeed", "no", "cannot train under DeepSpeed, whose ZeRO optimizer keeps float32 master weights"),
    ("fsdp", "bf16", "cannot train under FSDP with mixed_precision bf16: accelerate upcasts the trained weights"),
])
def test_launchers_that_keep_float32_master_weights_refuse_a_bf16_adapter(tmp_path, launcher, mixed_precision,
                                                                         message):
    """DeepSpeed's ZeRO optimizer always trains float32 master copies (and casts the module to bf16 itself under
    bf16), and accelerate's FSDP2 upcasts trained low-precision weights under mixed precision: neither would train
    the bf16 adapter that `lora_dtype` asks for. (FSDP2 with mixed_precision no trains it as asked.)"""
    plugin = SimpleNamespace(zero_stage=2, fsdp_version=2)
    trainer = SimpleNamespace(config=_config("unused", tmp_path, mixed_precision=mixed_precision),
                              accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin,
                                                                                fsdp_plugin=plugin)))
    configure = SetupMixin._configure_deepspeed if launcher == "deepspeed" else SetupMixin._configure_fsdp
    with pytest.raises(ValueError) as error:
        configure(trainer)
    text = str(error.value)
    assert text.startswith("config `lora_dtype`: bfloat16 ") and message in text and "\n" not in text


def test_the_memory_plan_counts_bf16_adapter_states_and_names_the_layouts_that_refuse_them(tiny_sd3_dir):
    from tempflow.config import parse_config
    from tempflow.memory_plan import model_memory, per_gpu

    recipe = str(Path(__file__).parents[1] / "recipes" / "tiny.yaml")
    configs = {dtype: parse_config(recipe, ["--model_name_or_path", tiny_sd3_dir, "--max_sequence_length", "16",
                                            "--mixed_precision", "bf16", "--lora_dtype", dtype])
               for dtype in ("float32", "bfloat16")}
    memory = {dtype: model_memory(config) for dtype, config in configs.items()}
    assert memory["float32"].trainable == 2 * memory["bfloat16"].trainable > 0
    bf16 = configs["bfloat16"]
    ddp = per_gpu(memory["bfloat16"], bf16, "ddp", 2)
    assert ddp["optimizer (AdamW)"] == 2 * memory["bfloat16"].trainable  # AdamW's two states in bf16
    for layout in ("zero2", "fsdp2"):
        assert per_gpu(memory["bfloat16"], bf16, layout, 2).startswith("lora_dtype bfloat16: ")
