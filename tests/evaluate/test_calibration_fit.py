"""Temperature scaling never makes dev calibration worse, and says why when it applies none
(issue #30: T = 19.9999 on a collapsed full fine-tuning run; NER per-word ECE 0.133 -> 0.170)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from lmadapt.evaluate.calibration import (
    calibration_markdown,
    expected_calibration_error,
    fit_on_dev,
    fit_temperature,
    nll,
    scaled_probs,
    temperature_fit,
)
from lmadapt.evaluate.metrics import Evaluation


def _ece(logits: np.ndarray, gold: np.ndarray, t: float = 1.0) -> float:
    return expected_calibration_error(scaled_probs(logits, t), gold)


def _confident_errors(seed: int = 0, n: int = 5000, classes: int = 9):
    """NER-like words: 95 % easy O words, right at margin 6; 5 % entities wrongly called O at
    margin 12. The NLL, dominated by the confident errors, is lowest near T = 1.4, which
    softens the many right answers well below their accuracy."""
    rng = np.random.default_rng(seed)
    gold = np.zeros(n, dtype=int)
    logits = rng.normal(0, 0.5, (n, classes))
    logits[:, 0] += 6
    wrong = rng.random(n) < 0.05
    gold[wrong] = rng.integers(1, classes, wrong.sum())
    logits[wrong, 0] += 6
    return logits, gold


def _collapsed(seed: int = 0, n: int = 400):
    """One class for every input (a collapsed fine-tuning run), balanced gold labels."""
    rng = np.random.default_rng(seed)
    logits = np.tile([4.0, 0.0], (n, 1)) + rng.normal(0, 0.3, (n, 2))
    return logits, rng.integers(0, 2, n)


def test_a_temperature_that_raises_dev_ece_is_not_applied():
    logits, gold = _confident_errors()
    fit = temperature_fit(logits, gold)
    assert 1.2 < fit.found < 2  # the NLL minimiser: it lowers the NLL ...
    assert nll(logits, gold, fit.found) < nll(logits, gold)
    assert _ece(logits, gold, fit.found) > 2 * _ece(logits, gold)  # ... and raises the ECE
    assert fit.temperature == 1.0
    assert "raises the dev ECE" in fit.reason


def test_a_collapsed_model_reports_the_bound_instead_of_a_fitted_temperature():
    logits, gold = _collapsed()
    fit = temperature_fit(logits, gold)
    assert fit.found > 19.9  # the NLL keeps falling towards uniform confidences
    assert fit.temperature == 1.0
    assert "the search's bound" in fit.reason and "no" in fit.reason


def test_all_right_predictions_fit_no_temperature():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 200)
    logits = rng.normal(0, 0.3, (200, 3))
    logits[np.arange(200), gold] += 2.0  # every argmax right: the NLL falls as T -> 0
    fit = temperature_fit(logits, gold)
    assert fit.temperature == 1.0 and "too few errors" in fit.reason


@pytest.mark.parametrize("seed", range(12))
def test_the_applied_temperature_never_worsens_dev_nll_or_ece(seed):
    """Random over- and under-confident models, some with confident errors."""
    rng = np.random.default_rng(seed)
    n, classes = 300, int(rng.integers(2, 6))
    gold = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    right = rng.random(n) < rng.uniform(0.5, 0.97)
    logits[np.arange(n), np.where(right, gold, (gold + 1) % classes)] += rng.uniform(0.5, 8)
    logits *= rng.uniform(0.3, 4)
    t = fit_temperature(logits, gold)
    assert nll(logits, gold, t) <= nll(logits, gold)
    assert _ece(logits, gold, t) <= _ece(logits, gold)


@pytest.mark.parametrize("make", [_confident_errors, _collapsed])
def test_every_split_and_the_report_say_why_no_temperature_was_applied(make):
    logits, gold = make()
    evals = {}
    for split in ("dev", "test"):
        ev = Evaluation({"ece": _ece(logits, gold)})
        ev.details |= {
            "logits": logits,
            "gold": gold,
            "reliability": {"bins": [None] * 15},
        }
        evals[split] = ev
    assert fit_on_dev(evals) == 1.0
    for ev in evals.values():
        assert ev.metrics["ece_calibrated"] == pytest.approx(ev.metrics["ece"])
        section = calibration_markdown(ev, "word")
        assert "Temperature scaling not applied (T = 1): " in section
        assert "ECE after temperature scaling" not in section


def test_a_real_miscalibration_is_still_fitted_and_lowers_both():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4000, 4))
    gold = np.array([rng.choice(4, p=p) for p in softmax(logits / 2.5, axis=-1)])
    fit = temperature_fit(logits, gold)
    assert fit.reason is None and fit.temperature == pytest.approx(2.5, rel=0.1)
    assert _ece(logits, gold, fit.temperature) < _ece(logits, gold)
