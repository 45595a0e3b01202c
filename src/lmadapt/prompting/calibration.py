"""Label-bias calibration of prompt label scores.

A prompt biases a model towards some labels (majority label among the demonstrations, recency,
common tokens, the domain's words). Each method estimates that bias as a label prior p and divides
it out: q = softmax(W p_label) with W = diag(p)^-1 and b = 0, i.e. q ∝ p_label / p.

- contextual (Zhao et al. 2021, "Calibrate Before Use", arXiv:2102.09690): p is the distribution
  the prompt gives to content-free inputs ("N/A", "[MASK]", ""), which then score uniform.
- domain (Fei et al. 2023, "Mitigating Label Biases for In-Context Learning", arXiv:2305.19148):
  content-free strings miss the bias that the task's own words carry, so p is estimated from
  in-domain text. We take the simplest estimate, the mean predicted distribution over the
  unlabelled evaluation inputs themselves (no labels are read); after dividing it out the
  predictions are close to balanced across labels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.special import softmax

CONTENT_FREE = ("N/A", "[MASK]", "")
CALIBRATIONS = ("none", "contextual", "domain")
Calibration = Literal["none", "contextual", "domain"]


def content_free_prior(cf_scores: np.ndarray) -> np.ndarray:
    """Mean label distribution over the content-free inputs (rows of (M, C) log-scores)."""
    p = softmax(cf_scores, axis=-1).mean(0)
    return p / p.sum()


def domain_prior(probs: np.ndarray) -> np.ndarray:
    """Mean label distribution over unlabelled in-domain inputs ((N, C) probabilities)."""
    p = probs.mean(0)
    return p / p.sum()


def calibrate(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Apply W = diag(prior)^-1 to (N, C) label probabilities and renormalise."""
    q = probs / prior
    return q / q.sum(-1, keepdims=True)


def log_mean(members: list[np.ndarray]) -> np.ndarray:
    """Ensemble of (N, C) label distributions: the mean of their log-probabilities, renormalised
    (a geometric mean, so one confident member cannot outvote the others' agreement)."""
    return softmax(np.mean([np.log(np.clip(m, 1e-12, None)) for m in members], 0), axis=-1)
