"""Domain-conditional calibration, template ensembles and the calibration option's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmadapt.errors import ConfigError
from lmadapt.prompting.calibration import calibrate, domain_prior, log_mean
from lmadapt.prompting.config import load_prompt_config
from lmadapt.prompting.modes.classify import score_ensemble, score_seed
from lmadapt.prompting.runner import run_prompt
from lmadapt.prompting.sources import prompt_tasks, read_labelled
from tests.prompting.conftest import prompt_config as _cfg

QUESTION = {"instruction": "Is it positive?", "input": "{text}", "output": "Answer: {label}"}


def test_domain_calibration_balances_a_skewed_toy_case():
    # every input leans to label 0: raw argmax is 0 four times out of four
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    prior = domain_prior(probs)
    np.testing.assert_allclose(prior, [0.75, 0.25])
    # q ∝ p / (0.75, 0.25): (1.2, 0.4), (1.07, 0.8), (0.93, 1.2), (0.8, 1.6) -> labels 0, 0, 1, 1
    q = calibrate(probs, prior)
    np.testing.assert_allclose(q[3], [1 / 3, 2 / 3])
    assert q.argmax(-1).tolist() == [0, 0, 1, 1]
    # an already balanced set is left as it is
    balanced = np.array([[0.9, 0.1], [0.1, 0.9]])
    np.testing.assert_allclose(calibrate(balanced, domain_prior(balanced)), balanced)


def test_log_mean_is_the_renormalised_geometric_mean():
    a, b = np.array([[0.8, 0.2]]), np.array([[0.2, 0.8]])
    np.testing.assert_allclose(log_mean([a, b]), [[0.5, 0.5]])
    c = np.array([[0.5, 0.5]])
    g = np.sqrt(np.array([0.8 * 0.5, 0.2 * 0.5]))
    np.testing.assert_allclose(log_mean([a, c]), [g / g.sum()])


@pytest.mark.parametrize(
    ("given", "kept"), [(True, "contextual"), (False, "none"), ("domain", "domain")]
)
def test_calibration_keeps_the_boolean_spelling(tiny_llama, sst_files, tmp_path, given, kept):
    cfg = load_prompt_config(_cfg(tiny_llama, sst_files, tmp_path, calibration=given))
    assert cfg.calibration == kept


@pytest.mark.parametrize(
    ("over", "field", "message"),
    [
        ({"calibration": "bogus"}, "calibration", "unknown 'bogus'"),
        ({"calibration": "contextual", "mode": "embedding"}, "calibration", "verbalizer"),
        ({"template": []}, "template", "at least one"),
        ({"template": ["sentiment", QUESTION], "mode": "generate"}, "template", "verbalizer"),
    ],
)
def test_config_errors_name_the_field(tiny_llama, sst_files, tmp_path, over, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_prompt_config(_cfg(tiny_llama, sst_files, tmp_path, **over))
    assert err.value.field == field


@pytest.mark.parametrize("calibration", ["contextual", "domain"])
def test_ensemble_averages_each_templates_calibrated_log_probs(
    tiny_llama, sst_files, tmp_path, calibration
):
    cfg = load_prompt_config(_cfg(tiny_llama, sst_files, tmp_path, k=0, calibration=calibration))
    cfg.template = ["sentiment", QUESTION]
    tasks = prompt_tasks(cfg)
    dev, _ = read_labelled(cfg, tasks[0])
    one = [score_seed(cfg, t, dev, [], 0) for t in tasks]
    both = score_ensemble(cfg, tasks, dev, [], 0)
    np.testing.assert_allclose(both.probs, log_mean([s.probs for s in one]))
    np.testing.assert_allclose(both.calibrated, log_mean([s.calibrated for s in one]))
    if calibration == "domain":  # each member divides out its own mean distribution
        for s in one:
            np.testing.assert_allclose(s.calibrated, calibrate(s.probs, s.probs.mean(0)))
    assert not np.allclose(one[0].probs, one[1].probs)  # the templates do differ


def test_run_prompt_with_an_ensemble_and_domain_calibration(tiny_llama, sst_files, tmp_path):
    cfg = _cfg(
        tiny_llama, sst_files, tmp_path, k=0, calibration="domain", template=["sentiment", QUESTION]
    )
    metrics = run_prompt(cfg)
    assert metrics["calibration"] == "domain" and metrics["templates"] == 2
    assert set(metrics["summary"]) == {"uncalibrated", "calibrated"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "sentiment, inline" in report
    rows = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 16 and "probabilities_calibrated" in json.loads(rows[0])
