"""Pictures of a run: the reward curve and captioned sample grids (PNG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def plot_reward_curve(history: list[dict], path: str | Path, evaluations: list[dict] | None = None,
                      smoothing: int = 10, task_reward: str | None = None) -> None:
    """Left: the held-out evaluations (``eval/*``: the same prompts and noise every time, so a change is the
    model's); middle, when the prompts carry tasks: ``task_reward`` (default: the first) per task (``eval_task/*``);
    right: the training reward of the rollouts, per iteration and as a ``smoothing``-iteration moving mean
    (fresh prompts every iteration make the raw curve too noisy to show a trend)."""
    evaluations = evaluations or []
    task_keys = sorted({k for e in evaluations for k in e if k.startswith("eval_task/")})
    task_reward = task_reward or (task_keys[0].split("/")[1] if task_keys else None)
    task_keys = [k for k in task_keys if k.split("/")[1] == task_reward]
    fig, axes = plt.subplots(1, 3 if task_keys else 2, figsize=(16 if task_keys else 11, 4), dpi=120)
    held_out, train = axes[0], axes[-1]
    for key in sorted({k for e in evaluations for k in e if k.startswith("eval/")}):
        points = [(e["iteration"], e[key]) for e in evaluations if key in e]
        held_out.plot(*zip(*points), marker="o", label=key.removeprefix("eval/"))
    held_out.set_title("held-out evaluation (fixed prompts and seeds)", fontsize=9)
    for key in task_keys:
        points = [(e["iteration"], e[key]) for e in evaluations if key in e]
        axes[1].plot(*zip(*points), marker="o", label=key.rsplit("/", 1)[1])
    if task_keys:
        axes[1].set_title(f"held-out {task_reward} per task", fontsize=9)
    steps = [h["iteration"] for h in history]
    means = [h["reward/mean"] for h in history]
    train.plot(steps, means, color="tab:blue", alpha=0.3, label="per iteration")
    if len(means) >= smoothing:
        window = np.ones(smoothing) / smoothing
        train.plot(steps[smoothing - 1:], np.convolve(means, window, mode="valid"), color="tab:blue",
                   label=f"mean of {smoothing}")
    train.set_title("training reward (rollouts, fresh prompts each iteration)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_image_grid(images: torch.Tensor, captions: list[str], path: str | Path, columns: int = 4) -> None:
    """Images ``[B, 3, H, W]`` in [0, 1] in a grid, each with its (wrapped) prompt above it."""
    count = len(images)
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image.permute(1, 2, 0).float().clamp(0, 1).cpu().numpy(), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(caption, 28)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_before_after_grid(before: torch.Tensor, after: torch.Tensor, captions: list[str], path: str | Path) -> None:
    """Pairs of samples with the same prompt and noise: before training (top row) and after (bottom row)."""
    count = len(captions)
    fig, axes = plt.subplots(2, count, figsize=(2.2 * count, 5.0), dpi=100, squeeze=False)
    for column, caption in enumerate(captions):
        for row, (label, images) in enumerate((("before", before), ("after", after))):
            ax = axes[row][column]
            ax.imshow(images[column].permute(1, 2, 0).float().clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(label, fontsize=9)
        axes[0][column].set_title("\n".join(textwrap.wrap(caption, 22)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
