"""TempFlow-GRPO vs Flow-GRPO (and single-component ablations) on ShapesWorld at equal compute.

Every method starts from the same shipped pipeline with the same seeds and trains until it has spent the same
budget of transformer evaluations (one latent through the transformer counts once, CFG included). Held-out
strict accuracy (GenEval-style) and mean partial reward are measured at evaluation marks along the way, and
the results are written as JSON, a Markdown table and a PNG plot (versus evaluations and versus wall-clock).

    python benchmarks/shapes_compare.py --budget 34000 --eval-every 8500 --seeds 0 1 2 --output-dir outputs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from tempflow import TempFlowGRPOConfig, TempFlowGRPOTrainer
from tempflow.config import UnbranchedStepsWarning

RECIPE = Path(__file__).parents[1] / "recipes" / "shapes.yaml"
METHODS = {
    "tempflow_grpo": {},
    "flow_grpo": {"algorithm": "flow_grpo"},
    "tempflow_no_branching": {"branching": False},
    "tempflow_no_weighting": {"noise_aware_weighting": False},
    # advantages over all children of a prompt at a step (two seeds per prompt) instead of one seed's siblings
    "tempflow_prompt_groups": {"advantage_group": "prompt", "seeds_per_prompt": 2},
}
REFERENCE = "flow_grpo"  # evaluations-to-reach is measured against this method's final accuracy
ACCURACY, REWARD = "eval/shapes_strict", "eval/shapes"


def run(method: str, seed: int, budget: int, eval_every: int, base: dict, output_dir: Path) -> list[dict]:
    """Train one method with one seed until ``budget`` evaluations; returns the evaluation points."""
    values = {**base, **METHODS[method], "seed": seed, "max_steps": 10**9, "save_steps": 10**9,
              "output_dir": str(output_dir / f"{method}-seed{seed}"), "overwrite_output_dir": True,  # runs start afresh
              "disable_progress_bar": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnbranchedStepsWarning)  # the recipe's schedule, replaced just below
        config = TempFlowGRPOConfig(**values)
    if not config.branched:
        # Flow-GRPO's own scripts accumulate gradients over every trained timestep of a sample batch (accelerate's
        # gradient_accumulation_steps = samples x num_train_timesteps): one optimizer step per iteration's rows.
        # The no-branching ablation trains the same full trajectories, so it steps the same way; with the
        # branched recipe's one step per micro-batch it took 9x the optimizer steps and collapsed (BENCHMARKS.md).
        config = dataclasses.replace(config, gradient_accumulation_steps=config.trained_timesteps)
    trainer = TempFlowGRPOTrainer(config)
    points = [{"model_evals": 0, "seconds": 0.0, **trainer.evaluate("start")}]
    used, seconds, next_mark = 0, 0.0, eval_every
    with tqdm(total=budget, desc=f"{method} seed {seed}", unit="eval") as bar:
        while used < budget:
            start = time.perf_counter()
            metrics = trainer.training_step()
            trainer.iteration += 1
            seconds += time.perf_counter() - start
            used += metrics["rollout/model_evals"]
            bar.update(metrics["rollout/model_evals"])
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            if used >= next_mark or used >= budget:
                points.append({"model_evals": used, "seconds": seconds, **trainer.evaluate(f"evals-{used}")})
                next_mark += eval_every
    return points


def summarise(results: dict, budget: int, eval_every: int) -> list[dict]:
    """Per method: accuracy and reward at each budget mark (the first evaluation at or past it), over seeds."""
    rows = []
    marks = list(range(eval_every, budget + 1, eval_every)) or [budget]
    for method, runs in results.items():
        for mark in [0, *marks]:
            accuracies, rewards, seconds = [], [], []
            for points in runs.values():
                point = next((p for p in points if p["model_evals"] >= mark), points[-1])
                accuracies.append(point[ACCURACY])
                rewards.append(point[REWARD])
                seconds.append(point["seconds"])
            rows.append({"method": method, "budget": mark, "accuracy_mean": float(np.mean(accuracies)),
                         "accuracy_std": float(np.std(accuracies)), "reward_mean": float(np.mean(rewards)),
                         "seconds_mean": float(np.mean(seconds)), "seeds": len(accuracies)})
    return rows


def evaluations_to_reach(points: list[dict], target: float) -> float | None:
    """Transformer evaluations at which a run's accuracy first reaches ``target``, interpolated linearly between
    evaluation points; ``None`` when it never does."""
    for before, after in zip(points, points[1:]):
        if after[ACCURACY] >= target > before[ACCURACY]:
            share = (target - before[ACCURACY]) / (after[ACCURACY] - before[ACCURACY])
            return before["model_evals"] + share * (after["model_evals"] - before["model_evals"])
    return 0.0 if points and points[0][ACCURACY] >= target else None


def reference_accuracy(results: dict) -> float:
    """The reference method's final accuracy, mean over its seeds."""
    return float(np.mean([points[-1][ACCURACY] for points in results[REFERENCE].values()]))


