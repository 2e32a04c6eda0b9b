"""`attention_backend: auto` for block-sparse attention and token pruning: used only where a measured whole-step
speed-up reaches MIN_SPEEDUP, decided once per shape and cached on disk; dense on the CPU."""

import json

import pytest

from tempflow.attention.auto import MIN_SPEEDUP, decide
from tempflow.config import TempFlowGRPOConfig
from tempflow.trainer import TempFlowGRPOTrainer


def test_a_method_is_used_only_at_the_measured_speedup_and_the_measurement_is_cached(tmp_path):
    path = tmp_path / "auto.json"
    calls = []

    def measure(dense=0.100, method=0.080):  # 1.25x
        calls.append(1)
        return dense, method

    first = decide("H200 | flux | 16 | 4096", "block-sparse 0.125", measure, path)
    assert first.use and first.ratio == pytest.approx(1.25) and not first.cached
    again = decide("H200 | flux | 16 | 4096", "block-sparse 0.125", measure, path)
    assert again.use and again.cached and len(calls) == 1  # read back, not measured again
    assert "1.25x the dense step" in again.line() and "-> on" in again.line()

    slow = decide("H200 | sd3 | 48 | 1024", "block-sparse 0.125", lambda: (0.100, 0.095), path)  # 1.05x
    assert not slow.use and "off (dense attention)" in slow.line() and f"below the {MIN_SPEEDUP}x" in slow.reason
    assert set(json.loads(path.read_text())) == {"H200 | flux | 16 | 4096", "H200 | sd3 | 48 | 1024"}


def test_a_damaged_cache_is_measured_again(tmp_path):
    path = tmp_path / "auto.json"
    path.write_text('{"k": {"dense_ms": "x"}}')
    decision = decide("k", "token pruning", lambda: (0.2, 0.1), path)
    assert decision.use and not decision.cached
    path.write_text("not json")
    assert decide("k", "token pruning", lambda: (0.2, 0.1), path).ratio == pytest.approx(2.0)


@pytest.mark.parametrize("backend, installed", [("auto", False), ("sdpa", True)])
def test_on_the_cpu_auto_keeps_attention_dense_and_an_explicit_kernel_runs_the_recipes_method(
        tiny_sd3_dir, tmp_path, capsys, backend, installed):
    from tempflow.attention.pruning import TokenPruner

    config = TempFlowGRPOConfig(
        output_dir=str(tmp_path), model_name_or_path=tiny_sd3_dir, resolution=64, num_inference_steps=3,
        num_generations=2, prompts_per_iteration=1, max_steps=1, lora_r=4, lora_alpha=8, train_prompts="unused",
        eval_prompts=None, disable_progress_bar=True, max_sequence_length=16, reward_funcs=["brightness"],
        token_pruning_layers=[0], token_pruning_keep_ratio=0.5, attention_backend=backend,
    )
    trainer = TempFlowGRPOTrainer(config, train_prompts=[{"prompt": "a red square"}])
    assert isinstance(trainer.policy.transformer.__dict__.get("forward"), TokenPruner) is installed
    if backend == "auto":
        assert not trainer.attention_decision.use
        assert "attention_backend auto: token pruning keep 0.5 after blocks [0] -> off" in capsys.readouterr().out
    else:
        assert trainer.attention_decision is None
