"""Confidence calibration of predicted distributions (a text's label, a word's tag): expected
calibration error, reliability diagram data and temperature scaling, as in Guo et al. 2017, "On
Calibration of Modern Neural Networks" (ICML): top-label confidence, M equal-width bins (15
there), one temperature T fitted by minimising the dev negative log-likelihood of
softmax(logits / T).

Hand-written because it is a few lines over numpy/scipy: scikit-learn calibrates with Platt or
isotonic regression (not one temperature over softmax logits), and the libraries that do
temperature scaling bring a framework of their own for a one-parameter fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from lmadapt.errors import LmadaptError
from lmadapt.evaluate import plots
from lmadapt.evaluate.metrics import Evaluation

N_BINS = 15
"""Guo et al. 2017's bin count."""
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
"""Temperatures searched: far wider than the 1-3 Guo et al. report for over-confident nets, so
an optimum on either edge is no calibration to apply (see `temperature_fit`)."""
_EDGE = 1e-3
"""How close to a bound of log T the search must end to count as having run into it."""


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


@dataclass(frozen=True)
class TemperatureFit:
    """The temperature to apply and, when it is 1 rather than the NLL minimiser, why."""

    temperature: float
    found: float
    """The T the search settled on (equal to `temperature` when it is kept)."""
    reason: str | None = None
    """Why `found` was not kept; None when it was."""


def temperature_fit(logits: np.ndarray, gold: np.ndarray) -> TemperatureFit:
    """Fit T on (N, C) dev `logits` against `gold` by minimising the NLL of softmax(logits / T).

    The NLL is convex in 1/T, so the bounded search over log T finds its one minimum. That
    minimum is kept only when it helps on the data it was fitted on: inside the bounds,
    lowering the NLL and not raising the ECE; otherwise T stays 1, with the reason.
    Why each can fail (see tests/evaluate/test_calibration_fit.py):
    - the upper bound: the NLL falls with T, towards log C, for as long as the gold label's
      logit is on average barely above (or below) the mean logit, which is what a collapsed
      model (one class for every input, accuracy near chance) or one whose rare errors are
      far more confident than its right answers gives: its best T is huge or infinite, i.e.
      uniform confidences, and the old fit reported the bound (T = 19.9999) as if fitted;
    - the lower bound: the NLL falls towards 0 as T shrinks when every prediction is right;
    - the ECE: a few confident errors can dominate the NLL, and the T that pays for them
      softens the many confident, right predictions below their accuracy (NER's O words).
    """
    logits = np.asarray(logits, dtype=np.float64)
    found = minimize_scalar(
        lambda log_t: nll(logits, gold, float(np.exp(log_t))), bounds=LOG_T_BOUNDS, method="bounded"
    )
    t = float(np.exp(found.x))

    def keep_one(reason: str) -> TemperatureFit:
        return TemperatureFit(1.0, t, reason)

    low, high = (float(np.exp(b)) for b in LOG_T_BOUNDS)
    if found.x > LOG_T_BOUNDS[1] - _EDGE:
        return keep_one(
            f"the dev NLL still falls at T = {high:g}, the search's bound: flattening every "
            "confidence towards uniform keeps helping, so on dev the logits carry almost no "
            "signal about the gold label (a collapsed model, or errors far more confident than "
            "its right answers)"
        )
    if found.x < LOG_T_BOUNDS[0] + _EDGE:
        return keep_one(
            f"the dev NLL still falls at T = {low:g}, the search's bound: sharpening every "
            "confidence towards 1 keeps helping, as when (nearly) every dev prediction is "
            "right, so there are too few errors to fit a temperature on"
        )
    before, after = nll(logits, gold), nll(logits, gold, t)
    if not after < before:
        return keep_one(f"no temperature lowers the dev NLL ({before:.4f} at T = 1)")
    ece_before = expected_calibration_error(scaled_probs(logits, 1.0), gold)
    ece_after = expected_calibration_error(scaled_probs(logits, t), gold)
    if ece_after > ece_before:
        return keep_one(
            f"T = {t:.4f} lowers the dev NLL ({before:.4f} to {after:.4f}) but raises the dev "
            f"ECE ({ece_before:.4f} to {ece_after:.4f})"
        )
    return TemperatureFit(t, t)


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    """The temperature `temperature_fit` keeps: never worse than 1 on the fitting data."""
    return temperature_fit(logits, gold).temperature


