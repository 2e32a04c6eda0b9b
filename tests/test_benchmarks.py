"""The benchmark scripts run end to end on tiny configurations (what they measure is not asserted here)."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_runs_on_tiny_config(tmp_path):
    output = tmp_path / "throughput.json"
    results = _load("throughput").main(["--size", "tiny", "--device", "cpu", "--steps", "3", "--children", "2",
                                        "--seeds", "1", "--repeats", "1", "--floor-batch-sizes", "1", "2",
                                        "--train-batch-size", "2", "--lora-rank", "2", "--output", str(output)])
    assert results["evals_per_seed"] == 3 + 2 * 3 * 2 // 2
    assert json.loads(output.read_text())["speedup_vs_reference"] > 0
    assert set(results["training"]) == {"checkpointing_False", "checkpointing_True"}
