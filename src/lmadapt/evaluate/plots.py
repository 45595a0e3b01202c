"""PNG plots (matplotlib, headless Agg backend), each written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lmadapt.io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def confusion_matrix(cm: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> None:
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > top / 2 else "black",
                fontsize=8,
            )
    ax.set_title(title or "confusion matrix")
    _save(fig, path)


def curves(
    series: dict[str, tuple[list[float], list[float]]], path: Path, title: str, xlabel: str = "step"
) -> None:
    """One line per named (x, y) series."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def panels(
    series: dict[str, tuple[list[float], list[float]]], path: Path, title: str, xlabel: str = "step"
) -> None:
    """One small plot per named (x, y) series, each on its own scale (accuracies beside sums of
    log-probabilities), three to a row."""
    cols = min(3, len(series))
    rows = -(-len(series) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes.flat, series.items()):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def bars(
    names: Sequence[str], values: Sequence[float], path: Path, title: str, ylabel: str = ""
) -> None:
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names)), 3.4))
    ax.bar(range(len(names)), values, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _save(fig, path)


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: Path,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> None:
    """Annotated heatmap of a real matrix; NaN cells (e.g. tasks not seen yet) stay blank."""
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * cols, 1.0 + 0.6 * rows))
    masked = np.ma.masked_invalid(matrix)
    image = ax.imshow(masked, cmap="viridis", vmin=np.nanmin(matrix), vmax=np.nanmax(matrix))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(cols), col_labels, rotation=30, ha="right")
    ax.set_yticks(range(rows), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    mid = (np.nanmin(matrix) + np.nanmax(matrix)) / 2
    for i in range(rows):
        for j in range(cols):
            if not np.isnan(matrix[i, j]):
                color = "black" if matrix[i, j] > mid else "white"
                ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", color=color)
    ax.set_title(title)
    _save(fig, path)


def reliability_diagram(panels: dict[str, dict], path: Path, title: str = "") -> None:
    """One panel per name: accuracy per confidence bin against the diagonal of perfect
    calibration, from `lmadapt.evaluate.calibration.reliability` data (bins + ece)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, data) in zip(axes[0], panels.items()):
        bins = [b for b in data["bins"] if b["count"]]
        width = data["bins"][0]["upper"] - data["bins"][0]["lower"]
        lows = [b["lower"] for b in bins]
        ax.bar(
            lows,
            [b["accuracy"] for b in bins],
            width,
            align="edge",
            color="#4c72b0",
            edgecolor="white",
            label="accuracy",
        )
        ax.bar(
            lows,
            [b["confidence"] - b["accuracy"] for b in bins],
            width,
            bottom=[b["accuracy"] for b in bins],
            align="edge",
            color="#dd8452",
            alpha=0.5,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} (ECE {data['ece']:.4f})")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(title or "reliability diagram", y=1.03)
    _save(fig, path)


def histogram(values: Sequence[float], path: Path, title: str, xlabel: str = "") -> None:
    """The distribution of `values`, with a line at 0."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="#4c72b0")
    ax.axvline(0.0, color="#c44e52", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    _save(fig, path)
