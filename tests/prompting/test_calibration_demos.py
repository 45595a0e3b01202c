"""Contextual calibration on a hand example; demonstration selection."""

from __future__ import annotations

import numpy as np
import pytest

from lmadapt.prompting.calibration import calibrate, content_free_prior
from lmadapt.prompting.demos import SELECTORS, nearest
from lmadapt.tasks.classification import Example


def test_contextual_calibration_hand_example():
    # content-free inputs lean 3:1 towards label 0: p_cf = (0.75, 0.25)
    cf = np.log(np.array([[0.7, 0.3], [0.8, 0.2], [0.75, 0.25]]))
    p_cf = content_free_prior(cf)
    np.testing.assert_allclose(p_cf, [0.75, 0.25])
    # W = diag(p_cf)^-1: (0.6, 0.4) -> (0.8, 1.6) -> normalised (1/3, 2/3): the argmax flips
    q = calibrate(np.array([[0.6, 0.4], [0.75, 0.25]]), p_cf)
    np.testing.assert_allclose(q, [[1 / 3, 2 / 3], [0.5, 0.5]])


def test_knn_picks_the_nearest_last():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert nearest(pool, query, 2) == [[3, 0], [2, 1]]


def test_knn_selector_uses_the_embedding():
    pool = [Example("a", label="x"), Example("b", label="y"), Example("c", label="x")]
    vec = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.7, 0.7], "q": [0.1, 0.99]}

    def embed(texts):
        return np.array([vec[t] for t in texts])

    sel = SELECTORS.get("knn").impl(pool, [Example("q")], 2, 0, embed)
    assert sel == [[2, 1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_has_no_majority_and_is_seeded(seed):
    pool = [Example(str(i), label="pos" if i % 4 else "neg") for i in range(40)]
    pick = SELECTORS.get("balanced").impl
    sel = pick(pool, [], 8, seed, None)[0]
    assert len(set(sel)) == 8
    assert sorted(pool[i].label for i in sel).count("neg") == 4
    assert pick(pool, [], 8, seed, None) == [sel]
    assert SELECTORS.get("random").impl(pool, [], 8, seed, None) == SELECTORS.get("random").impl(
        pool, [], 8, seed, None
    )
