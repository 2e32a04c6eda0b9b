"""The trainer end to end on tiny random pipelines: it learns, exports LoRA, checkpoints and resumes exactly."""

import json
import math
import signal

import pytest
import torch
from conftest import TINY_WAN_FRAMES, TINY_WAN_SIZE
from diffusers import StableDiffusion3Pipeline, WanPipeline
from safetensors.torch import load_file

from tempflow.config import TempFlowGRPOConfig
from tempflow.rewards.combined import RewardError
from tempflow.run_directory import complete_checkpoints
from tempflow.trainer import TempFlowGRPOTrainer

PROMPTS = [{"prompt": p} for p in ("a red square", "two blue circles", "a green triangle")]


def _config(model_dir, output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir), model_name_or_path=model_dir, resolution=64, guidance_scale=1.0,
        num_inference_steps=4, eval_num_inference_steps=4, num_generations=3, prompts_per_iteration=2,
        per_device_train_batch_size=6, gradient_accumulation_steps=1, lora_r=4, lora_alpha=8,
        learning_rate=1e-2, epsilon=0.2, max_steps=2, save_steps=1, reward_funcs=["brightness"],
        train_prompts="unused", eval_prompts=None, disable_progress_bar=True, max_sequence_length=16,
    )
    values.update(overrides)
    return TempFlowGRPOConfig(**values)


def _trainer(config, **kwargs):
    kwargs.setdefault("train_prompts", PROMPTS)
    return TempFlowGRPOTrainer(config, **kwargs)


def _tensorboard_events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    for path in directory.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    return tags


