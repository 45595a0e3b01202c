"""Continual-learning parts: metrics on a hand matrix, EWC penalty shape, reservoir uniformity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lmadapt.continual.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
)
from lmadapt.continual.strategies import STRATEGIES, build_strategy
from lmadapt.continual.strategies.base import trainable_named
from lmadapt.continual.strategies.replay import Reservoir
from lmadapt.schema import parse_section

NAN = math.nan


def test_metrics_on_a_hand_matrix():
    R = np.array([[0.9, NAN, NAN], [0.8, 0.85, NAN], [0.7, 0.8, 0.95]])
    at = [0, 1, 2]
    assert average_accuracy(R) == pytest.approx((0.7 + 0.8 + 0.95) / 3)
    assert backward_transfer(R, at) == pytest.approx(((0.7 - 0.9) + (0.8 - 0.85)) / 2)
    assert forgetting(R, at) == pytest.approx([0.2, 0.05, None])
    assert average_forgetting(R, at) == pytest.approx(0.125)


def test_metrics_when_a_task_is_revisited():
    # steps: A, B, A again -> A's reference is step 2, B's step 1; forgetting uses every row
    R = np.array([[0.6, NAN], [0.5, 0.9], [0.8, 0.7]])
    at = [2, 1]
    assert backward_transfer(R, at) == pytest.approx(0.7 - 0.9)
    assert forgetting(R, at) == pytest.approx([None, 0.2])


def _strategy(name, **kw):
    return build_strategy(parse_section(STRATEGIES, "name", {"name": name, **kw}, "strategy"))


def test_ewc_penalty_is_zero_at_anchor_and_quadratic_in_the_offset():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    params = trainable_named(model)
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    ewc = _strategy("ewc", strength=3.0)
    ewc.consolidate(params, fisher)
    assert float(ewc.penalty().detach()) == 0.0
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    anchor = {n: p.detach().clone() for n, p in params.items()}

    def at(scale):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(anchor[n] + scale * direction[n])
        return float(ewc.penalty().detach())

    p1, p2 = at(0.1), at(0.2)
    assert p1 > 0 and p2 == pytest.approx(4 * p1, rel=1e-5)
    expected = 0.5 * 3.0 * sum(float((fisher[n] * (0.2 * direction[n]) ** 2).sum()) for n in params)
    assert p2 == pytest.approx(expected, rel=1e-5)


def test_online_ewc_folds_the_fisher_with_gamma():
    model = torch.nn.Linear(2, 1)
    params = trainable_named(model)
    ewc = _strategy("ewc", gamma=0.5)
    ones = {n: torch.ones_like(p) for n, p in params.items()}
    ewc.consolidate(params, ones)
    ewc.consolidate(params, ones)
    assert all(torch.allclose(f, torch.full_like(f, 1.5)) for f in ewc.fisher.values())


def test_l2_penalty_is_half_lambda_squared_distance():
    model = torch.nn.Linear(3, 1)
    l2 = _strategy("l2", strength=2.0)
    assert l2.penalty() is None  # no previous task yet
    l2.anchor.set(trainable_named(model))
    with torch.no_grad():
        model.weight += 0.5
    assert float(l2.penalty().detach()) == pytest.approx(0.5 * 2.0 * 3 * 0.25)


def test_reservoir_keeps_a_uniform_sample():
    stream, capacity, runs = 40, 8, 4000
    counts = np.zeros(stream)
    for seed in range(runs):
        r = Reservoir(capacity, seed)
        for item in range(stream):
            r.add(item)
        assert len(r) == capacity and r.seen == stream and len(set(r.items)) == capacity
        counts[r.items] += 1
    expected = runs * capacity / stream
    chi2, p = stats.chisquare(counts, np.full(stream, expected))
    assert p > 0.01, (chi2, p)
    # a biased "keep the first N" buffer fails the same test
    biased = np.zeros(stream)
    biased[:capacity] = runs
    assert stats.chisquare(biased, np.full(stream, expected))[1] < 1e-6


def test_strategy_config_errors_name_the_field():
    from lmadapt.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.buffer_size"):
        _strategy("replay", buffer_size=0)
    with pytest.raises(ConfigError, match="strategy.name"):
        parse_section(STRATEGIES, "name", {"name": "magic"}, "strategy")


def test_a_task_without_a_head_is_refused_at_config_time():
    """A generation task has no head over a shared backbone: the multi-head learner would fail
    mid-stream, so the config is refused before anything runs, naming the field."""
    from lmadapt.continual.config import build_continual_config
    from lmadapt.errors import ConfigError

    stream = [{"name": "qa", "task": {"type": "generation"}, "data": {"train": "t", "dev": "d"}}]
    with pytest.raises(ConfigError, match=r"stream\[0\]\.task\.type.*classification") as e:
        build_continual_config({"model": "smollm2-135m-instruct", "stream": stream})
    assert "token_classification" in str(e.value)


def test_gradient_checkpointing_is_refused_not_ignored():
    """continual builds its own multi-head learner, which does not checkpoint: asking for it is
    a config error naming the entry, not a setting silently dropped."""
    from lmadapt.continual.config import build_continual_config
    from lmadapt.errors import ConfigError

    stream = [{"name": "s", "task": {"type": "classification"}, "data": {"train": "t", "dev": "d"}}]
    with pytest.raises(ConfigError, match=r"stream\[0\]\.train\.gradient_checkpointing"):
        build_continual_config(
            {"model": "minilm", "train": {"gradient_checkpointing": True}, "stream": stream}
        )
