"""Plots people would rather look at than read: training curves, the post-processing heatmap (PNG, atomic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pneumothorax.io import atomic


def plot_curves(metrics: Any, path: Path, columns: list[tuple[str, str]]) -> None:
    """Plot training curves (pairs of column and title) from a metrics DataFrame into a PNG."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.4))
    for ax, (column, title) in zip(np.atleast_1d(axes), columns, strict=True):
        for kind, part in metrics.groupby("kind"):
            if column in part and part[column].notna().any():
                ax.plot(part["epoch"], part[column], "o-" if kind != "epoch" else "-", label=kind, ms=4)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. a validation column before any validation ran
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    save(fig, path)


def plot_heatmap(grid: np.ndarray, b_values: list[float], r_values: list[float], path: Path, title: str) -> None:
    """Heatmap of Dice over B-TH (y) x R-TH (x)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(
        grid,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(-0.5, len(r_values) - 0.5, b_values[0], b_values[-1]) if len(b_values) > 1 else None,
    )
    ax.set_xticks(range(len(r_values)), [str(int(r)) for r in r_values], rotation=45)
    ax.set_xlabel("R-TH (pixels at 1024x1024)")
    ax.set_ylabel("B-TH")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="mean Dice")
    save(fig, path)


def save(fig: Any, path: Path) -> None:
    """Lay out, write the PNG atomically, and free the figure."""
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
