"""The one GPU command (``benchmarks/gpu_suite.py``): its dry run runs every part on the CPU, at the real SD3.5-M,
FLUX-dev and Wan-1.3B widths cut to one or two blocks, and passes, so the command cannot rot between GPU sessions (about a minute
on 2 cores); a part that fails, hangs or finds no time left is recorded and the suite goes on; the real-size
configurations are the published models'."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

from tempflow.testing import real_size_config

SUITE_PATH = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"
CUDA_ONLY_TESTS = {"test_flex_kernel_compiled_matches_the_reference", "test_deepspeed_fused_adam_builds_and_steps_as_adamw"}


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _parts(directory: Path) -> dict[str, dict]:
    return {part["name"]: part for part in json.loads((directory / "gpu_suite.json").read_text())["parts"]}


def test_the_dry_run_runs_every_part_on_the_cpu(tmp_path):
    suite = _suite()
    assert suite.main(["--dry-run", "--output", str(tmp_path)]) == 0
    parts = _parts(tmp_path)
    assert list(parts) == [part.name for part in suite.PARTS]
    assert all(part["status"] == "passed" for part in parts.values()), {n: p["output_tail"] for n, p in parts.items()}

    tests = [test for part in parts.values() if part["kind"] == "tests" for test in part["results"]]
    assert {test["test"] for test in tests if test["outcome"] != "passed"} == CUDA_ONLY_TESTS
    assert all(test["outcome"] == "skipped" for test in tests if test["test"] in CUDA_ONLY_TESTS)
    memory = {part["results"]["size"]: part["results"]["memory_table"] for part in parts.values()
              if part["kind"] == "memory"}
    assert set(memory) == {"sd35m", "flux-dev", "wan-1.3b"}
    assert {size: len(rows) for size, rows in memory.items()} == {"sd35m": 4, "flux-dev": 4, "wan-1.3b": 1}
    assert all(row["seconds"] > 0 and row["peak_gb"] is None for rows in memory.values() for row in rows)  # no GPU peak
    assert parts["throughput"]["results"]["compile"]["graphs_compiled"] == 1
    assert {row["method"].split(" ")[0] for row in parts["attention"]["results"]["transformer"]} == {
        "dense", "token", "block-sparse"}
    steps = parts["attention-auto"]["results"]
    assert [shape["shape"] for shape in steps["shapes"]] == ["sd35m-64", "wan-1.3b-64x64x5"]
    for shape in steps["shapes"]:  # every method ran (or said why not) and the dense step is the baseline
        assert shape["rows"][0]["method"] == "dense" and shape["rows"][0]["vs_dense"] == 1.0
        assert all("ms" in row or "error" in row for row in shape["rows"]) and shape["auto"]
    report = (tmp_path / "gpu_suite.md").read_text()
    assert "`auto` (≥ 1.15x on the whole step, else dense)" in report
    assert "| flux-dev | 64 | 2, 2 | on | on | n/a |" in report and "eager → compiled" in report
    assert "| wan-1.3b | 64x64, 5 frames | 2, 2 | on | off | n/a |" in report
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_suite.json", "gpu_suite.log", "gpu_suite.md"]


def test_a_part_that_fails_hangs_or_finds_no_time_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    suite = _suite()
    monkeypatch.setattr(suite, "MIN_PART_S", 0)
    write_results = "import json, sys; open(sys.argv[1], 'w').write(json.dumps({'dtype': 'bf16'}))"
    monkeypatch.setattr(suite, "PARTS", [
        suite.Part("fails", "throughput", 30, ["-c", "print('so far, so good'); raise SystemExit(3)"]),
        suite.Part("hangs", "throughput", 1, ["-c", "import time; time.sleep(60)"]),
        suite.Part("writes", "attention", 30, ["-c", write_results, "{result}"]),
    ])
    assert suite.main(["--output", str(tmp_path / "run")]) == 1
    parts = _parts(tmp_path / "run")
    assert parts["fails"]["status"] == "failed" and parts["fails"]["returncode"] == 3
    assert "so far, so good" in parts["fails"]["output_tail"]
    assert parts["hangs"]["status"] == "timed out" and parts["hangs"]["seconds"] < 10
    assert parts["writes"]["status"] == "passed" and parts["writes"]["results"] == {"dtype": "bf16"}
    assert "| hangs | timed out |" in (tmp_path / "run" / "gpu_suite.md").read_text()

    assert suite.main(["--output", str(tmp_path / "late"), "--time-budget", "0"]) == 1
    assert {part["status"] for part in _parts(tmp_path / "late").values()} == {"not run: out of time"}


@pytest.mark.parametrize(("size", "model_class", "billions"), [
    ("sd35m", SD3Transformer2DModel, 2.24), ("flux-dev", FluxTransformer2DModel, 11.90),
    ("wan-1.3b", WanTransformer3DModel, 1.42), ("wan-14b", WanTransformer3DModel, 14.29),
    ("qwen-image", QwenImageTransformer2DModel, 20.43),
])
def test_the_real_size_configs_have_the_published_parameter_counts(size, model_class, billions):
    with torch.device("meta"):  # shapes only
        model = model_class(**real_size_config(size))
    # SD3.5-M and FLUX-dev: DESIGN §6; Wan 2.1 1.3B / 14B and Qwen-Image (20B): what their hub configs build
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.005)
