"""The rollout engine: evaluation counts, shared prefixes, packing invariance, and on-policy log-probs."""

import pytest
import torch

from tempflow.rollout import RolloutEngine, coarsen_schedule
from tempflow.sampling import sde_step

N, G = 4, 3
PROMPTS = ["a red square", "two blue circles"]


def branch_reward_table(rewards: torch.Tensor, num_branch_steps: int, num_children: int) -> torch.Tensor:
    """Rewards of a branched rollout as a ``[trajectories·G, branch steps]`` table: column b holds the G
    children of every trajectory branched at the b-th branch step."""
    table = rewards.reshape(-1, num_branch_steps, num_children)
    return table.permute(0, 2, 1).reshape(-1, num_branch_steps)


def _count_model_rows(policy):
    """Count latents evaluated by the transformer (CFG's doubled batch counted once)."""
    counter = {"rows": 0}
    factor = 2 if getattr(policy, "do_cfg", False) else 1

    def hook(module, args, kwargs):
        counter["rows"] += kwargs["hidden_states"].shape[0] // factor

    policy.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


def _branched(policy, batch_size=8, seeds=(11, 12), **kwargs):
    engine = RolloutEngine(policy, noise_level=0.7, batch_size=batch_size)
    embeds = policy.encode_prompts(PROMPTS)
    return engine.branched(embeds, [0, 1], list(seeds), N, list(range(N - 1)), G, **kwargs)


def test_branched_rollout_cost_and_layout(any_policy):
    counter = _count_model_rows(any_policy)
    rollout = _branched(any_policy)
    trajectories, branch_steps = 2, N - 1
    expected = trajectories * (N + G * N * (N - 1) // 2)
    assert rollout.num_model_evals == expected == counter["rows"]
    assert len(rollout.final_latents) == trajectories * branch_steps * G
    assert len(rollout.transitions) == trajectories * branch_steps * G
    rewards = torch.arange(len(rollout.final_latents), dtype=torch.float32)
    table = branch_reward_table(rewards, branch_steps, G)
    assert table.shape == (trajectories * G, branch_steps)
    # a column holds children of one branch step: every entry's sample step is that column's step
    steps = branch_reward_table(rollout.sample_step.float(), branch_steps, G)
    assert torch.all(steps == torch.arange(branch_steps).float())


def test_children_share_the_ode_prefix_bit_for_bit(sd3_policy):
    rollout = _branched(sd3_policy)
    rows = rollout.transitions
    engine = RolloutEngine(sd3_policy, noise_level=0.7, batch_size=8)
    for trajectory in range(2):
        for step in range(N - 1):
            mask = (rows.step_index == step) & (rows.prompt_index == trajectory)
            states = rows.latents[mask]
            assert len(states) == G
            assert torch.equal(states, states[:1].expand_as(states))  # siblings start from one state
            assert len(torch.unique(rows.next_latents[mask], dim=0)) == G  # and differ after the SDE step
            groups = rollout.sample_group[rows.sample_index[mask]]
            assert len(torch.unique(groups)) == 1
    # the branch state at step 0 is the initial noise, the same as an ODE sample from the same seed starts at
    initial = rows.latents[(rows.step_index == 0) & (rows.prompt_index == 0)][0]
    torch.testing.assert_close(initial, engine._start(sd3_policy.sigma_schedule(N), 0, 11, "ode").latents[0])


def test_packing_changes_no_result(sd3_policy):
    small = _branched(sd3_policy, batch_size=1)
    large = _branched(sd3_policy, batch_size=64)
    torch.testing.assert_close(small.final_latents, large.final_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.transitions.log_probs, large.transitions.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.transitions.next_latents, large.transitions.next_latents, atol=1e-5, rtol=1e-5)


def test_rollouts_depend_on_seed_only(sd3_policy):
    a = _branched(sd3_policy, seeds=(1, 2))
    b = _branched(sd3_policy, seeds=(1, 2))
    c = _branched(sd3_policy, seeds=(1, 3))
    torch.testing.assert_close(a.final_latents, b.final_latents)
    n = len(a.final_latents) // 2
    torch.testing.assert_close(a.final_latents[:n], c.final_latents[:n])
    assert not torch.allclose(a.final_latents[n:], c.final_latents[n:])


def test_recomputed_log_probs_equal_rollout(any_policy):
    """The on-policy check: scoring the rollout's own transitions again gives ratio 1."""
    rollout = _branched(any_policy)
    rows = rollout.transitions
    embeds = any_policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        for index in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).split(5):
            batch = rows.select(index)
            velocity = any_policy.velocity(batch.latents, batch.sigmas, embeds[batch.prompt_index])
            out = sde_step(batch.latents, velocity, batch.sigmas, batch.sigmas_next, 0.7,
                           next_latents=batch.next_latents)
            ratio = torch.exp(out.log_prob - batch.log_probs)
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_flow_grpo_trajectories(sd3_policy):
    engine = RolloutEngine(sd3_policy, noise_level=0.7, batch_size=8)
    embeds = sd3_policy.encode_prompts(PROMPTS)
    prompt_index = [0, 0, 0, 1, 1, 1]
    rollout = engine.trajectories(embeds, prompt_index, list(range(6)), prompt_index, N)
    assert rollout.num_model_evals == 6 * N
    assert len(rollout.transitions) == 6 * (N - 1)  # the last step is never trained
    assert rollout.transitions.step_index.max().item() == N - 2
    assert rollout.sample_group.tolist() == prompt_index
    assert rollout.sample_prompt_index.tolist() == prompt_index
    windowed = engine.trajectories(embeds, prompt_index, list(range(6)), prompt_index, N, sde_window=(1, 2))
    assert sorted(set(windowed.transitions.step_index.tolist())) == [1, 2]
    assert len(windowed.transitions) == 6 * 2


