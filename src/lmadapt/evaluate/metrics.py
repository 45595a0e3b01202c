"""Metric functions shared by tasks (and by prompting, which reuses them without training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_squared_error,
    precision_recall_fscore_support,
)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    """Flat scalar metrics (logged, compared, early-stopped on)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Structured extras for the report: per-class scores, confusion matrix, ..."""


LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mse", "no_label_rate", "ece", "ece_calibrated"})
"""Metrics where smaller is better; every other metric lmadapt reports is a score to maximise."""


def metric_direction(name: str) -> str:
    """'min' or 'max': the direction belongs to the metric, whatever task reports it."""
    return "min" if name in LOWER_IS_BETTER else "max"


def _per_class(pred: np.ndarray, gold: np.ndarray, labels: list[str]) -> dict[str, dict]:
    idx = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(
        gold, pred, labels=idx if gold.ndim == 1 else None, zero_division=0
    )
    return {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, name in enumerate(labels)
    }


def single_label_metrics(pred: np.ndarray, gold: np.ndarray, labels: list[str]) -> Evaluation:
    idx = list(range(len(labels)))
    metrics = {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=idx, average="macro", zero_division=0)),
    }
    details = {
        "labels": labels,
        "per_class": _per_class(pred, gold, labels),
        "confusion_matrix": confusion_matrix(gold, pred, labels=idx).tolist(),
    }
    return Evaluation(metrics, details)


def multilabel_metrics(pred: np.ndarray, gold: np.ndarray, labels: list[str]) -> Evaluation:
    metrics = {
        "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "samples_f1": float(f1_score(gold, pred, average="samples", zero_division=0)),
        "subset_accuracy": float(accuracy_score(gold, pred)),
    }
    return Evaluation(metrics, {"labels": labels, "per_class": _per_class(pred, gold, labels)})


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    out = {"mse": float(mean_squared_error(gold, pred))}
    if len(gold) > 1 and np.std(gold) > 0 and np.std(pred) > 0:
        out["pearson"] = float(stats.pearsonr(pred, gold)[0])
        out["spearman"] = float(stats.spearmanr(pred, gold)[0])
    else:  # correlation is undefined for constant inputs
        out["pearson"] = out["spearman"] = float("nan")
    return out
