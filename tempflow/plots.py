"""Pictures of a run: the reward curve and captioned sample grids, drawn for the run report's page.

Every figure is at most :data:`PAGE_WIDTH_INCHES` wide, and the report shows it at 96 CSS px an inch (an
SVG's ``pt`` is 4/3 px; a PNG is shown at its pixel width over its DPI), so the smallest text here,
:data:`SMALLEST_FONT_PT`, is 12.7 px on the page. PNGs are written at :data:`PNG_DPI`, about two device pixels
per CSS pixel, so they stay sharp on high-density screens. Legends sit beside the axes, never over the data;
series that hold the same points are drawn once under a joint label (``gold = shapes_strict``) rather than one
hiding the other."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    import torch

PAGE_WIDTH_INCHES = 11.0
CSS_PX_PER_INCH = 96
PNG_DPI = 200
SMALLEST_FONT_PT = 9.5
STYLE = {
    "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 10,
    "xtick.labelsize": SMALLEST_FONT_PT, "ytick.labelsize": SMALLEST_FONT_PT, "svg.fonttype": "none",
    "savefig.dpi": PNG_DPI,
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")
GOLD_COLOR = "tab:orange"
LEGEND_LABEL_CHARS = 30
GRID_COLUMNS_MAX = 8
"""Before/after pairs per row block: more would shrink each image below ~1.3 inches at the page's width."""
ROW_LABEL_INCHES = 0.3

Paths = str | Path | Sequence[str | Path]