def test_children_with_coarser_completion_cost_less(sd3_policy):
    full = _branched(sd3_policy)
    coarse = _branched(sd3_policy, child_num_steps=1)
    assert coarse.num_model_evals == 2 * (N + G * (N - 1))
    assert coarse.num_model_evals < full.num_model_evals
    # the stochastic step itself is unchanged
    torch.testing.assert_close(coarse.transitions.log_probs, full.transitions.log_probs)


@pytest.mark.parametrize("max_steps,expected", [(None, 5), (10, 5), (2, 2), (1, 1)])
def test_coarsen_schedule_keeps_ends(max_steps, expected):
    sigmas = torch.tensor([0.8, 0.6, 0.4, 0.3, 0.1, 0.0])
    coarse = coarsen_schedule(sigmas, max_steps)
    assert len(coarse) - 1 == expected
    assert coarse[0] == sigmas[0] and coarse[-1] == 0


def test_rollouts_keep_every_tensor_on_the_policy_device(sd3_policy):
    """A transformer on another device than the CPU (here ``meta``, which computes shapes only) must get its whole
    rollout there: a schedule tensor left on the CPU fails the first step on a GPU. CI has no GPU; this is the
    CPU-side guard for what the GPU suite first found on an H200 (σ built on the CPU in the packed loop)."""
    embeds = sd3_policy.encode_prompts(PROMPTS)
    sd3_policy.transformer.to("meta")
    engine = RolloutEngine(sd3_policy, noise_level=0.7, batch_size=4)
    embeds = embeds.to("meta")
    branched = engine.branched(embeds, [0, 1], [11, 12], N, list(range(N - 1)), G, child_num_steps=2)
    windowed = engine.trajectories(embeds, [0, 1], [11, 12], [0, 1], N, sde_window=(1, 2))
    samples = engine.sample(embeds, [0, 1], [11, 12], N)
    for tensor in (branched.final_latents, branched.transitions.log_probs, windowed.final_latents,
                   windowed.transitions.log_probs, samples):
        assert tensor.device.type == "meta"
