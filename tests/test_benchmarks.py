"""The benchmark scripts run end to end on tiny configurations (what they measure is not asserted here)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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
                                        "--train-batch-size", "2", "--lora-rank", "2", "--output", str(output),
                                        "--compile", "--compile-backend", "eager"])  # dynamo only: seconds
    assert results["evals_per_seed"] == 3 + 2 * 3 * 2 // 2
    assert json.loads(output.read_text())["speedup_vs_reference"] > 0
    assert set(results["training"]) == {"checkpointing_False", "checkpointing_True"}
    compiled = results["compile"]
    assert set(compiled["speedup_by_batch"]) == {1, 2} and compiled["rollout_speedup"] > 0
    assert compiled["graphs_compiled"] == 1  # the dynamic batch: one graph for the sweep and the rollout


@pytest.mark.filterwarnings("error::tempflow.config.UnbranchedStepsWarning")  # un-branched runs get their accumulation
def test_shapes_compare_spends_equal_budgets_on_one_panel_and_writes_intervals(tmp_path):
    module = _load("shapes_compare")
    common = ["--budget", "150", "--eval-every", "150", "--seeds", "0", "--panel-seeds", "2", "--panel-prompts", "3",
              "--prompts-per-iteration", "2", "--bootstrap-draws", "50", "--output-dir", str(tmp_path)]
    module.main([*common, "--methods", "tempflow_grpo", "flow_grpo", "diffusion_nft"])
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("tempflow_grpo", "flow_grpo", "diffusion_nft"):
        points = results["runs"][method]["0"]
        assert points[0]["model_evals"] == 0 and points[-1]["model_evals"] >= 150
        assert len(points[-1]["panel/shapes_strict"]) == 3 * 2 and 0.0 <= points[-1]["eval/shapes_strict"] <= 1.0
    # the untrained model is scored once per guidance scale, and every method starts from that same panel
    assert results["runs"]["flow_grpo"]["0"][0] == results["runs"]["diffusion_nft"]["0"][0]
    assert set(results["starts"]) == {"4.5"}
    assert {row["budget"] for row in results["summary"]} == {0, 150}
    assert set(results["comparison"]) == {"tempflow_grpo", "flow_grpo", "diffusion_nft"}
    reference = results["comparison"]["flow_grpo"]["evals_to_target_ratio"]
    assert reference["low"] <= reference["estimate"] <= reference["high"]
    assert [d["component"] for d in results["differences"]] == ["TempFlow-GRPO vs Flow-GRPO",
                                                                "DiffusionNFT vs TempFlow-GRPO"]
    table = (tmp_path / "table.md").read_text()
    assert "panel SE" in table and "resolv" in table and (tmp_path / "accuracy.png").stat().st_size > 0

    # --resume keeps the finished runs (not rerun: their points stay identical) and adds the new method
    module.main([*common, "--methods", "diffusion_nft_cfg_free", "--resume"])
    resumed = json.loads((tmp_path / "results.json").read_text())
    assert set(resumed["runs"]) == {"tempflow_grpo", "flow_grpo", "diffusion_nft", "diffusion_nft_cfg_free"}
    assert resumed["runs"]["flow_grpo"] == results["runs"]["flow_grpo"]
    assert set(resumed["starts"]) == {"4.5", "1.0"}
    with pytest.raises(SystemExit, match="panel_seeds=2"):
        module.main([*common, "--panel-seeds", "3", "--resume"])  # the last value given wins


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_shapes_compare_merges_parallel_processes_and_reports_cpu_seconds(tmp_path, restore_torch_threads):
    module = _load("shapes_compare")
    common = ["--budget", "100", "--eval-every", "100", "--seeds", "0", "--panel-seeds", "2", "--panel-prompts", "2",
              "--prompts-per-iteration", "1", "--bootstrap-draws", "20", "--threads", "1", "--clock", "cpu"]
    module.main([*common, "--methods", "flow_grpo", "--output-dir", str(tmp_path / "a")])
    module.main([*common, "--methods", "tempflow_grpo", "--output-dir", str(tmp_path / "b")])
    part_a = json.loads((tmp_path / "a" / "results.json").read_text())
    final = part_a["runs"]["flow_grpo"]["0"][-1]
    assert final["cpu_seconds"] > 0 and final["seconds"] > 0
    merged = module.main([*common, "--methods", "flow_grpo", "--output-dir", str(tmp_path / "ab"),
                          "--merge", str(tmp_path / "a"), str(tmp_path / "b")])
    assert set(merged["runs"]) == {"flow_grpo", "tempflow_grpo"}
    assert merged["runs"]["flow_grpo"][0] == part_a["runs"]["flow_grpo"]["0"]  # taken, not trained again
    assert not (tmp_path / "ab" / "flow_grpo-seed0").exists()
    assert "train seconds (cpu)" in (tmp_path / "ab" / "table.md").read_text()
    assert [d["component"] for d in merged["differences"]] == ["TempFlow-GRPO vs Flow-GRPO"]
    with pytest.raises(SystemExit, match="budget=100"):
        module.main([*common[:1], "200", *common[2:], "--output-dir", str(tmp_path / "c"),
                     "--merge", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="does not exist"):
        module.main([*common, "--output-dir", str(tmp_path / "d"), "--merge", str(tmp_path / "missing")])


def test_shapes_compare_picks_each_methods_rate_on_the_validation_panel(tmp_path):
    module = _load("shapes_compare")
    summary = module.main(["--budget", "100", "--eval-every", "100", "--seeds", "0", "--methods", "tempflow_grpo",
                           "--panel-seeds", "2", "--validation-seeds", "2", "--panel-prompts", "2",
                           "--prompts-per-iteration", "1", "--learning-rates", "1e-3", "1e-5", "--sweep-budget", "100",
                           "--output-dir", str(tmp_path)])
    scores = summary["sweep"]["tempflow_grpo"]
    assert set(scores) == {"0.001", "1e-05"}
    assert summary["learning_rates"]["tempflow_grpo"] == float(max(scores, key=scores.get))
    assert set(summary["validation_starts"]) == {"4.5"}  # the untrained model scored once, not once per rate
    assert (tmp_path / "sweep-tempflow_grpo-1e-05").is_dir()


def test_evaluations_to_reach_interpolates_between_marks_and_says_never():
    module = _load("shapes_compare")
    points = [{"model_evals": e, "eval/shapes_strict": a} for e, a in ((0, 0.3), (100, 0.35), (200, 0.55))]
    assert module.evaluations_to_reach(points, 0.45) == 150.0
    assert module.evaluations_to_reach(points, 0.3) == 0.0  # already there at the start
    assert module.evaluations_to_reach(points, 0.6) is None


def test_attention_benchmark_runs_and_full_density_matches_dense(tmp_path):
    output = tmp_path / "attention.json"
    results = _load("attention").main(["--device", "cpu", "--repeats", "1", "--densities", "1.0", "0.25",
                                       "--kernel", "torch", "--shapes-limit", "4", "--shapes-steps", "3",
                                       "--output", str(output)])
    kernels = {(row["shape"], row["method"]): row for row in results["kernels"]}
    for shape in ("image-256", "video-256"):
        assert kernels[(shape, "block-sparse 1")]["rel_error"] < 1e-5  # every tile kept: dense attention
        assert kernels[(shape, "block-sparse 0.25")]["rel_error"] > 1e-3
    assert {row["method"].split(" ")[0] for row in results["transformer"]} == {"dense", "token", "block-sparse"}
    shapes = results["shapes"]
    assert shapes[0]["method"] == "dense" and shapes[0]["latent_rel_error"] == 0.0
    assert all(0.0 <= row["strict_accuracy"] <= 1.0 for row in shapes) and len(shapes) == 6
    assert json.loads(output.read_text())["device"] == "cpu"