def save_figure(fig, paths: Paths) -> None:
    """Write ``fig`` to each path (its suffix picks the format: ``.svg`` for the report page, ``.png``) and
    close it. SVGs carry no date, so the same run gives the same bytes."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        fig.savefig(path, metadata={"Date": None} if Path(path).suffix == ".svg" else None)
    plt.close(fig)


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """``(iterations, values)`` of ``key`` over the rows that hold a finite number for it."""
    points = [(r["iteration"], r[key]) for r in rows if _is_finite_number(r.get(key))]
    if not points:
        return [], []
    iterations, values = zip(*points)
    return list(iterations), list(values)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def coinciding_series(series: dict[str, tuple[Sequence, Sequence]]) -> list[tuple[str, list, list]]:
    """``(label, x, y)`` of each distinct series, in order; series with the same points (to float32 rounding)
    are merged into one, labelled ``"a = b"`` (e.g. a gold reward that is also an evaluation reward). Empty
    series are left out."""
    merged: list[tuple[list[str], list, list]] = []
    for label, (x, y) in series.items():
        if not len(x):
            continue
        for labels, x_seen, y_seen in merged:
            if list(x) == x_seen and np.allclose(y, y_seen, rtol=1e-6, atol=1e-12, equal_nan=True):
                labels.append(label)
                break
        else:
            merged.append(([label], list(x), list(y)))
    return [(" = ".join(labels), x, y) for labels, x, y in merged]


def plot_series(ax, series: dict[str, tuple[Sequence, Sequence]], bands: dict[str, Sequence] | None = None,
                colors: dict[str, str] | None = None, **style) -> None:
    """Each distinct series of ``series`` with its own marker and line style, so that curves which cross or
    run close stay apart; ``bands[label]`` (a standard error) shades ± 2 of it around that series;
    ``colors[label]`` fixes a series' colour (the gold reward's is the same in every figure)."""
    bands, colors = bands or {}, colors or {}
    for k, (label, x, y) in enumerate(coinciding_series(series)):
        names = label.split(" = ")
        color = next((colors[name] for name in names if name in colors), None)
        line, = ax.plot(x, y, marker=MARKERS[k % len(MARKERS)], linestyle=LINESTYLES[k % len(LINESTYLES)],
                        label=_wrap_label(label), **({"color": color} if color else {}), **style)
        banded = next((name for name in names if name in bands), None)
        if banded is not None and len(bands[banded]) == len(y):
            low = [v - 2 * e for v, e in zip(y, bands[banded])]
            high = [v + 2 * e for v, e in zip(y, bands[banded])]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, linewidth=0,
                            label=_wrap_label(f"{banded}: ± 2 standard errors"))


def _wrap_label(label: str) -> str:
    return "\n".join(textwrap.wrap(label, LEGEND_LABEL_CHARS, break_on_hyphens=False))


def finish_axes(ax, guard_iterations: Sequence[int] = ()) -> None:
    """Integer iterations on x, a light grid, red dashed lines where guards fired, and the legend outside the
    data, to the right of the axes."""
    for k, iteration in enumerate(sorted(set(guard_iterations))):
        ax.axvline(iteration, color="tab:red", linestyle="--", linewidth=1,
                   label=None if k else "guard fired")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def stacked_axes(count: int, height: float = 2.6):
    """A figure of ``count`` panels one above the other, page-wide, sharing the iteration axis."""
    fig, axes = plt.subplots(count, 1, figsize=(PAGE_WIDTH_INCHES, height * count), sharex=True,
                             squeeze=False, layout="constrained")
    axes[-1][0].set_xlabel("iteration")
    return fig, [row[0] for row in axes]


def plot_reward_curve(history: list[dict], path: Paths, evaluations: list[dict] | None = None,
                      smoothing: int = 10, task_reward: str | None = None,
                      guard_iterations: Sequence[int] = ()) -> None:
    """Top: the held-out evaluations (``eval/*``: the same prompts and noise every time, so a change is the
    model's), the gold reward with ± 2 standard errors as a band; middle, when the prompts carry tasks:
    ``task_reward`` (default: the first) per task (``eval_task/*``); bottom: the training reward of the
    rollouts, per iteration and as a ``smoothing``-iteration moving mean (fresh prompts every iteration make
    the raw curve too noisy to show a trend). ``path``: one file or several (``.png``, ``.svg``)."""
    evaluations = evaluations or []
    task_keys = sorted({k for e in evaluations for k in e if k.startswith("eval_task/")})
    task_reward = task_reward or (task_keys[0].split("/")[1] if task_keys else None)
    task_keys = [k for k in task_keys if k.split("/")[1] == task_reward]
    eval_keys = sorted({k for e in evaluations for k in e if k.startswith("eval/") and k != "eval/gold_se"})
    with plt.rc_context(STYLE):
        fig, axes = stacked_axes(3 if task_keys else 2)
        held_out, train = axes[0], axes[-1]
        plot_series(held_out, {k.removeprefix("eval/"): series(evaluations, k) for k in eval_keys},
                    bands={"gold": series(evaluations, "eval/gold_se")[1]}, colors={"gold": GOLD_COLOR})
        held_out.set_title("held-out evaluation (fixed prompts and seeds)")
        if task_keys:
            plot_series(axes[1], {k.rsplit("/", 1)[1]: series(evaluations, k) for k in task_keys})
            axes[1].set_title(f"held-out {task_reward} per task")
        steps, means = series(history, "reward/mean")
        train.plot(steps, means, color="tab:blue", alpha=0.35, label="per iteration")
        if len(means) >= smoothing:
            window = np.ones(smoothing) / smoothing
            train.plot(steps[smoothing - 1:], np.convolve(means, window, mode="valid"), color="tab:blue",
                       label=f"mean of {smoothing}")
        train.set_title("training reward (rollouts, fresh prompts each iteration)")
        for ax in axes:
            finish_axes(ax, guard_iterations)
        save_figure(fig, path)


def _caption(text: str, cell_inches: float) -> str:
    """``text`` wrapped to the width of a cell at :data:`SMALLEST_FONT_PT` (DejaVu Sans averages ~0.6 em)."""
    return "\n".join(textwrap.wrap(text, max(12, int(cell_inches * 72 / (SMALLEST_FONT_PT * 0.6)))))


def _pixels(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).float().clamp(0, 1).cpu().numpy()


def save_image_grid(images: torch.Tensor, captions: list[str], path: str | Path, columns: int = 4) -> None:
    """Images ``[B, 3, H, W]`` in [0, 1] in a page-wide grid, each with its (wrapped) prompt above it."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell = PAGE_WIDTH_INCHES / columns
    aspect = images.shape[-2] / images.shape[-1]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, columns, figsize=(PAGE_WIDTH_INCHES, rows * (cell * aspect + 0.55)),
                                 squeeze=False, layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        for ax, image, caption in zip(axes.flat, images, captions):
            ax.imshow(_pixels(image), interpolation="nearest")
            ax.set_title(_caption(caption, cell), fontsize=SMALLEST_FONT_PT)
        save_figure(fig, path)


def save_before_after_grid(before: torch.Tensor, after: torch.Tensor, captions: list[str],
                           path: str | Path) -> None:
    """Pairs of samples with the same prompt and noise, before training (upper row) and after (lower row), at
    most :data:`GRID_COLUMNS_MAX` pairs a row block."""
    blocks = math.ceil(len(captions) / GRID_COLUMNS_MAX)
    columns = math.ceil(len(captions) / blocks)
    cell = min((PAGE_WIDTH_INCHES - ROW_LABEL_INCHES) / columns, 2.2)
    aspect = before.shape[-2] / before.shape[-1]
    lines = max(_caption(c, cell).count("\n") + 1 for c in captions)
    height = blocks * (2 * cell * aspect + lines * SMALLEST_FONT_PT * 1.3 / 72 + 0.15)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2 * blocks, columns, figsize=(cell * columns + ROW_LABEL_INCHES, height),
                                 squeeze=False, layout="constrained")
        for ax in axes.flat:
            ax.axis("off")
        for index, caption in enumerate(captions):
            block, column = divmod(index, columns)
            for row, (label, images) in enumerate((("before", before), ("after", after))):
                ax = axes[2 * block + row][column]
                ax.axis("on")
                ax.imshow(_pixels(images[index]), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if column == 0:
                    ax.set_ylabel(label)
            axes[2 * block][column].set_title(_caption(caption, cell), fontsize=SMALLEST_FONT_PT)
        save_figure(fig, path)
