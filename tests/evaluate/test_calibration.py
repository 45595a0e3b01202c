"""Calibration: ECE by hand, reliability bins, and temperature scaling recovering a known T."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from lmadapt.evaluate.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
    scaled_probs,
)


def test_ece_by_hand():
    # Top-label confidences 0.95, 0.85, 0.62, 0.58; the 1st and 3rd are right. With 5 bins:
    # (0.8, 1]: conf 0.90, acc 0.5, 2 of 4; (0.6, 0.8]: 0.62 vs 1; (0.4, 0.6]: 0.58 vs 0.
    probs = np.array([[0.95, 0.05], [0.15, 0.85], [0.38, 0.62], [0.58, 0.42]])
    gold = np.array([0, 0, 1, 1])
    expected = 2 / 4 * 0.40 + 1 / 4 * 0.38 + 1 / 4 * 0.58
    assert expected_calibration_error(probs, gold, n_bins=5) == pytest.approx(expected)
    bins = reliability(probs, gold, n_bins=5)["bins"]
    assert [b["count"] for b in bins] == [0, 0, 1, 1, 2]
    assert bins[4]["confidence"] == pytest.approx(0.9) and bins[4]["accuracy"] == 0.5
    assert (bins[0]["lower"], bins[-1]["upper"]) == (0.0, 1.0)


def test_perfectly_calibrated_bins_have_no_error():
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)


def _known_temperature_data(true_t: float, seed: int, n: int = 4000, classes: int = 4):
    """Logits z and labels drawn from softmax(z / true_t): the best temperature is true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, classes))
    p = softmax(logits / true_t, axis=-1)
    gold = np.array([rng.choice(classes, p=row) for row in p])
    return logits, gold


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_t):
    logits, gold = _known_temperature_data(true_t, seed=int(true_t * 10))
    t = fit_temperature(logits, gold)
    assert t == pytest.approx(true_t, rel=0.1)
    assert nll(logits, gold, t) <= nll(logits, gold)
    if true_t != 1.0:  # the raw logits were mis-calibrated; scaling them must help
        raw = expected_calibration_error(softmax(logits, axis=-1), gold)
        assert expected_calibration_error(scaled_probs(logits, t), gold) < raw


@pytest.mark.parametrize("seed", range(5))
def test_temperature_fit_never_increases_dev_nll(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, rng.uniform(0.1, 5), size=(50, 3))
    gold = rng.integers(0, 3, size=50)
    assert nll(logits, gold, fit_temperature(logits, gold)) <= nll(logits, gold)


def test_no_better_temperature_keeps_one():
    logits = np.zeros((6, 3))  # every temperature gives the same NLL
    assert fit_temperature(logits, np.array([0, 1, 2, 0, 1, 2])) == 1.0


def test_scaling_keeps_the_argmax():
    logits = np.random.default_rng(0).normal(size=(20, 5))
    for t in (0.3, 1.0, 4.0):
        assert (scaled_probs(logits, t).argmax(-1) == logits.argmax(-1)).all()