# ---------------------------------------------------------------------- on evaluations
# What a task that predicts one distribution per item (a text, a word) reports and fits.


def add_calibration(
    ev: Evaluation, logits: np.ndarray, gold: np.ndarray, temperature: float | None = None
) -> None:
    """`ece` and reliability of (N, C) `logits` against (N,) gold indices into `ev`, keeping
    both for fitting; with a fitted `temperature`, the calibrated ECE too."""
    rel = reliability(softmax(np.asarray(logits, dtype=np.float64), axis=-1), gold)
    ev.metrics["ece"] = rel["ece"]
    ev.details |= {"logits": logits, "gold": gold, "reliability": rel}
    if temperature is not None:
        add_calibrated(ev, temperature)


def add_calibrated(ev: Evaluation, temperature: float) -> None:
    """`ece_calibrated` and its reliability under `temperature` into `ev` (see add_calibration)."""
    rel = reliability(scaled_probs(ev.details["logits"], temperature), ev.details["gold"])
    ev.metrics["ece_calibrated"] = rel["ece"]
    ev.details |= {"reliability_calibrated": rel, "temperature": temperature}


def fit_on_dev(evaluations: dict[str, Evaluation]) -> float | None:
    """The temperature fitted on the dev evaluation's kept logits (see `temperature_fit`), its
    effect, and why a found one was not kept, added to every evaluation; None without a dev
    evaluation that kept them."""
    dev = evaluations.get("dev")
    if dev is None or "logits" not in dev.details:
        return None
    fit = temperature_fit(dev.details["logits"], dev.details["gold"])
    for ev in evaluations.values():
        add_calibrated(ev, fit.temperature)
        if fit.reason:
            ev.details["temperature_kept_at_one"] = fit.reason
    return fit.temperature


def require_fitted(temperature: float | None) -> float:
    """The fitted temperature that `task.calibrate` applies, refused in one line when the run
    has none."""
    if temperature is None:
        raise LmadaptError(
            "task.calibrate is true but this run has no fitted temperature (it was trained "
            "without a dev set); set task.calibrate to false in its config.yaml"
        )
    return temperature


def calibration_markdown(ev: Evaluation, unit: str) -> str:
    """report.md section: ECE before and after temperature scaling, `unit` naming what one
    prediction is (e.g. 'text', 'word')."""
    m, d = ev.metrics, ev.details
    lines = [
        "### Calibration",
        "",
        f"Expected calibration error of the top-label confidence, one prediction per {unit} "
        f"({len(d['reliability']['bins'])} equal-width bins, Guo et al. 2017).",
        "",
        f"- ECE: {m['ece']:.4f}",
    ]
    if "temperature_kept_at_one" in d:
        lines.append(f"- Temperature scaling not applied (T = 1): {d['temperature_kept_at_one']}.")
    elif d.get("temperature") == 1.0:  # a saved run's: its own report.md says why
        lines.append("- Temperature scaling not applied (T = 1, as the fit on dev decided).")
    elif "ece_calibrated" in m:
        lines.append(
            f"- ECE after temperature scaling (T = {d['temperature']:.4f}, fitted on dev): "
            f"{m['ece_calibrated']:.4f}"
        )
    return "\n".join(lines)


def reliability_plot(ev: Evaluation, out_dir: Path, prefix: str) -> list[Path]:
    """`<prefix>reliability.png`: the model's reliability diagram, and the temperature-scaled
    one beside it once fitted; nothing where the evaluation has no calibration data."""
    d = ev.details
    if "reliability" not in d:
        return []
    panels = {"model": d["reliability"]}
    if "reliability_calibrated" in d and d["temperature"] != 1.0:
        panels[f"T = {d['temperature']:.3f}"] = d["reliability_calibrated"]
    path = out_dir / f"{prefix}reliability.png"
    plots.reliability_diagram(panels, path, title=f"{prefix}reliability diagram")
    return [path]
