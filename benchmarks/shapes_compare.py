"""Sample efficiency on ShapesWorld: Flow-GRPO, TempFlow-GRPO and its ablations, and DiffusionNFT (with and
without CFG), at equal compute, with a ranking that stands outside its own noise.

Every method starts from the shipped pipeline and trains until it has spent the same budget of transformer
evaluations (one latent through the transformer counts once, CFG included; DiffusionNFT's and GRPO's training
forwards are not counted, the wall-clock column holds them). Evaluation is *paired*: every run of every method is
scored on one fixed panel, each distinct held-out prompt of the trained tasks × ``--panel-seeds`` noise seeds
(:mod:`tempflow.paired_evaluation`), so the panel's standard error is stated and shared noise cancels from
differences. With ``--learning-rates``, each method's rate is first picked by a short run per rate scored on a
*validation* panel (the trained tasks' training prompts, other noise seeds: never the test panel). Evaluations- and
wall-clock-to-target (Flow-GRPO's final accuracy) and every component's difference come with 95 % intervals from a
hierarchical bootstrap over training seeds and panel noise seeds. Written as JSON, Markdown and a PNG plot.

    python benchmarks/shapes_compare.py --budget 34000 --eval-every 8500 --seeds 0 1 2 --output-dir outputs/bench

Each run records two clocks: wall-clock seconds and the process's CPU seconds. On a shared machine, give each
benchmark process one thread (``--threads 1``) and compare with ``--clock cpu``: one thread's CPU seconds are the
wall-clock of that run alone on one core, and other work on the machine does not inflate them. Methods can then run
as parallel processes into separate output directories, joined by a last call with ``--merge``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from tempflow import TempFlowGRPOConfig, TempFlowGRPOTrainer
from tempflow.config import UnbranchedStepsWarning
from tempflow.evaluation import sample_images, score_images
from tempflow.paired_evaluation import (
    Panel,
    Run,
    bootstrap_comparison,
    bootstrap_final_difference,
    first_crossing,
    mean_and_standard_error,
)
from tempflow.prompts import load_prompts, select_tasks

RECIPES = Path(__file__).parents[1] / "recipes"
GRPO_RECIPE, NFT_RECIPE = RECIPES / "shapes.yaml", RECIPES / "shapes_nft.yaml"
METHODS = {  # name -> (recipe, overrides)
    "tempflow_grpo": (GRPO_RECIPE, {}),
    "flow_grpo": (GRPO_RECIPE, {"algorithm": "flow_grpo"}),
    "tempflow_no_branching": (GRPO_RECIPE, {"branching": False}),
    "tempflow_no_weighting": (GRPO_RECIPE, {"noise_aware_weighting": False}),
    # advantages over all children of a prompt at a step (two seeds per prompt) instead of one seed's siblings
    "tempflow_prompt_groups": (GRPO_RECIPE, {"advantage_group": "prompt", "seeds_per_prompt": 2}),
    "diffusion_nft": (NFT_RECIPE, {}),
    "diffusion_nft_cfg_free": (NFT_RECIPE, {"guidance_scale": 1.0}),
}
COMPONENTS = [  # (what the difference measures, method, the method without it)
    ("TempFlow-GRPO vs Flow-GRPO", "tempflow_grpo", "flow_grpo"),
    ("branching", "tempflow_grpo", "tempflow_no_branching"),
    ("noise-aware weighting", "tempflow_grpo", "tempflow_no_weighting"),
    ("seed groups (vs prompt groups)", "tempflow_grpo", "tempflow_prompt_groups"),
    ("DiffusionNFT vs TempFlow-GRPO", "diffusion_nft", "tempflow_grpo"),
    ("CFG in DiffusionNFT (vs CFG-free)", "diffusion_nft", "diffusion_nft_cfg_free"),
]
REFERENCE = "flow_grpo"  # evaluations-to-reach is measured against this method's final accuracy
ACCURACY, REWARD, PANEL = "eval/shapes_strict", "eval/shapes", "panel/shapes_strict"
TEST_STREAM, VALIDATION_STREAM = 0, 1
SWEEP_SEED = 100  # the learning-rate sweep's training seed: none of the benchmark's


def method_config(method: str, seed: int, output_dir: Path, prompts_per_iteration: int | None,
                  learning_rate: float | None) -> TempFlowGRPOConfig:
    recipe, overrides = METHODS[method]
    values = {**yaml.safe_load(recipe.read_text()), **overrides, "seed": seed, "max_steps": 10**9,
              "save_steps": 10**9, "eval_steps": None, "eval_prompts": None, "output_dir": str(output_dir),
              "overwrite_output_dir": True, "disable_progress_bar": True}  # runs start afresh
    if prompts_per_iteration:
        values["prompts_per_iteration"] = prompts_per_iteration
    if learning_rate:
        values["learning_rate"] = learning_rate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnbranchedStepsWarning)  # the recipe's schedule, replaced just below
        config = TempFlowGRPOConfig(**values)
    if not config.branched:
        # Flow-GRPO's and DiffusionNFT's scripts accumulate gradients over every trained timestep of an iteration's
        # samples: one optimizer step per iteration. The no-branching ablation trains the same full trajectories,
        # so it steps the same way; with the branched recipe's one step per micro-batch it took 9x the optimizer
        # steps and collapsed (BENCHMARKS.md).
        micro_batches = -(-config.rows_per_iteration // config.per_device_train_batch_size)
        config = dataclasses.replace(config, gradient_accumulation_steps=micro_batches)
    return config


@torch.no_grad()
def evaluate_panel(trainer: TempFlowGRPOTrainer, panel: Panel) -> dict:
    """Panel accuracy (with its standard error over noise seeds), partial reward, and every sample's strictness."""
    trainer.policy.transformer.eval()
    with trainer._ema_weights(), trainer.accelerator.autocast():
        images = sample_images(trainer.policy, trainer.engine, panel.records, panel.seeds,
                               trainer.config.eval_num_inference_steps, progress=True)
    _, components = score_images(trainer.reward, images, panel.records)
    strict = components["shapes_strict"].tolist()
    accuracy, standard_error = mean_and_standard_error(panel.matrix(strict))
    return {ACCURACY: accuracy, f"{ACCURACY}_se": standard_error,
            REWARD: float(components["shapes"].mean()), PANEL: strict}


