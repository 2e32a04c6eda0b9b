"""``tempflow report OUTPUT_DIR``: one self-contained HTML page of a run (its figures embedded, and also
written as SVG and PNG files beside it in ``OUTPUT_DIR/report/``), readable without TensorBoard: the held-out
rewards with the gold reward's standard error, per task and in training; the training reward against the gold
reward, within-group diversity, the KL to the reference, the policy ratio and clip fraction; the sample grids;
and the guards that fired. Works on a finished run (``metrics.json``) and on a running or crashed one (its
``metrics.jsonl``, whose last line may still be incomplete: it is left out, and the page says so).

Figures are drawn for the page's width (:mod:`tempflow.plots`): curves as SVG, sample grids as PNG shown at
their DPI, with no text under 12 px."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .plots import (
    CSS_PX_PER_INCH,
    GOLD_COLOR,
    STYLE,
    Paths,
    finish_axes,
    plot_reward_curve,
    plot_series,
    plt,
    save_figure,
    series,
    stacked_axes,
)

REPORT_DIR = "report"
FIGURE_FORMATS = (".svg", ".png")  # the page embeds the SVG; the PNG is for slides and chats
PAGE_STYLE = """body{font-family:sans-serif;font-size:16px;max-width:1100px;margin:2em auto;padding:0 1em}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:14px;color:#333}
th{text-align:left;padding-right:1em;vertical-align:top}.note{background:#fff4d6;padding:0.5em 1em}"""


def load_run(output_dir: Path) -> dict:
    """``{"history", "evaluations", "guards", "stopped_by_guard", "interrupted_by", "iterations"}`` of a run,
    and ``"notes"``: what the page should say about how it was read (an incomplete last line left out)."""
    summary, lines = output_dir / "metrics.json", output_dir / "metrics.jsonl"
    notes = []
    if summary.is_file():
        try:
            run = json.loads(summary.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if not lines.is_file():
                raise ValueError(f"{summary}: not valid JSON ({_reason(err)})") from None
            notes.append(f"{summary.name} is not valid JSON ({_reason(err)}): the curves come from "
                         f"{lines.name}.")
        else:
            if not isinstance(run, dict):
                raise ValueError(f"{summary}: not a run summary (a JSON object)")
            run.setdefault("notes", notes)
            return run
    if not lines.is_file():
        raise FileNotFoundError(f"{output_dir} holds no run: neither metrics.json nor metrics.jsonl")
    records, partial_line = read_metrics_lines(lines)
    if partial_line is not None:
        notes.append(f"The last line of {lines.name} (line {partial_line}) is incomplete, as while a run is "
                     "writing it or after a crash mid-write: it is left out.")
    evaluations = [r for r in records if _is_evaluation(r)]
    history = [r for r in records if not _is_evaluation(r)]
    # a guard checks after an iteration (whose record holds its 0-based index) or at an evaluation
    logged = "metrics.jsonl records that it fired; its message is in the run's output"
    guards = [{"guard": key.split("/", 1)[1], "iteration": r["iteration"] + (not _is_evaluation(r)),
               "action": "logged", "message": logged}
              for r in records for key in r if key.startswith("guard/")]
    return {"history": history, "evaluations": evaluations, "guards": guards, "stopped_by_guard": None,
            "interrupted_by": None, "iterations": len(history), "running": True, "notes": notes}


def _is_evaluation(record: dict) -> bool:
    return any(k.startswith("eval/") for k in record)


def read_metrics_lines(path: Path) -> tuple[list[dict], int | None]:
    """The records of a ``metrics.jsonl`` (one JSON object a line, each with its ``iteration``), in order of
    iteration, and the number of its last line when that line is incomplete (no newline yet, and not valid
    JSON), else None. A record logged again for the same iteration (a run resumed from an earlier checkpoint)
    replaces the first. Any other bad line raises a ``ValueError`` naming the file and the line."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")  # a cut write may split a char
    records: dict[tuple[bool, int], dict] = {}
    partial_line = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # after the last newline: still being written, or cut off
                partial_line = number
                continue
            why = f"{err.msg}: column {err.colno}"
            raise ValueError(f"{path}, line {number}: not valid JSON ({why})") from None
        if not isinstance(record, dict) or type(record.get("iteration")) is not int:
            raise ValueError(f"{path}, line {number}: not a metrics record (a JSON object with an integer "
                             "`iteration`)")
        records[_is_evaluation(record), record["iteration"]] = record
    return sorted(records.values(), key=lambda r: r["iteration"]), partial_line


def _reason(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg}: line {err.lineno} column {err.colno}"
    return str(err)


def plot_monitors(run: dict, path: Paths) -> None:
    """Four panels, one above the other: training reward vs held-out rewards (gold with ± 2 SE as a band),
    diversity, KL, ratio and clip fraction; guards that fired as red lines. ``path``: one file or several."""
    history, evaluations = run["history"], run["evaluations"]
    gold = "gold reward, held-out"
    with plt.rc_context(STYLE):
        fig, (proxy, diversity, kl, ratio) = stacked_axes(4, height=2.4)
        proxy.plot(*series(history, "reward/mean"), color="tab:gray", alpha=0.5,
                   label="training reward (rollouts)")
        plot_series(proxy, {"training reward, held-out": series(evaluations, "eval/reward"),
                            gold: series(evaluations, "eval/gold")},
                    bands={gold: series(evaluations, "eval/gold_se")[1]}, colors={gold: GOLD_COLOR})
        proxy.set_title("proxy (training reward) vs gold")
        plot_series(diversity, {"diversity": series(history, "monitor/diversity")}, markersize=3)
        diversity.set_title("within-group diversity of the rollouts (RMS pixel distance)")
        plot_series(kl, {"loss KL term (train/kl)": series(history, "train/kl"),
                         "KL to reference (monitor)": series(evaluations, "monitor/kl_to_reference")},
                    markersize=4)
        kl.set_title("KL to the reference policy")
        plot_series(ratio, {"ratio mean": series(history, "train/ratio_mean"),
                            "clip fraction": series(history, "train/clip_fraction"),
                            "zero-advantage groups": series(history, "groups/zero_spread_fraction")},
                    markersize=4)
        ratio.set_title("ratio, clipping, groups without signal")
        for ax in (proxy, diversity, kl, ratio):
            finish_axes(ax, _guard_iterations(run))
        save_figure(fig, path)


def _guard_iterations(run: dict) -> list[int]:
    return [event["iteration"] for event in run.get("guards") or []]


def _headline_task_reward(run: dict) -> str | None:
    """The reward whose per-task scores the reward curve shows: one scored only at evaluation (e.g.
    ``shapes_strict``, as the trainer picks), else the first."""
    tasks = sorted({k.split("/")[1] for e in run["evaluations"] for k in e if k.startswith("eval_task/")})
    trained = {k.split("/", 1)[1] for h in run["history"] for k in h if k.startswith("reward/")}
    return next((name for name in tasks if name not in trained), tasks[0] if tasks else None)


def _image_width(path: Path) -> str:
    """The ``width`` attribute that shows a PNG at its DPI (96 CSS px an inch); empty for an SVG, which
    carries its own size."""
    if path.suffix != ".png":
        return ""
    from PIL import Image

    with Image.open(path) as image:
        dpi = (image.info.get("dpi") or (CSS_PX_PER_INCH,))[0] or CSS_PX_PER_INCH
        return f' width="{round(image.width / dpi * CSS_PX_PER_INCH)}"'


def _figure_tag(path: Path, caption: str) -> str:
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:{mime};base64,{data}"{_image_width(path)} alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _sample_grids(output_dir: Path) -> list[Path]:
    samples = output_dir / "samples"
    if (samples / "before_after.png").is_file():
        return [samples / "before_after.png"]
    if not samples.is_dir():
        return []
    # stopped early, or still running: the first and the last evaluation's samples
    latest = sorted(samples.glob("iteration-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    return [p for p in [samples / "before.png", *latest[-1:]] if p.is_file()]


def _summary_rows(output_dir: Path, run: dict) -> list[tuple[str, str]]:
    guard = run.get("stopped_by_guard")
    status = ("stopped by guard " + guard["guard"]) if guard else (
        f"interrupted by {run['interrupted_by']}" if run.get("interrupted_by") else
        "running or crashed (from metrics.jsonl)" if run.get("running") else "finished")
    last = run["evaluations"][-1] if run["evaluations"] else {}
    rows = [("run", str(output_dir)), ("status", status), ("iterations", str(run.get("iterations", "")))]
    for key, value in last.items():
        if not key.startswith(("eval/", "monitor/")) or key == "eval/gold_se":
            continue
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        if key == "eval/gold" and isinstance(last.get("eval/gold_se"), float):
            text += f" (standard error {last['eval/gold_se']:.4f})"
        rows.append((key, text))
    return rows


def _curves(run: dict, folder: Path) -> list[str]:
    """The reward curve and the monitors, drawn into ``folder`` and as the page's figures."""
    plot_reward_curve(run["history"], [folder / f"reward_curve{s}" for s in FIGURE_FORMATS],
                      run["evaluations"], task_reward=_headline_task_reward(run),
                      guard_iterations=_guard_iterations(run))
    plot_monitors(run, [folder / f"monitors{s}" for s in FIGURE_FORMATS])
    return [_figure_tag(folder / "reward_curve.svg", "Rewards: held-out evaluations (the gold reward with "
                        "± 2 standard errors as a band), per task, and in training."),
            _figure_tag(folder / "monitors.svg", "Monitors: proxy against gold, diversity, KL to the "
                        "reference, ratio and clipping; red dashed lines: guards that fired.")]


def write_report(output_dir: str | Path) -> Path:
    """Write ``OUTPUT_DIR/report/report.html`` (and its figures); returns the page's path."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(output_dir)!r} does not exist")
    run = load_run(output_dir)
    folder = output_dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    notes = list(run.get("notes") or [])
    if run["history"] or run["evaluations"]:
        curves = _curves(run, folder)
    else:
        curves = []
        notes.append("No iteration or evaluation is logged yet.")
    grids = [_figure_tag(p, f"samples: {p.stem.replace('_', ' ')}") for p in _sample_grids(output_dir)]
    events = run.get("guards") or []
    guards_html = ("<p>No guard fired.</p>" if not events else _table(
        [(f"{e['guard']} at iteration {e['iteration']} ({e['action']})", e["message"]) for e in events]))
    notes_html = "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tempflow run report: {html.escape(output_dir.name)}</title>
<style>{PAGE_STYLE}</style></head>
<body><h1>tempflow run report</h1>{_table(_summary_rows(output_dir, run))}{notes_html}
<h2>Guards</h2>{guards_html}
<h2>Curves</h2>{''.join(curves)}
<h2>Samples</h2>{''.join(grids) or '<p>No samples yet.</p>'}</body></html>
"""
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str]) -> int:
    """``tempflow report OUTPUT_DIR``: 0, or 2 with one line when the directory holds no readable run."""
    import argparse
    import sys

    description = __doc__.split("\n\n")[0].replace("``", "")  # the terminal shows no reST
    parser = argparse.ArgumentParser(prog="tempflow report", description=description,
                                     epilog="example: tempflow report outputs/shapes")
    parser.add_argument("output_dir", help="a run's output_dir (finished, running or crashed)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.output_dir)
    except (OSError, ValueError) as err:  # no run, a bad metrics line, a folder it cannot write
        print(f"tempflow report: error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
