"""``tempflow report OUTPUT_DIR``: one self-contained HTML page of a run (its pictures embedded, and also written
as PNGs beside it in ``OUTPUT_DIR/report/``), readable without TensorBoard: the training reward against the held-out
gold reward, within-group diversity, the KL to the reference, the policy ratio and clip fraction, the sample grids,
and the guards that fired. Works on a finished run (``metrics.json``) and on a running or crashed one (its
``metrics.jsonl``)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

REPORT_DIR = "report"


def load_run(output_dir: Path) -> dict:
    """``{"history", "evaluations", "guards", "stopped_by_guard", "interrupted_by", "iterations"}`` of a run."""
    summary = output_dir / "metrics.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    lines = output_dir / "metrics.jsonl"
    if not lines.is_file():
        raise FileNotFoundError(f"{output_dir} holds no run: neither metrics.json nor metrics.jsonl")
    records = [json.loads(line) for line in lines.read_text().splitlines() if line.strip()]
    evaluations = [r for r in records if any(k.startswith("eval/") for k in r)]
    history = [r for r in records if not any(k.startswith("eval/") for k in r)]
    return {"history": history, "evaluations": evaluations, "guards": [], "stopped_by_guard": None,
            "interrupted_by": None, "iterations": len(history), "running": True}


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return tuple(zip(*points)) if points else ([], [])


def plot_monitors(run: dict, path: Path) -> None:
    """2×2: training reward vs held-out rewards (gold with ±2 SE), diversity, KL, ratio and clip fraction; guards
    that fired as red lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, evaluations = run["history"], run["evaluations"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=110)
    proxy, diversity, kl, ratio = axes.flat
    proxy.plot(*_series(history, "reward/mean"), color="tab:blue", alpha=0.35, label="training reward (rollouts)")
    proxy.plot(*_series(evaluations, "eval/reward"), color="tab:blue", marker="o", label="training reward, held-out")
    steps, gold = _series(evaluations, "eval/gold")
    if steps:
        proxy.plot(steps, gold, color="tab:orange", marker="o", label="gold reward, held-out")
        _, errors = _series(evaluations, "eval/gold_se")
        if len(errors) == len(gold):
            proxy.fill_between(steps, [g - 2 * e for g, e in zip(gold, errors)],
                               [g + 2 * e for g, e in zip(gold, errors)], color="tab:orange", alpha=0.15)
    proxy.set_title("proxy (training reward) vs gold", fontsize=9)
    diversity.plot(*_series(history, "monitor/diversity"), marker=".", color="tab:green")
    diversity.set_title("within-group diversity of the rollouts (RMS pixel distance)", fontsize=9)
    kl.plot(*_series(history, "train/kl"), marker=".", label="loss KL term (train/kl)")
    kl.plot(*_series(evaluations, "monitor/kl_to_reference"), marker="o", label="KL to reference (monitor)")
    kl.set_title("KL to the reference policy", fontsize=9)
    ratio.plot(*_series(history, "train/ratio_mean"), marker=".", label="ratio mean")
    ratio.plot(*_series(history, "train/clip_fraction"), marker=".", label="clip fraction")
    ratio.plot(*_series(history, "groups/zero_spread_fraction"), marker=".", label="zero-advantage groups")
    ratio.set_title("ratio, clipping, groups without signal", fontsize=9)
    for ax in axes.flat:
        for event in run.get("guards") or []:
            ax.axvline(event["iteration"], color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _image_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def write_report(output_dir: str | Path) -> Path:
    """Write ``OUTPUT_DIR/report/report.html`` (and its PNGs); returns the page's path."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(output_dir)!r} does not exist")
    run = load_run(output_dir)
    folder = output_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    plot_monitors(run, folder / "monitors.png")
    figures = [_image_tag(folder / "monitors.png", "monitors")]
    if (output_dir / "reward_curve.png").is_file():
        figures.append(_image_tag(output_dir / "reward_curve.png", "reward curve"))
    samples = output_dir / "samples"
    grids = [samples / "before_after.png"] if (samples / "before_after.png").is_file() else []
    if not grids and samples.is_dir():  # stopped early: the first and the last evaluation's samples
        latest = sorted(samples.glob("iteration-*.png"), key=lambda p: int(p.stem.split("-")[1]))
        grids = [p for p in [samples / "before.png", *latest[-1:]] if p.is_file()]
    figures += [_image_tag(p, f"samples: {p.stem}") for p in grids]

    guard = run.get("stopped_by_guard")
    status = ("stopped by guard " + guard["guard"]) if guard else (
        f"interrupted by {run['interrupted_by']}" if run.get("interrupted_by") else
        "running or crashed (from metrics.jsonl)" if run.get("running") else "finished")
    last = run["evaluations"][-1] if run["evaluations"] else {}
    summary = [("run", str(output_dir)), ("status", status), ("iterations", str(run.get("iterations", "")))]
    summary += [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in last.items()
                if k.startswith(("eval/", "monitor/"))]
    events = run.get("guards") or []
    guards_html = ("<p>No guard fired.</p>" if not events else _table(
        [(f"{e['guard']} at iteration {e['iteration']} ({e['action']})", e["message"]) for e in events]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tempflow run report: {html.escape(output_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}img{{max-width:100%}}
th{{text-align:left;padding-right:1em;vertical-align:top}}figure{{margin:1em 0}}</style></head>
<body><h1>tempflow run report</h1>{_table(summary)}<h2>Guards</h2>{guards_html}<h2>Curves and samples</h2>
{''.join(figures)}</body></html>
"""
    path = folder / "report.html"
    path.write_text(page)
    return path


def main(argv: list[str]) -> int:
    """``tempflow report OUTPUT_DIR``: 0, or 2 with one line when the directory holds no run."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="tempflow report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a run's output_dir")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.output_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"tempflow report: error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