def run(config: TempFlowGRPOConfig, budget: int, eval_every: int, panel: Panel, label: str,
        start: dict | None = None) -> list[dict]:
    """Train until ``budget`` evaluations, scoring ``panel`` at the start (``start`` when given: the untrained
    model's panel, the same for every method sampling with its guidance) and every ``eval_every``. Each point holds
    the training time so far on both clocks (evaluation excluded)."""
    trainer = TempFlowGRPOTrainer(config)
    points = [{"model_evals": 0, "seconds": 0.0, "cpu_seconds": 0.0, **(start or evaluate_panel(trainer, panel))}]
    used, seconds, cpu_seconds, next_mark = 0, 0.0, 0.0, eval_every
    with tqdm(total=budget, desc=label, unit="eval") as bar:
        while used < budget:
            begin, begin_cpu = time.perf_counter(), time.process_time()
            metrics = trainer.training_step()
            trainer.iteration += 1
            seconds += time.perf_counter() - begin
            cpu_seconds += time.process_time() - begin_cpu
            used += metrics["rollout/model_evals"]
            bar.update(metrics["rollout/model_evals"])
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            if used >= next_mark or used >= budget:
                points.append({"model_evals": used, "seconds": seconds, "cpu_seconds": cpu_seconds,
                               **evaluate_panel(trainer, panel)})
                next_mark += eval_every
    return points


CLOCKS = {"wall": "seconds", "cpu": "cpu_seconds"}  # --clock -> the points' key


