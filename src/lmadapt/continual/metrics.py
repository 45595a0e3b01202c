"""Continual-learning summaries of an accuracy matrix R (rows: after training step i, columns:
tasks j; NaN where task j was not seen yet).

`trained_at[j]` is the last step that trained task j (its diagonal entry for a plain stream).
"""

from __future__ import annotations

import numpy as np


def average_accuracy(R: np.ndarray) -> float:
    """ACC: mean metric over all tasks after the last step (Lopez-Paz & Ranzato, 2017)."""
    return float(np.nanmean(R[-1]))


def backward_transfer(R: np.ndarray, trained_at: list[int]) -> float:
    """BWT = 1/(T-1) Σ_j (R[T,j] - R[t_j,j]) over tasks not trained at the last step.

    Lopez-Paz & Ranzato (2017), "Gradient Episodic Memory", eq. 3; negative means forgetting.
    """
    last = len(R) - 1
    diffs = [R[last, j] - R[t, j] for j, t in enumerate(trained_at) if t != last]
    return float(np.mean(diffs)) if diffs else 0.0


def forgetting(R: np.ndarray, trained_at: list[int]) -> list[float | None]:
    """Per task: max over earlier steps of R[l,j] minus its final R[T,j] (None if undefined).

    Chaudhry et al. (2018), "Riemannian Walk", eq. 4: f_j = max_{l<T} a_{l,j} - a_{T,j}, over
    the steps where task j had been seen; undefined for the task trained last.
    """
    last = len(R) - 1
    out: list[float | None] = []
    for j, t in enumerate(trained_at):
        earlier = R[:last, j][~np.isnan(R[:last, j])]
        out.append(float(earlier.max() - R[last, j]) if t != last and earlier.size else None)
    return out


def average_forgetting(R: np.ndarray, trained_at: list[int]) -> float:
    values = [f for f in forgetting(R, trained_at) if f is not None]
    return float(np.mean(values)) if values else 0.0
