"""DiffusionNFT: the loss equals a line-by-line transcription of the official script's, the old policy and its
decay schedule behave as the official code's, and the trainer runs it end to end (LoRA, CFG on and off, resume)."""

import pytest
import torch
from safetensors.torch import load_file

from tempflow.config import TempFlowGRPOConfig
from tempflow.nft import OldPolicy, diffusion_nft_loss, old_policy_decay, optimality_probability
from tempflow.trainer import TempFlowGRPOTrainer

PROMPTS = [{"prompt": p} for p in ("a red square", "two blue circles", "a green triangle")]


def _official_policy_loss(forward_prediction, old_prediction, x0, xt, t, advantages, beta, adv_clip_max):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py (adv_mode "all"), its statements as written there."""
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    return (ori_policy_loss * adv_clip_max).mean()


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_and_gradient_equal_the_official_scripts(beta):
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 5, 4, 6, 6, generator=generator)
    t = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.05])
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    old = noise - x0 + 0.1 * torch.randn(x0.shape, generator=generator)
    advantages = torch.tensor([-7.0, -1.0, 0.0, 2.5, 6.0])  # beyond the clip on both sides
    current = (old + 0.05 * torch.randn(x0.shape, generator=generator)).requires_grad_(True)
    expected = _official_policy_loss(current, old, x0, xt, t, advantages, beta, 5.0)
    (expected_grad,) = torch.autograd.grad(expected, current)

    per_sample, stats = diffusion_nft_loss(current, old, x0, xt, t, optimality_probability(advantages, 5.0), beta, 5.0)
    (grad,) = torch.autograd.grad(per_sample.mean(), current)
    torch.testing.assert_close(per_sample.mean(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)
    assert stats["nft/old_deviation"] > 0


def test_optimality_maps_clipped_advantages_onto_the_unit_interval():
    r = optimality_probability(torch.tensor([-9.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0]), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_at_half_optimality_and_no_deviation_the_gradient_vanishes():
    """r = ½ with v_θ = v_old: the positive and negative pulls cancel, so a zero-advantage sample leaves θ alone
    until θ leaves θ_old."""
    x0, xt = torch.randn(2, 3, 4, 4, 4)
    old = torch.randn(3, 4, 4, 4)
    current = old.clone().requires_grad_(True)
    per_sample, _ = diffusion_nft_loss(current, old, x0, xt, torch.full((3,), 0.5), torch.full((3,), 0.5), 1.0, 5.0)
    (grad,) = torch.autograd.grad(per_sample.sum(), current)
    assert grad.abs().max() < 1e-6


@pytest.mark.parametrize("schedule, steps, expected", [
    ((0, 0.001, 0.5), [0, 10, 499, 500, 2000], [0.0, 0.01, 0.499, 0.5, 0.5]),  # official decay_type 1
    ((75, 0.0075, 0.999), [0, 74, 75, 175, 1000], [0.0, 0.0, 0.0, 0.75, 0.999]),  # decay_type 2
    ((0, 0.0, 0.0), [0, 100], [0.0, 0.0]),  # decay_type 0
])
def test_old_policy_decay_follows_the_official_schedules(schedule, steps, expected):
    assert [old_policy_decay(s, *schedule) for s in steps] == pytest.approx(expected)


@pytest.mark.parametrize("swap_by_copy", [False, True], ids=["storage", "by value (FSDP)"])
def test_old_policy_swaps_in_keeping_the_live_storage_and_soft_updates(swap_by_copy):
    weights = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2, 2))]
    old = OldPolicy(weights, swap_by_copy=swap_by_copy)
    with torch.no_grad():
        for w in weights:
            w.add_(4.0)
    storage = weights[0].data_ptr()
    with old.swapped_in():
        assert torch.equal(weights[0], torch.zeros(3)) and torch.equal(weights[1], torch.ones(2, 2))
    assert weights[0].data_ptr() == storage and torch.equal(weights[0], torch.full((3,), 4.0))
    old.soft_update(0.25)  # 0.25·old + 0.75·θ
    torch.testing.assert_close(old.weights[0], torch.full((3,), 3.0))
    torch.testing.assert_close(old.weights[1], torch.full((2, 2), 0.25 + 0.75 * 5.0))


def _config(model_dir, output_dir, **overrides):
    values = dict(
        algorithm="diffusion_nft", output_dir=str(output_dir), model_name_or_path=model_dir, resolution=64,
        guidance_scale=1.0, num_inference_steps=4, eval_num_inference_steps=4, num_generations=3,
        prompts_per_iteration=2, scale_rewards="batch", per_device_train_batch_size=3, gradient_accumulation_steps=6,
        lora_r=4, lora_alpha=8, learning_rate=1e-2, max_steps=2, save_steps=1, reward_funcs=["brightness"],
        train_prompts="unused", eval_prompts=None, disable_progress_bar=True, max_sequence_length=16,
    )
    values.update(overrides)
    return TempFlowGRPOConfig(**values)


@pytest.mark.parametrize("guidance_scale, beta", [(1.0, 0.0), (4.5, 1e-4)])
def test_an_iteration_trains_lora_and_moves_the_old_policy_by_its_decay(tiny_sd3_dir, tmp_path, guidance_scale, beta):
    trainer = TempFlowGRPOTrainer(_config(tiny_sd3_dir, tmp_path, guidance_scale=guidance_scale, beta=beta,
                                          old_policy_decay=[0, 0.25, 0.5]), train_prompts=PROMPTS)
    start = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.training_step()
    rows = 2 * 3 * 3  # prompts x generations x int(4 x 0.99) timesteps
    assert metrics["train/optimizer_steps"] == 1 and trainer.config.rows_per_iteration == rows
    assert metrics["rollout/model_evals"] == 2 * 3 * 4  # ODE samples only: no per-step log-probs
    assert metrics["train/nft/old_deviation"] == 0.0  # θ_old = θ until the first update
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("train/") and
               k != "train/abs_log_ratio_last_step")
    assert ("train/kl" in metrics) == (beta > 0)
    trained = [p.detach() for p in trainer.trainable]
    assert any(not torch.equal(a, b) for a, b in zip(start, trained))
    assert metrics["nft/old_policy_decay"] == 0.25  # 1 step x 0.25
    for old, first, now in zip(trainer.old_policy.weights, start, trained):
        torch.testing.assert_close(old, 0.25 * first + 0.75 * now)


def test_rollouts_are_drawn_by_the_old_policy(tiny_sd3_dir, tmp_path):
    trainer = TempFlowGRPOTrainer(_config(tiny_sd3_dir, tmp_path, old_policy_decay=[0, 0.0, 0.0]),
                                  train_prompts=PROMPTS)
    with torch.no_grad():
        for p in trainer.trainable:
            p.add_(0.5 * torch.randn_like(p))  # θ leaves θ_old
    prompts = trainer._sample_prompts()
    rollout = trainer.rollout(prompts)
    embeds = rollout.embeds
    seeds = [trainer._trajectory_seed(p, j) for p in range(len(prompts)) for j in range(3)]
    index = rollout.sample_prompt_index.tolist()
    by_current = trainer.engine.sample(embeds, index, seeds, 4)
    with trainer.old_policy.swapped_in():
        by_old = trainer.engine.sample(embeds, index, seeds, 4)
    torch.testing.assert_close(rollout.final_latents, by_old)
    assert not torch.allclose(rollout.final_latents, by_current)
    rows = rollout.transitions
    assert len(rows) == 18 and sorted(set(rows.step_index.tolist())) <= [0, 1, 2, 3]
    for s in range(6):  # each sample at three distinct timesteps
        assert len(set(rows.step_index[rows.sample_index == s].tolist())) == 3


def test_resume_keeps_the_old_policy(tiny_sd3_dir, tmp_path):
    straight = tmp_path / "straight"
    TempFlowGRPOTrainer(_config(tiny_sd3_dir, straight, max_steps=3, use_ema=True), train_prompts=PROMPTS).train()
    resumed = tmp_path / "resumed"
    TempFlowGRPOTrainer(_config(tiny_sd3_dir, resumed, max_steps=2, use_ema=True), train_prompts=PROMPTS).train()
    TempFlowGRPOTrainer(_config(tiny_sd3_dir, resumed, max_steps=3, use_ema=True, resume_from_checkpoint="latest"),
                        train_prompts=PROMPTS).train()
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(sde_window_size=2), "sde_window_size"),
    (dict(loss_mean_over="nonzero_advantage_rows"), "loss_mean_over"),
    (dict(old_policy_decay=[0, 0.1]), "old_policy_decay"),
    (dict(old_policy_decay=[0, 0.1, 1.0]), "old_policy_decay"),
    (dict(timestep_fraction=0.1), "timestep_fraction"),
    (dict(nft_beta=0.0), "nft_beta"),
])
def test_bad_diffusion_nft_settings_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _config("unused", tmp_path, **change)