def as_runs(results: dict, panel_shape: tuple[int, int], clock: str) -> dict[str, list[Run]]:
    prompts, seeds = panel_shape
    return {method: [Run([p["model_evals"] for p in points], [p[clock] for p in points],
                         [np.asarray(p[PANEL], dtype=np.float64).reshape(seeds, prompts).T for p in points])
                     for points in runs.values()] for method, runs in results.items()}


def summarise(results: dict, budget: int, eval_every: int, clock: str) -> list[dict]:
    """Per method: accuracy and reward at each budget mark (the first evaluation at or past it), over seeds."""
    rows = []
    marks = list(range(eval_every, budget + 1, eval_every)) or [budget]
    for method, runs in results.items():
        for mark in [0, *marks]:
            chosen = [next((p for p in points if p["model_evals"] >= mark), points[-1]) for points in runs.values()]
            accuracies = [p[ACCURACY] for p in chosen]
            rows.append({"method": method, "budget": mark, "accuracy_mean": float(np.mean(accuracies)),
                         "accuracy_std": float(np.std(accuracies)),
                         "panel_se": float(np.mean([p[f"{ACCURACY}_se"] for p in chosen])),
                         "reward_mean": float(np.mean([p[REWARD] for p in chosen])),
                         "seconds_mean": float(np.mean([p[clock] for p in chosen])), "seeds": len(chosen)})
    return rows


def evaluations_to_reach(points: list[dict], target: float) -> float | None:
    """Transformer evaluations at which a run's accuracy first reaches ``target``, interpolated linearly between
    evaluation points; ``None`` when it never does."""
    return first_crossing([p["model_evals"] for p in points], [p[ACCURACY] for p in points], target)


def markdown_table(rows: list[dict], clock: str) -> str:
    lines = ["| method | evaluations | strict accuracy (mean ± std over seeds) | panel SE | partial reward | "
             f"train seconds ({clock}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['panel_se']:.3f} | {r['reward_mean']:.3f} | {r['seconds_mean']:.0f} |")
    return "\n".join(lines)


def _ratio(entry: dict) -> str:
    def fmt(x):
        return "never" if not np.isfinite(x) else f"{x:.2f}"
    return f"{fmt(entry['estimate'])} [{fmt(entry['low'])}, {fmt(entry['high'])}]"


