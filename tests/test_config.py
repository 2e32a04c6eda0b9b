"""Config validation, YAML recipes and CLI overrides (the TrlParser way)."""

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
