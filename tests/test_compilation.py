"""`compile_transformer`: the compiled transformer computes what the eager one does, its graphs do not multiply
with batch sizes, bucket padding leaves real rows alone, and training runs with it."""

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from tempflow.config import TempFlowGRPOConfig
from tempflow.policies import load_policy
from tempflow.rollout import RolloutEngine
from tempflow.sampling import sde_step
from tempflow.trainer import TempFlowGRPOTrainer

PROMPTS = ["a red square", "two blue circles"]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _inputs(policy, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = policy.initial_noise(torch.Generator()).shape[1:]
    latents, next_latents = torch.randn(batch, *shape, generator=generator), torch.randn(batch, *shape, generator=generator)
    sigmas = torch.linspace(0.9, 0.3, batch)
    return latents, next_latents, sigmas, policy.encode_prompts([PROMPTS[i % 2] for i in range(batch)])


def _velocity_and_log_prob(policy, batch: int):
    latents, next_latents, sigmas, embeds = _inputs(policy, batch, seed=batch)
    with torch.no_grad():
        velocity = policy.velocity(latents, sigmas, embeds)
        return velocity, sde_step(latents, velocity, sigmas, sigmas - 0.2, 0.7, next_latents=next_latents).log_prob


@pytest.fixture(scope="module")
def compiled_sd3(tiny_sd3_dir):
    """A CFG policy compiled with inductor (one graph, compiled once for the module), with its eager results."""
    policy = load_policy(tiny_sd3_dir, resolution=64, guidance_scale=4.5, max_sequence_length=16)
    policy.transformer.eval()
    eager = {batch: _velocity_and_log_prob(policy, batch) for batch in (3, 1, 5)}
    policy.compile_transformer("inductor")
    return policy, eager


def test_compiled_velocity_and_log_prob_match_eager_at_every_batch_size(compiled_sd3):
    policy, eager = compiled_sd3
    graphs = _graphs()
    for batch, (velocity, log_prob) in eager.items():
        compiled_velocity, compiled_log_prob = _velocity_and_log_prob(policy, batch)
        # inductor fuses and reorders float32 ops: equal up to rounding, not bit for bit
        torch.testing.assert_close(compiled_velocity, velocity, rtol=0, atol=2e-5)
        torch.testing.assert_close(compiled_log_prob, log_prob, rtol=1e-5, atol=1e-4)
    assert _graphs() - graphs == 1  # one graph with a dynamic batch serves batches 3, 1 and 5 (CFG: 6, 2, 10)


def test_a_rollout_of_varying_batch_sizes_compiles_no_further_graph(compiled_sd3):
    policy, _ = compiled_sd3
    _velocity_and_log_prob(policy, 3)  # the graph exists whichever test runs first
    graphs, sizes = _graphs(), []
    velocity = policy.velocity

    def recording(latents, *args, **kwargs):
        sizes.append(len(latents))
        return velocity(latents, *args, **kwargs)

    policy.velocity = recording
    try:
        engine = RolloutEngine(policy, noise_level=0.7, batch_size=5)
        rollout = engine.branched(policy.encode_prompts(PROMPTS), [0, 1], [7, 8], 3, [0, 1], 2)
    finally:
        del policy.velocity
    assert len(set(sizes)) >= 3, sizes  # packed batches, partial ones at the end
    assert _graphs() == graphs
    assert torch.isfinite(rollout.final_latents).all() and torch.isfinite(rollout.transitions.log_probs).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_padding_to_buckets_leaves_real_rows_unchanged(tiny_sd3_dir, tiny_flux_dir, family):
    directory, scale = (tiny_sd3_dir, 4.5) if family == "sd3" else (tiny_flux_dir, 3.5)
    policy = load_policy(directory, resolution=64, guidance_scale=scale, max_sequence_length=16)
    latents, _, sigmas, embeds = _inputs(policy, 5)
    seen = []
    policy.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(len(kwargs["hidden_states"])),
                                                 with_kwargs=True)
    with torch.no_grad():
        unpadded = policy.velocity(latents, sigmas, embeds)
        policy.compiled, policy.compile_batch_buckets = True, (4, 8)  # padding as for static graphs, model eager
        padded = policy.velocity(latents, sigmas, embeds)
    rows = 10 if family == "sd3" else 5  # SD3's CFG doubles the batch
    assert seen[0] == rows and seen[1:] == ([8, 4] if family == "sd3" else [8])  # chunks of the largest bucket
    # same rows, other batch sizes: only the BLAS blocking differs (≈1e-6 on the CPU)
    torch.testing.assert_close(padded, unpadded, rtol=0, atol=1e-5)


