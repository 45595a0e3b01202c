"""Confidence calibration of single-label predictions: expected calibration error, reliability
diagram data and temperature scaling, as in Guo et al. 2017, "On Calibration of Modern Neural
Networks" (ICML): top-label confidence, M equal-width bins (15 there), one temperature T fitted
by minimising the dev negative log-likelihood of softmax(logits / T).

Hand-written because it is a few lines over numpy/scipy: scikit-learn calibrates with Platt or
isotonic regression (not one temperature over softmax logits), and the libraries that do
temperature scaling bring a framework of their own for a one-parameter fit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

N_BINS = 15
"""Guo et al. 2017's bin count."""
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
"""Temperatures searched: far wider than the 1-3 Guo et al. report for over-confident nets."""


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin m (0-based) holds confidences in (m / M, (m + 1) / M]; a confidence of 0 joins bin 0."""
    return np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability(probs: np.ndarray, gold: np.ndarray, n_bins: int = N_BINS) -> dict[str, Any]:
    """Reliability-diagram data and ECE of (N, C) probabilities against (N,) gold indices.

    `bins` has one entry per equal-width bin (empty bins included, count 0), with the mean
    top-label confidence and the accuracy of the predictions that fall in it; `ece` is
    sum_m |B_m| / N * |acc(B_m) - conf(B_m)| (Guo et al. 2017, eq. 3).
    """
    confidence = probs.max(-1)
    correct = probs.argmax(-1) == gold
    which = _bins(confidence, n_bins)
    out, ece = [], 0.0
    for m in range(n_bins):
        inside = which == m
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else 0.0
        acc = float(correct[inside].mean()) if count else 0.0
        ece += count / max(1, len(gold)) * abs(acc - conf)
        out.append(
            {
                "lower": m / n_bins,
                "upper": (m + 1) / n_bins,
                "count": count,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return {"bins": out, "ece": float(ece)}


def expected_calibration_error(probs: np.ndarray, gold: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE of (N, C) probabilities against (N,) gold indices (see `reliability`)."""
    return reliability(probs, gold, n_bins)["ece"]


def nll(logits: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of gold under softmax(logits / temperature)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)
    return float(-logp[np.arange(len(gold)), gold].mean())


def scaled_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T): the same argmax for any T > 0, confidences softened when T > 1."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=-1)


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    """The T that minimises the NLL of (N, C) `logits` against `gold` (searched on log T, so the
    bounded 1-D search is symmetric in over- and under-confidence); 1.0 whenever the search
    finds nothing better, so the fitted NLL is never above the uncalibrated one."""
    logits = np.asarray(logits, dtype=np.float64)
    found = minimize_scalar(
        lambda log_t: nll(logits, gold, float(np.exp(log_t))), bounds=LOG_T_BOUNDS, method="bounded"
    )
    temperature = float(np.exp(found.x))
    return temperature if nll(logits, gold, temperature) < nll(logits, gold) else 1.0
