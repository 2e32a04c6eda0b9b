"""Pictures of a run: the reward curve and captioned sample grids (PNG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_reward_curve(history: list[dict], path: str | Path, evaluations: list[dict] | None = None) -> None:
    """Training reward (mean and its spread per iteration) and, if given, held-out evaluation metrics."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = [h["iteration"] for h in history]
    means = [h["reward/mean"] for h in history]
    stds = [h.get("reward/std", 0.0) for h in history]
    ax.plot(steps, means, label="train reward (rollouts)", color="tab:blue")
    ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                    color="tab:blue", alpha=0.15)
    for key in sorted({k for e in evaluations or [] for k in e if k.startswith("eval/")}):
        points = [(e["iteration"], e[key]) for e in evaluations if key in e]
        ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
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