def reach_table(results: dict) -> tuple[float, list[dict]]:
    """Per method: the evaluations its runs need to reach the reference method's final mean accuracy (mean ± std
    over the seeds that reach it, and how many do)."""
    target = reference_accuracy(results)
    rows = []
    for method, runs in results.items():
        reached = [e for e in (evaluations_to_reach(points, target) for points in runs.values()) if e is not None]
        rows.append({"method": method, "target": target, "reached": len(reached), "seeds": len(runs),
                     "evals_mean": float(np.mean(reached)) if reached else None,
                     "evals_std": float(np.std(reached)) if reached else None})
    return target, rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | evaluations | strict accuracy (mean ± std) | partial reward | train seconds |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['reward_mean']:.3f} | {r['seconds_mean']:.0f} |")
    return "\n".join(lines)


def markdown_reach_table(target: float, rows: list[dict]) -> str:
    lines = [f"Evaluations to reach {REFERENCE}'s final accuracy ({target:.3f}):", "",
             "| method | evaluations (mean ± std over the seeds that reach it) | seeds reaching it |", "|---|---|---|"]
    for r in rows:
        evals = "never" if r["evals_mean"] is None else f"{r['evals_mean']:.0f} ± {r['evals_std']:.0f}"
        lines.append(f"| {r['method']} | {evals} | {r['reached']} of {r['seeds']} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for method, runs in results.items():
        for ax, x_key in zip(axes, ("model_evals", "seconds")):
            curves = [([p[x_key] for p in points], [p[ACCURACY] for p in points]) for points in runs.values()]
            length = min(len(c[0]) for c in curves)
            x = np.mean([c[0][:length] for c in curves], axis=0)
            y = np.array([c[1][:length] for c in curves])
            ax.plot(x, y.mean(0), marker="o", label=method)
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    if REFERENCE in results:
        axes[0].axhline(reference_accuracy(results), color="gray", linestyle="--", linewidth=1, label=f"{REFERENCE} final")
    axes[0].set_xlabel("transformer evaluations")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("held-out strict accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("ShapesWorld: TempFlow-GRPO vs Flow-GRPO at equal compute (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def previous_runs(results_path: Path, args) -> dict:
    """The runs of an earlier invocation with the same budget and evaluation marks (JSON keys are strings: seeds
    become ints again); methods and seeds not asked for now are kept too, so the table and plot show them."""
    if not results_path.exists():
        return {}
    previous = json.loads(results_path.read_text())
    for key in ("budget", "eval_every"):
        if previous["args"][key] != getattr(args, key):
            raise SystemExit(f"--resume: {results_path} has {key}={previous['args'][key]}, "
                             f"this run asks for {getattr(args, key)}; use another --output-dir")
    return {method: {int(seed): points for seed, points in runs.items()} for method, runs in previous["runs"].items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=40000, help="transformer evaluations per run")
    parser.add_argument("--eval-every", type=int, default=10000, help="evaluate every this many evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--num-eval-prompts", type=int, default=None, help="held-out prompts (default all)")
    parser.add_argument("--prompts-per-iteration", type=int, default=None, help="override the recipe's")
    parser.add_argument("--output-dir", default="outputs/shapes_compare")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in OUTPUT_DIR/results.json (same budget and marks) and run the rest")
    args = parser.parse_args(argv)

    base = yaml.safe_load(RECIPE.read_text())
    base.update(eval_prompts="shapes:eval", num_eval_prompts=args.num_eval_prompts, eval_steps=None)
    if args.prompts_per_iteration:
        base["prompts_per_iteration"] = args.prompts_per_iteration
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    results = previous_runs(results_path, args) if args.resume else {}
    for method in args.methods:
        for seed in args.seeds:
            if seed in results.get(method, {}):
                continue
            results.setdefault(method, {})[seed] = run(method, seed, args.budget, args.eval_every, base, output_dir)
            # written after every run, so an interrupted benchmark keeps what it measured
            results_path.write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    rows = summarise(results, args.budget, args.eval_every)
    summary = {"args": vars(args), "runs": results, "summary": rows}
    table = markdown_table(rows)
    if REFERENCE in results:
        target, reach = reach_table(results)
        summary["evaluations_to_reach"] = reach
        table += "\n\n" + markdown_reach_table(target, reach)
    results_path.write_text(json.dumps(summary, indent=2))
    (output_dir / "table.md").write_text(table + "\n")
    plot(results, output_dir / "accuracy.png")
    print(table)


if __name__ == "__main__":
    main()
