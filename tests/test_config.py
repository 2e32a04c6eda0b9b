"""Config validation, YAML recipes and CLI overrides (the TrlParser way)."""

import math
import re
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from tempflow.config import TempFlowGRPOConfig, UnbranchedStepsWarning, parse_config

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    config = parse_config(str(recipe), [])
    assert isinstance(config, TempFlowGRPOConfig)
    assert yaml.safe_load(recipe.read_text())["algorithm"] == config.algorithm


def test_cli_overrides_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_generations: 4\nbeta: 0.02\n")
    config = parse_config(str(recipe), ["--beta", "0.5", "--branch_steps", "0", "2"])
    assert (config.num_generations, config.beta, config.branch_steps) == (4, 0.5, [0, 2])


@pytest.mark.parametrize(
    "values, field",
    [
        ({"algorithm": "ppo"}, "algorithm"),
        ({"num_generations": 1}, "num_generations"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"branch_steps": [9]}, "branch_steps"),
        ({"num_branch_steps_per_iteration": 20}, "num_branch_steps_per_iteration"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights"),
        ({"sde_window_size": 2}, "sde_window_size"),
        ({"algorithm": "flow_grpo", "sde_window_size": 3, "sde_window_range": [0, 8]}, "sde_window_range"),
        ({"noise_level": 1.5}, "noise_level"),
        ({"scale_rewards": "std"}, "scale_rewards"),
        ({"ema_offload": True}, "ema_offload"),
    ],
)
def test_impossible_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        TempFlowGRPOConfig(**values)


def test_unknown_keys_are_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*learning_rat"):
        TempFlowGRPOConfig.from_dict({"learning_rat": 1e-4})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_config(str(recipe), [])


def test_algorithm_switches():
    assert TempFlowGRPOConfig().branched and TempFlowGRPOConfig().weighted
    flow = TempFlowGRPOConfig(algorithm="flow_grpo")
    assert not flow.branched and not flow.weighted
    ablation = TempFlowGRPOConfig(branching=False)
    assert not ablation.branched and ablation.weighted