def markdown_comparison(comparison: dict, differences: list[dict], clock: str) -> str:
    target = next(iter(comparison.values()))["target"]["estimate"]
    lines = [f"Cost to reach {REFERENCE}'s final accuracy ({target:.3f}), as a fraction of {REFERENCE}'s budget "
             "(95 % bootstrap interval over training seeds and panel noise seeds):", "",
             f"| method | final accuracy | evaluations to target | {clock} seconds to target |", "|---|---|---|---|"]
    for method, entry in comparison.items():
        final = entry["final_accuracy"]
        costs = ("1 (the target is its final mean; seeds below the mean never reach it)",) * 2 if method == REFERENCE \
            else (_ratio(entry["evals_to_target_ratio"]), _ratio(entry["seconds_to_target_ratio"]))
        lines.append(f"| {method} | {final['estimate']:.3f} [{final['low']:.3f}, {final['high']:.3f}] | "
                     f"{costs[0]} | {costs[1]} |")
    lines += ["", "Final-accuracy differences (95 % interval):", "", "| component | difference | verdict |",
              "|---|---|---|"]
    for d in differences:
        verdict = "resolved" if d["resolved"] else "no resolvable difference at this budget"
        lines.append(f"| {d['component']} ({d['method']} − {d['without']}) | {d['estimate']:+.3f} "
                     f"[{d['low']:+.3f}, {d['high']:+.3f}] | {verdict} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for method, runs in results.items():
        for ax, x_key in zip(axes, ("model_evals", CLOCKS[clock])):
            curves = [([p[x_key] for p in points], [p[ACCURACY] for p in points]) for points in runs.values()]
            length = min(len(c[0]) for c in curves)
            x = np.mean([c[0][:length] for c in curves], axis=0)
            y = np.array([c[1][:length] for c in curves])
            ax.plot(x, y.mean(0), marker="o", label=method)
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    if REFERENCE in results:
        final = float(np.mean([points[-1][ACCURACY] for points in results[REFERENCE].values()]))
        axes[0].axhline(final, color="gray", linestyle="--", linewidth=1, label=f"{REFERENCE} final")
    axes[0].set_xlabel("transformer evaluations")
    axes[1].set_xlabel("training wall-clock (s)" if clock == "wall" else "training CPU seconds (one thread)")
    for ax in axes:
        ax.set_ylabel("held-out strict accuracy (panel)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ShapesWorld at equal compute (mean ± std over training seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def previous_runs(results_path: Path, args, flag: str = "--resume") -> dict:
    """The state of an earlier invocation with the same budget, marks and panel (JSON keys are strings: seeds
    become ints again); methods and seeds not asked for now are kept too, so the tables and plot show them."""
    if not results_path.exists():
        if flag == "--merge":
            raise SystemExit(f"--merge: {results_path} does not exist")
        return {}
    previous = json.loads(results_path.read_text())
    for key in ("budget", "eval_every", "panel_seeds", "panel_prompts", "validation_seeds", "sweep_budget"):
        if previous["args"].get(key) != getattr(args, key):
            raise SystemExit(f"{flag}: {results_path} has {key}={previous['args'].get(key)}, "
                             f"this run asks for {getattr(args, key)}; use another --output-dir")
    previous["runs"] = {m: {int(s): points for s, points in runs.items()} for m, runs in previous["runs"].items()}
    return previous


def merge(state: dict, other: dict) -> None:
    """Add ``other``'s runs, sweep scores, chosen rates and start panels to ``state`` (what ``state`` has wins)."""
    for method, runs in other.get("runs", {}).items():
        mine = state.setdefault("runs", {}).setdefault(method, {})
        mine.update({seed: points for seed, points in runs.items() if seed not in mine})
    for method, scores in other.get("sweep", {}).items():
        mine = state.setdefault("sweep", {}).setdefault(method, {})
        mine.update({rate: score for rate, score in scores.items() if rate not in mine})
    for key in ("learning_rates", "starts", "validation_starts"):
        state[key] = {**other.get(key, {}), **state.get(key, {})}


def panels(args) -> tuple[Panel, Panel]:
    """The test panel (held-out prompts of the trained tasks) and the validation panel (their training prompts)."""
    tasks = yaml.safe_load(GRPO_RECIPE.read_text())["prompt_tasks"]
    held_out = select_tasks(load_prompts("shapes:eval"), tasks, "shapes:eval")
    trained = select_tasks(load_prompts("shapes:train"), tasks, "shapes:train")
    test = Panel.of(held_out, args.panel_seeds, TEST_STREAM)
    validation = Panel.of(trained, args.validation_seeds, VALIDATION_STREAM)
    if args.panel_prompts:
        test = dataclasses.replace(test, prompts=test.prompts[: args.panel_prompts])
        validation = dataclasses.replace(validation, prompts=validation.prompts[: args.panel_prompts])
    return test, validation


def start_of(points: list[dict]) -> dict:
    """A run's untrained panel scores, to reuse for every run that samples with the same guidance."""
    return {k: v for k, v in points[0].items() if k not in ("model_evals", *CLOCKS.values())}


def pick_learning_rate(method: str, args, validation: Panel, output_dir: Path, sweep: dict, starts: dict,
                       save: Callable[[], None]) -> float | None:
    """The rate of ``--learning-rates`` whose short run scores best on the validation panel (None: the recipe's);
    ``starts`` holds the validation panel's untrained scores per guidance; ``save()`` after each sweep run."""
    if not args.learning_rates:
        return None
    scores = sweep.setdefault(method, {})
    for rate in args.learning_rates:
        if str(rate) not in scores:
            config = method_config(method, SWEEP_SEED, output_dir / f"sweep-{method}-{rate:g}",
                                   args.prompts_per_iteration, rate)
            guidance = str(config.guidance_scale)
            points = run(config, args.sweep_budget, args.sweep_budget, validation, f"{method} lr {rate:g}",
                         starts.get(guidance))
            starts[guidance] = start_of(points)
            scores[str(rate)] = points[-1][ACCURACY]
            save()
    return float(max(scores, key=scores.get))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=34000, help="transformer evaluations per run")
    parser.add_argument("--eval-every", type=int, default=8500, help="evaluate every this many evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--panel-seeds", type=int, default=32, help="noise seeds per held-out prompt")
    parser.add_argument("--validation-seeds", type=int, default=8, help="noise seeds per validation prompt")
    parser.add_argument("--panel-prompts", type=int, default=None, help="keep the first N prompts (tests)")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=None,
                        help="sweep these per method on the validation panel (default: the recipes' rates)")
    parser.add_argument("--sweep-budget", type=int, default=8500, help="transformer evaluations per sweep run")
    parser.add_argument("--prompts-per-iteration", type=int, default=None, help="override the recipes'")
    parser.add_argument("--bootstrap-draws", type=int, default=2000)
    parser.add_argument("--output-dir", default="outputs/shapes_compare")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in OUTPUT_DIR/results.json (same budget, marks and panel)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                        help="also take the runs and sweeps of these output directories (same budget, marks and "
                             "panels), e.g. of benchmark processes run in parallel")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="the seconds the tables, intervals and plot use: wall-clock, or the process's CPU "
                             "seconds (with --threads 1: one core's wall-clock, unaffected by other work)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    state = previous_runs(results_path, args) if args.resume else {}
    for other in args.merge:
        merge(state, previous_runs(Path(other) / "results.json", args, "--merge"))
    results, sweep = state.get("runs", {}), state.get("sweep", {})
    rates, starts = state.get("learning_rates", {}), state.get("starts", {})
    validation_starts = state.get("validation_starts", {})
    test, validation = panels(args)

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it measured
        results_path.write_text(json.dumps({"args": vars(args), "runs": results, "sweep": sweep,
                                            "learning_rates": rates, "starts": starts,
                                            "validation_starts": validation_starts}))

    for method in args.methods:
        rates[method] = pick_learning_rate(method, args, validation, output_dir, sweep, validation_starts, save)
    for seed in args.seeds:  # seeds outermost: an interrupted benchmark has every method at the same seeds
        for method in args.methods:
            if seed in results.get(method, {}):
                continue
            config = method_config(method, seed, output_dir / f"{method}-seed{seed}", args.prompts_per_iteration,
                                   rates[method])
            guidance = str(config.guidance_scale)  # the untrained model's panel depends on nothing else
            points = run(config, args.budget, args.eval_every, test, f"{method} seed {seed}", starts.get(guidance))
            starts[guidance] = start_of(points)
            results.setdefault(method, {})[seed] = points
            save()
    clock = CLOCKS[args.clock]
    rows = summarise(results, args.budget, args.eval_every, clock)
    summary = {"args": vars(args), "runs": results, "sweep": sweep, "learning_rates": rates, "starts": starts,
               "validation_starts": validation_starts,
               "summary": rows, "panel": {"prompts": len(test.prompts), "seeds": test.num_seeds}}
    table = markdown_table(rows, args.clock)
    if REFERENCE in results:
        runs = as_runs(results, (len(test.prompts), test.num_seeds), clock)
        summary["comparison"] = bootstrap_comparison(runs, REFERENCE, draws=args.bootstrap_draws)
        summary["differences"] = [
            {"component": name, "method": a, "without": b,
             **bootstrap_final_difference(runs[a], runs[b], draws=args.bootstrap_draws)}
            for name, a, b in COMPONENTS if a in runs and b in runs
        ]
        table += "\n\n" + markdown_comparison(summary["comparison"], summary["differences"], args.clock)
    results_path.write_text(json.dumps(summary))
    (output_dir / "table.md").write_text(table + "\n")
    plot(results, output_dir / "accuracy.png", args.clock)
    print(table)
    return summary


if __name__ == "__main__":
    main()
