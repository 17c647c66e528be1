"""Figures in the style of the seed's Figs 4-6: curves per round/epoch, ROC per class, confusion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # hospital servers and CI have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def plot_curves(path: Path, x: Sequence[int], series: Mapping[str, Sequence[float | None]], xlabel: str, title: str) -> Path:
    """One panel per series name prefix (`loss`, `accuracy`, `auc`), lines per series."""
    panels = sorted({name.split(" ")[-1] for name in series})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        for name, values in series.items():
            if name.split(" ")[-1] == panel:
                # Points without a value are left out rather than breaking the line (federated arms
                # have a value once per round, i.e. every `local-epochs` epochs).
                points = [(xi, v) for xi, v in zip(x, values, strict=True) if v is not None]
                axis.plot([xi for xi, _ in points], [v for _, v in points], marker="o", label=name)
        axis.set_xlabel(xlabel)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(panel)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    return _save(fig, path)


def plot_roc(path: Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], aucs: Mapping[str, float | None], title: str) -> Path:
    fig, axis = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr) in curves.items():
        auc = aucs.get(name)
        label = f"{name} (AUC = {auc:.3f})" if auc is not None else f"{name} (AUC undefined)"
        axis.plot(fpr, tpr, label=label)
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axis.set_xlabel("False positive rate")
    axis.set_ylabel("True positive rate")
    axis.set_title(title)
    axis.legend(loc="lower right")
    return _save(fig, path)


def plot_confusion(path: Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Path:
    matrix = np.asarray(matrix)
    fig, axis = plt.subplots(figsize=(4.5, 4))
    image = axis.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=axis)
    axis.set_xticks(range(len(class_names)), class_names, rotation=30)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("Predicted")
    axis.set_ylabel("True")
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        axis.text(col, row, str(count), ha="center", va="center", color=colour)
    axis.set_title(title)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