def test_reward_kwargs_from_yaml_and_json(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("reward_funcs: [remote]\nreward_kwargs:\n  remote: {url: 'http://127.0.0.1:9'}\n")
    assert parse_config(str(recipe), []).reward_kwargs == {"remote": {"url": "http://127.0.0.1:9"}}
    config = parse_config(str(recipe), ["--reward_kwargs", '{"remote": {"timeout": 5}}'])
    assert config.reward_kwargs == {"remote": {"timeout": 5}}
    with pytest.raises(ValueError, match="`reward_kwargs`: not valid JSON"):
        parse_config(str(recipe), ["--reward_kwargs", "{oops"])
    with pytest.raises(ValueError, match="not used: \\['pickscore'\\]"):
        TempFlowGRPOConfig(reward_funcs=["shapes"], reward_kwargs={"pickscore": {}})


def test_warmup_and_optimizer_steps_per_iteration():
    # tempflow_grpo: 4 prompts × 1 seed × 9 branch steps × 6 children = 216 rows; 27 micro-batches of 8; 7 steps
    config = TempFlowGRPOConfig(warmup_ratio=0.1, lr_scheduler_type="cosine", max_steps=10)
    assert config.rows_per_iteration == 216 and config.optimizer_steps_per_iteration == 7
    assert config.num_warmup_steps == 7  # ceil(0.1 × 70)
    assert TempFlowGRPOConfig(warmup_steps=3, warmup_ratio=0.5, lr_scheduler_type="linear").num_warmup_steps == 3
    flow = TempFlowGRPOConfig(algorithm="flow_grpo", sde_window_size=2, num_iterations=2)
    assert flow.rows_per_iteration == 4 * 6 * 2 and flow.optimizer_steps_per_iteration == 2 * 2  # 6 micro-batches
    with pytest.raises(ValueError, match="constant_with_warmup"):
        TempFlowGRPOConfig(warmup_steps=5)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        TempFlowGRPOConfig(lr_scheduler_type="cosine_annealing")


def test_unbranched_configs_warn_when_one_rollout_takes_many_optimizer_steps():
    """Full trajectories give ~3x the rows of a branched iteration; at the branched recipe's micro-batching that
    was 9 optimizer steps per rollout, and the no-branching ablation collapsed (BENCHMARKS.md)."""
    shapes = str(Path(__file__).parents[1] / "recipes" / "shapes.yaml")
    with pytest.warns(UnbranchedStepsWarning, match=r"9 optimizer steps per pass .* gradient_accumulation_steps: 9"):
        parse_config(shapes, ["--algorithm", "flow_grpo"])
    with pytest.warns(UnbranchedStepsWarning, match="optimizer steps per pass"):
        parse_config(shapes, ["--branching", "false"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config(shapes, [])  # branched: 3 steps, as the demo trains
        parse_config(shapes, ["--algorithm", "flow_grpo", "--gradient_accumulation_steps", "9"])


def test_every_float_field_refuses_nan_and_inf_by_name():
    """nan passes every comparison, so a bound alone (`learning_rate > 0`) lets it through to the optimizer"""
    hints = typing.get_type_hints(TempFlowGRPOConfig)
    floats = [name for name, hint in hints.items() if hint in (float, float | None)]
    assert {"learning_rate", "guidance_scale", "beta", "epsilon", "reward_timeout"} <= set(floats)
    for name in floats:
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError, match=f"config `{name}`: must be finite"):
                TempFlowGRPOConfig(**{name: bad})
    for name, value in (("reward_weights", [math.nan]), ("old_policy_decay", [0.0, math.inf, 0.5])):
        with pytest.raises(ValueError, match=f"config `{name}`: must be finite"):
            TempFlowGRPOConfig(**{name: value})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"resolution": 1000, "model_name_or_path": "black-forest-labs/FLUX.1-dev"},
         "`resolution`: must be a multiple of 16 (flux: the VAE's 8x downsampling times 2x2 latent patches)"),
        ({"resolution": 60}, "`resolution`: must be a multiple of 8 (sd3: the VAE's 4x downsampling"),
        ({"resolution": 8192}, "`resolution`: must be at most 4096 pixels: one 8192x8192 sample would take"),
        ({"model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "resolution": 480, "width": 100000},
         "`width`: must be at most 4096 pixels: one 480x100000 sample"),
        ({"model_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "resolution": 480, "num_frames": 4097},
         "`num_frames`: must be at most 1025: one video of 4097 frames at 480x480 would take 11.3 GB"),
        ({"max_sequence_length": 4096}, "`max_sequence_length`: must be at most 1024 tokens"),
        ({"eval_num_inference_steps": 10**6}, "`eval_num_inference_steps`: must be at most 1000"),
        ({"seed": -1}, "`seed`: must lie in [0, 4294967295]"),
        ({"seed": 2**32}, "`seed`"),
        ({"guidance_scale": -0.5}, "`guidance_scale`: must be non-negative"),
        ({"adam_beta2": 1.0}, "`adam_beta2`: must lie in [0, 1)"),
        ({"adam_epsilon": 0.0}, "`adam_epsilon`: must be positive"),
        ({"weight_decay": -1e-4}, "`weight_decay`: must be non-negative"),
    ],
)
def test_sizes_seeds_and_optimizer_settings_are_bounded(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TempFlowGRPOConfig(**values)


def test_sizes_at_the_models_multiple_pass():
    TempFlowGRPOConfig(resolution=1024, model_name_or_path="black-forest-labs/FLUX.1-dev")
    TempFlowGRPOConfig(resolution=72)  # ShapesWorld (the default model): 4x VAE, 2x2 patches
    TempFlowGRPOConfig(model_name_or_path="Qwen/Qwen-Image", resolution=928, width=1664)
    TempFlowGRPOConfig(model_name_or_path="/no/such/model", resolution=63)  # the model check names this one
