"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use", arXiv:2102.09690).

A prompt biases a model towards some labels (majority label among the demonstrations, recency,
common tokens). The bias is estimated by the label probabilities p_cf the prompt gives to
content-free inputs ("N/A", "[MASK]", ""), and divided out: q = softmax(W p) with
W = diag(p_cf)^-1 and b = 0, i.e. q ∝ p / p_cf — a content-free input then scores uniform.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

CONTENT_FREE = ("N/A", "[MASK]", "")


def content_free_prior(cf_scores: np.ndarray) -> np.ndarray:
    """Mean label distribution over the content-free inputs (rows of (M, C) log-scores)."""
    p = softmax(cf_scores, axis=-1).mean(0)
    return p / p.sum()


def calibrate(probs: np.ndarray, p_cf: np.ndarray) -> np.ndarray:
    """Apply W = diag(p_cf)^-1 to (N, C) label probabilities and renormalise."""
    q = probs / p_cf
    return q / q.sum(-1, keepdims=True)