def _lora_weights(directory):
    return load_file(str(directory / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_first_inner_step_is_on_policy(tiny_sd3_dir, tmp_path, guidance_scale):
    trainer = _trainer(_config(tiny_sd3_dir, tmp_path, guidance_scale=guidance_scale, beta=0.1))
    prompts = trainer._sample_prompts()
    rollout = trainer.rollout(prompts)
    embeds = rollout.embeds
    trainer.compute_advantages(rollout, torch.randn(len(rollout.final_latents)))
    with torch.no_grad():
        _, stats = trainer.compute_loss(rollout.transitions, embeds)
    assert stats["ratio_min"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["ratio_max"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-8)  # gaussian LoRA init: the adapter starts as a no-op


@pytest.mark.parametrize("pruning", [{}, {"token_pruning_layers": [0], "token_pruning_keep_ratio": 0.5,
                                          "attention_backend": "sdpa"}],
                         ids=["dense", "pruned"])
def test_flux_first_inner_step_is_on_policy(tiny_flux_dir, tmp_path, pruning):
    trainer = _trainer(_config(tiny_flux_dir, tmp_path, guidance_scale=3.5, noise_level=0.9, **pruning))
    assert type(trainer.policy.transformer.forward).__name__ == ("TokenPruner" if pruning else "method")
    rollout = trainer.rollout(trainer._sample_prompts())
    embeds = rollout.embeds
    trainer.compute_advantages(rollout, torch.randn(len(rollout.final_latents)))
    with torch.no_grad():
        _, stats = trainer.compute_loss(rollout.transitions, embeds)
    assert stats["ratio_min"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["ratio_max"].item() == pytest.approx(1.0, abs=1e-5)


FAMILY_SETTINGS = {"qwen_image": dict(guidance_scale=4.0),
                   "wan": dict(guidance_scale=5.0, resolution=TINY_WAN_SIZE, num_frames=TINY_WAN_FRAMES)}


@pytest.mark.parametrize("family, speed", [("qwen_image", {}), ("wan", {}),
                                           ("wan", dict(token_pruning_layers=[0], token_pruning_keep_ratio=0.5,
                                                        attention_backend="sdpa"))],
                         ids=["qwen_image", "wan", "wan-pruned"])
def test_qwen_image_and_wan_branch_at_the_stated_cost_and_start_on_policy(family, speed, request, tmp_path):
    """With CFG (doubled batches, Qwen-Image's norm rescale, its masked prompts of different lengths; Wan also with
    token pruning) the first inner step recomputes the rollout's log-probs exactly; each seed costs N + G·N(N−1)/2
    transformer evaluations (the transformer also sees each training row once more, for the KL reference's means)."""
    config = _config(request.getfixturevalue(f"tiny_{family}_dir"), tmp_path, beta=0.1, **FAMILY_SETTINGS[family],
                     **speed)
    trainer = _trainer(config)
    assert type(trainer.policy.transformer.forward).__name__ == ("TokenPruner" if speed else "method")
    rows = []
    trainer.policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0] // 2), with_kwargs=True)
    rollout = trainer.rollout(trainer._sample_prompts())
    n, g, seeds = config.num_inference_steps, config.num_generations, config.prompts_per_iteration
    assert rollout.num_model_evals == seeds * (n + g * n * (n - 1) // 2)
    assert sum(rows) == rollout.num_model_evals + len(rollout.transitions)
    trainer.compute_advantages(rollout, torch.randn(len(rollout.final_latents)))
    with torch.no_grad():
        _, stats = trainer.compute_loss(rollout.transitions, rollout.embeds)
    assert stats["ratio_min"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["ratio_max"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-8)


def test_wan_trains_with_block_sparse_attention_on_a_video_reward(tiny_wan_dir, tmp_path):
    """3-D tiles (1 frame × 2 × 2 tokens) over the 3×2×2 grid at density 0.5; an image reward on the first and last
    frames plus the temporal one; videos in the evaluation samples; the LoRA loads into the stock pipeline."""
    from tempflow.attention.block_sparse import uses_block_sparse

    config = _config(tiny_wan_dir, tmp_path, **FAMILY_SETTINGS["wan"], num_inference_steps=3, num_generations=2,
                     prompts_per_iteration=1, max_steps=1, block_sparse_density=0.5, block_sparse_tile=[1, 2, 2],
                     block_sparse_kernel="torch", attention_backend="sdpa", reward_funcs=["brightness", "frame_consistency"],
                     reward_frames=[0, -1])
    trainer = _trainer(config, eval_prompts=PROMPTS[:1])
    assert uses_block_sparse(trainer.policy.transformer)
    summary = trainer.train()
    history = summary["history"]
    assert history[0]["train/optimizer_steps"] > 0 and math.isfinite(history[0]["train/grad_norm"])
    assert history[0]["rollout/model_evals"] == 3 + 2 * 3
    assert set(summary["evaluations"][0]) >= {"eval/brightness", "eval/frame_consistency"}
    for name in ("samples/before.png", "samples/after/00.webp", "pytorch_lora_weights.safetensors"):
        assert (tmp_path / name).is_file(), name
    lora = _lora_weights(tmp_path)
    assert any(name.endswith("lora_B.weight") and value.abs().max() > 0 for name, value in lora.items())
    WanPipeline.from_pretrained(tiny_wan_dir).load_lora_weights(tmp_path)


@pytest.mark.parametrize("algorithm", ["tempflow_grpo", "flow_grpo"])
def test_training_writes_outputs_and_a_loadable_lora(tiny_sd3_dir, tmp_path, algorithm):
    config = _config(tiny_sd3_dir, tmp_path, algorithm=algorithm, beta=0.01, use_ema=True, report_to="tensorboard")
    summary = _trainer(config, eval_prompts=PROMPTS[:2]).train()
    assert summary["iterations"] == 2
    assert [e["iteration"] for e in summary["evaluations"]] == [0, 2]
    for name in ("metrics.json", "metrics.jsonl", "reward_curve.png", "samples/before.png", "samples/after.png", "samples/before_after.png",
                 "pytorch_lora_weights.safetensors"):
        assert (tmp_path / name).is_file(), name
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert all(h["train/optimizer_steps"] > 0 and math.isfinite(h["train/grad_norm"]) for h in history)
    for h in history:  # the diagnostics of how much signal each iteration carried and how far it moved
        assert 0 <= h["groups/zero_spread_fraction"] <= 1 and h["groups/reward_std"] > 0
        assert h["train/abs_log_ratio_last_step"] > 0  # rows of the 3rd optimizer step, after two updates
    if algorithm == "tempflow_grpo":
        assert history[0]["rollout/model_evals"] == 2 * (4 + 3 * 4 * 3 // 2)
        assert all(0 <= history[0][f"groups/zero_spread_fraction/step{i}"] <= 1 for i in range(3))
    else:
        assert history[0]["rollout/model_evals"] == 2 * 3 * 4
    events = _tensorboard_events(tmp_path)
    assert {"reward/mean", "train/approx_kl", "train/clip_fraction", "eval/reward"} <= events["scalars"]
    assert "eval/samples" in events["images"]
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.load_lora_weights(tmp_path)
    assert len(_lora_weights(tmp_path)) > 0
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_resume_ends_with_the_same_weights(tiny_sd3_dir, tmp_path):
    straight = tmp_path / "straight"
    _trainer(_config(tiny_sd3_dir, straight, max_steps=3, use_ema=True)).train()

    resumed = tmp_path / "resumed"
    _trainer(_config(tiny_sd3_dir, resumed, max_steps=2, use_ema=True)).train()
    assert complete_checkpoints(resumed)[-1].name == "checkpoint-2"
    # the trainer's own state (EMA, RNG) as safetensors and JSON: nothing in the checkpoint to unpickle
    assert not list((resumed / "checkpoint-2").rglob("*.pkl"))
    assert (resumed / "checkpoint-2" / "tensor_state" / "ema" / "part-0.safetensors").is_file()
    (resumed / ".tmp-checkpoint-3").mkdir()  # a checkpoint interrupted mid-write is ignored
    summary = _trainer(_config(tiny_sd3_dir, resumed, max_steps=3, use_ema=True, resume_from_checkpoint="latest")).train()
    assert summary["iterations"] == 3 and len(summary["history"]) == 3

    a, b = _lora_weights(straight), _lora_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_nan_reward_stops_with_the_rewards_name(tiny_sd3_dir, tmp_path):
    def broken(images, prompts, **metadata):
        return [math.nan] * len(prompts)

    trainer = _trainer(_config(tiny_sd3_dir, tmp_path), reward_funcs={"broken": broken})
    with pytest.raises(RewardError, match="broken"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))


def test_skipped_samples_never_reach_the_optimizer(tiny_sd3_dir, tmp_path):
    def half_broken(images, prompts, **metadata):
        return [None if i % 2 else float(images[i].mean()) for i in range(len(prompts))]

    config = _config(tiny_sd3_dir, tmp_path, reward_error_policy="skip", max_steps=1)
    trainer = _trainer(config, reward_funcs={"half": half_broken})
    with pytest.warns(UserWarning, match="half"):
        metrics = trainer.training_step()
    assert metrics["reward/skipped"] == metrics["reward/count"] // 2
    assert math.isfinite(metrics["train/policy_loss"]) and math.isfinite(metrics["train/grad_norm"])


def test_training_raises_the_reward(tiny_sd3_dir, tmp_path):
    """A reward the tiny random VAE is sensitive to (a fixed stripe pattern in the red channel) goes up."""
    stripes = (torch.arange(64)[None, :] // 16 % 2 * 2 - 1).float().expand(64, 64)

    def stripe_reward(images, prompts, **metadata):
        return (images[:, 0] * stripes).mean(dim=(1, 2)).tolist()

    config = _config(tiny_sd3_dir, tmp_path, num_generations=4, per_device_train_batch_size=8, use_lora=False,
                     learning_rate=1e-3, num_iterations=2, max_steps=25, save_steps=100)
    summary = _trainer(config, reward_funcs={"stripes": stripe_reward}, eval_prompts=PROMPTS).train()
    before, after = summary["evaluations"][0]["eval/reward"], summary["evaluations"][-1]["eval/reward"]
    assert after > before + 0.005
    train = [h["reward/mean"] for h in summary["history"]]
    assert sum(train[-5:]) / 5 > sum(train[:5]) / 5


def test_rollout_options_seeds_subsets_and_prompt_groups(tiny_sd3_dir, tmp_path):
    config = _config(tiny_sd3_dir, tmp_path, seeds_per_prompt=2, num_branch_steps_per_iteration=2,
                     child_num_inference_steps=1, advantage_group="prompt")
    trainer = _trainer(config)
    rollout = trainer.rollout(trainer._sample_prompts())
    trajectories, g = 2 * 2, 3
    assert rollout.num_model_evals == trajectories * (4 + g * 2)  # children finish in one ODE step
    assert len(rollout.final_latents) == trajectories * 2 * g
    assert len(set(rollout.transitions.step_index.tolist())) == 2
    # prompt groups: both seeds of a prompt share a group at each branch step
    groups = rollout.sample_group.reshape(trajectories, 2, g)
    assert torch.equal(groups[0], groups[1]) and not torch.equal(groups[0], groups[2])


def test_bf16_and_gradient_checkpointing_train(tiny_sd3_dir, tmp_path):
    config = _config(tiny_sd3_dir, tmp_path, mixed_precision="bf16", gradient_checkpointing=True, max_steps=1)
    trainer = _trainer(config)
    assert trainer.policy.transformer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.trainable)
    with trainer.accelerator.autocast():
        rollout = trainer.rollout(trainer._sample_prompts())
        embeds = rollout.embeds
        trainer.compute_advantages(rollout, torch.randn(len(rollout.final_latents)))
        with torch.no_grad():
            _, stats = trainer.compute_loss(rollout.transitions, embeds)
    # bf16 kernels may round differently for other batch shapes; the rollout's precision must still match
    assert abs(stats["ratio_min"].item() - 1) < 1e-3 and abs(stats["ratio_max"].item() - 1) < 1e-3
    before = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.training_step()
    assert math.isfinite(metrics["train/policy_loss"]) and metrics["train/optimizer_steps"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.trainable))


def test_full_fine_tuning_trains_every_weight_against_a_frozen_reference(tiny_sd3_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    config = _config(tiny_sd3_dir, tmp_path, use_lora=False, beta=0.1, learning_rate=1e-3, max_steps=1)
    trainer = _trainer(config)
    transformer = trainer.policy.transformer
    assert not trainer.policy.has_lora
    assert len(trainer.trainable) == len(list(transformer.parameters())) and all(p.requires_grad for p in trainer.trainable)
    initial = {k: v.clone() for k, v in transformer.state_dict().items()}

    summary = trainer.train()
    assert summary["history"][0]["train/kl"] > 0  # the later optimizer steps of the iteration are off the reference
    assert any(not torch.equal(v, initial[k]) for k, v in transformer.state_dict().items())
    with trainer.policy.reference() as reference:
        assert reference is not transformer
        for name, value in reference.state_dict().items():
            assert torch.equal(value, initial[name]), name

    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    exported = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer").state_dict()
    assert exported.keys() == transformer.state_dict().keys()
    for name, value in transformer.state_dict().items():
        assert torch.equal(exported[name], value), name

    without_kl = _trainer(_config(tiny_sd3_dir, tmp_path / "no-kl", use_lora=False))
    with pytest.raises(RuntimeError, match="KL reference"), without_kl.policy.reference():
        pass  # beta 0: no frozen copy is kept


def test_ema_offload_keeps_the_ema_on_the_cpu_with_the_same_values(tiny_sd3_dir, tmp_path):
    trainers = {}
    for offload in (False, True):
        config = _config(tiny_sd3_dir, tmp_path / str(offload), use_ema=True, ema_decay=0.5, ema_offload=offload)
        trainers[offload] = trainer = _trainer(config)
        trainer.training_step()
    on_device, offloaded = trainers[False], trainers[True]
    assert offloaded.optimizer_steps == on_device.optimizer_steps == 3
    # EMAModel counts from the optimizer step it is set to before each update: 3, then its step() adds 1
    assert offloaded.ema.optimization_step == on_device.ema.optimization_step == 4
    for shadow, reference, weight in zip(offloaded.ema.shadow_params, on_device.ema.shadow_params, offloaded.trainable):
        assert shadow.device.type == "cpu" and shadow.data_ptr() != weight.data_ptr()
        torch.testing.assert_close(shadow, reference, atol=1e-7, rtol=0)
    # an average of the weights' trajectory, not a copy of the current weights
    assert any(not torch.allclose(s, w) for s, w in zip(offloaded.ema.shadow_params, offloaded.trainable))


def test_learning_rate_schedule_warms_up_decays_and_resumes_exactly(tiny_sd3_dir, tmp_path):
    """Cosine with 2 warmup steps over 3 iterations of 3 optimizer steps (18 rows, micro-batches of 6): the rate
    of each iteration's last step follows the formula, and a run resumed after iteration 2 continues it."""
    schedule = dict(lr_scheduler_type="cosine", warmup_steps=2, max_steps=3)

    def expected(step, total=9, warmup=2):
        factor = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        return 1e-2 * factor

    config = _config(tiny_sd3_dir, tmp_path / "straight", **schedule)
    assert config.optimizer_steps_per_iteration == 3 and config.num_warmup_steps == 2
    straight = _trainer(config).train()["history"]
    rates = [h["train/learning_rate"] for h in straight]
    assert rates == pytest.approx([expected(2), expected(5), expected(8)], rel=1e-6)

    interrupted = _trainer(_config(tiny_sd3_dir, tmp_path / "resumed", **schedule))
    step = interrupted.training_step

    def stop_after_the_second_iteration():
        if interrupted.iteration == 1:
            interrupted._stop_signal = signal.SIGTERM  # as the SIGTERM handler records it
        return step()

    interrupted.training_step = stop_after_the_second_iteration
    assert interrupted.train()["iterations"] == 2
    resumed = _trainer(_config(tiny_sd3_dir, tmp_path / "resumed", **schedule, resume_from_checkpoint="latest")).train()
    assert [h["train/learning_rate"] for h in resumed["history"]] == rates


@pytest.mark.parametrize("loss_mean_over, flat, counted", [
    ("all_rows", "group", 18), ("nonzero_advantage_rows", "group", 15), ("nonzero_advantage_child_slots", "group", 18),
    ("nonzero_advantage_rows", "path", 9), ("nonzero_advantage_child_slots", "path", 9),
])
def test_loss_mean_over_all_rows_or_only_those_with_an_advantage(tiny_sd3_dir, tmp_path, loss_mean_over, flat, counted):
    """At ratio 1 each row's loss is −A·w: the step's loss is their sum over the counted rows. 2 paths x 3 branch
    steps x 3 children = 18 rows; rewards (0, 0, 10) per group with advantages clipped to ±1 keep the sum away from 0.
    With the first branch point's siblings all scoring 1 (`group`), its 3 rows have zero advantage: dropped as rows,
    kept as child slots (each slot has advantage at its path's other steps). With the whole first path scoring 1
    (`path`), its 9 rows leave the mean either way."""
    trainer = _trainer(_config(tiny_sd3_dir, tmp_path, loss_mean_over=loss_mean_over, adv_clip_max=1.0))
    rollout = trainer.rollout(trainer._sample_prompts())
    embeds = rollout.embeds
    rewards = torch.tensor([0.0, 0.0, 10.0]).repeat(len(rollout.final_latents) // 3)
    first = rollout.sample_group == rollout.sample_group[0] if flat == "group" else rollout.sample_trajectory == 0
    rewards[first] = 1.0
    trainer.compute_advantages(rollout, rewards)
    rows = rollout.transitions
    assert len(rows) == 18 and float(rows.loss_mask.sum()) == counted
    with torch.no_grad():
        loss, _ = trainer.compute_loss(rows, embeds)  # one micro-batch; optimize scales it by rows / counted rows
    expected = -(rows.advantages * rows.weights).sum() / counted
    assert abs(float(expected)) > 0.1
    assert float(loss) * len(rows) / counted == pytest.approx(float(expected), rel=1e-4)


def test_rollout_and_loss_share_one_stochastic_step(tiny_sd3_dir, tmp_path):
    trainer = _trainer(_config(tiny_sd3_dir, tmp_path, sde_type="cps", noise_level=0.5))
    batch = trainer.rollout(trainer._sample_prompts())
    assert batch.step is trainer.step is trainer.engine.step  # the rollout's rows and the loss: one object
    assert (batch.step.kind, batch.step.noise_level) == ("cps", 0.5)


def test_reference_means_are_computed_once_per_rollout(tiny_sd3_dir, tmp_path):
    """With beta > 0 the reference policy (adapter off) is entered once per iteration, with the rollout, not for
    each of the 6 micro-batches of the 2 inner epochs."""
    trainer = _trainer(_config(tiny_sd3_dir, tmp_path, beta=0.1, num_iterations=2, max_steps=1))
    calls = {"reference": 0}
    reference = trainer.policy.reference

    def counting_reference():
        calls["reference"] += 1
        return reference()

    trainer.policy.reference = counting_reference
    metrics = trainer.training_step()
    assert calls["reference"] == 1 and metrics["train/optimizer_steps"] == 2 * 3
    assert math.isfinite(metrics["train/kl"])