def test_bucketed_static_graphs_are_one_per_bucket(sd3_policy):
    sd3_policy.transformer.eval()
    sd3_policy.compile_transformer("eager", batch_buckets=[8, 2, 6, 4])  # dynamo's graphs, no code generation
    graphs = _graphs()
    for batch in (1, 2, 3, 4, 7, 1):  # CFG: 2, 4, 6, 8, 14 (8 + 6), 2 rows, all on bucket sizes
        latents, _, sigmas, embeds = _inputs(sd3_policy, batch)
        with torch.no_grad():
            assert sd3_policy.velocity(latents, sigmas, embeds).shape[0] == batch
    assert _graphs() - graphs == 4  # static graphs, one per bucket (torch's automatic dynamic shapes make 3)


def test_compile_transformer_rejects_what_it_cannot_do(sd3_policy):
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'"):
        sd3_policy.compile_transformer("nope")
    with pytest.raises(ValueError, match="inductor mode"):
        sd3_policy.compile_transformer("aot_eager", "max-autotune-no-cudagraphs")
    with pytest.raises(ValueError, match="compile mode must be one of"):
        sd3_policy.compile_transformer("inductor", "reduce-overhead")
    assert not sd3_policy.compiled


@pytest.mark.parametrize(
    "values, field",
    [
        ({"compile_transformer": True, "compile_mode": "reduce-overhead"}, "compile_mode"),
        ({"compile_transformer": True, "compile_backend": "aot_eager", "compile_mode": "max-autotune-no-cudagraphs"},
         "compile_mode"),
        ({"compile_transformer": True, "compile_backend": ""}, "compile_backend"),
        ({"compile_transformer": True, "compile_batch_buckets": [8, 8]}, "compile_batch_buckets"),
        ({"compile_transformer": True, "compile_batch_buckets": [0, 8]}, "compile_batch_buckets"),
        ({"compile_batch_buckets": [8, 16]}, "compile_batch_buckets"),
    ],
)
def test_config_rejects_impossible_compile_settings(values, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TempFlowGRPOConfig(**values)
    TempFlowGRPOConfig(compile_transformer=True, compile_batch_buckets=[16, 8], compile_mode="max-autotune-no-cudagraphs")


def test_training_with_the_compiled_transformer_stays_on_policy_and_learns(tiny_sd3_dir, tmp_path):
    config = TempFlowGRPOConfig(
        output_dir=str(tmp_path), model_name_or_path=tiny_sd3_dir, resolution=64, guidance_scale=1.0,
        num_inference_steps=3, num_generations=2, prompts_per_iteration=2, per_device_train_batch_size=3,
        gradient_accumulation_steps=8, lora_r=4, lora_alpha=8, learning_rate=1e-2, epsilon=0.2, max_steps=1,
        save_steps=1, reward_funcs=["brightness"], train_prompts="unused", eval_prompts=None,
        disable_progress_bar=True, max_sequence_length=16, rollout_batch_size=3, compile_transformer=True,
        # dynamo's graphs run as traced, to keep the test fast; aot_eager (AOTAutograd's joint forward/backward
        # graph, as inductor builds it) doubles its time and gives ratio 1 too, with and without checkpointing
        compile_backend="eager",
    )
    trainer = TempFlowGRPOTrainer(config, train_prompts=[{"prompt": p} for p in PROMPTS])
    assert trainer.model is trainer.policy.transformer  # compiled in place: prepare() kept the same module
    before = {k: v.clone() for k, v in trainer.policy.lora_state_dict().items()}
    graphs = _graphs()
    summary = trainer.train()
    metrics = summary["history"][0]
    # the compiled rollout (eval, no grad) and the compiled recomputation (train, grad) agree: all micro-batches
    # precede the one optimizer step, so every ratio is 1
    assert metrics["train/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/optimizer_steps"] == 1
    # one graph for rollouts, one for recomputation, and at most one for batch 1, which dynamo specialises
    assert 2 <= _graphs() - graphs <= 3
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert len(saved) == len(before)  # the export's keys are unaffected by compilation
    after = trainer.policy.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_token_pruning_traces_under_compile(tiny_flux_dir):
    from tempflow.attention.pruning import TokenPruning

    policy = load_policy(tiny_flux_dir, resolution=64, guidance_scale=3.5, max_sequence_length=16)
    policy.set_token_pruning(TokenPruning((0,), 0.5))
    policy.transformer.eval()
    eager = {batch: _velocity_and_log_prob(policy, batch)[0] for batch in (3, 5, 2)}
    policy.compile_transformer("eager")  # dynamo's graph run as traced: equal to eager bit for bit
    graphs = _graphs()
    for batch, velocity in eager.items():
        torch.testing.assert_close(_velocity_and_log_prob(policy, batch)[0], velocity, rtol=0, atol=0)
    assert _graphs() - graphs <= 2  # the pruner's first call (empty keep-set cache), then one dynamic graph
