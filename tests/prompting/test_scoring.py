"""Prefix-cache reuse gives the scores of plain, unpadded, uncached forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmadapt.prompting.scoring import Group, PrefixScorer, without_reuse
from lmadapt.prompting.verbalizers import Verbalizer


def _reference(model, groups, conts) -> np.ndarray:
    """One full forward pass per (query, continuation): the definition of the score."""
    rows = []
    with torch.no_grad():
        for g in groups:
            for q in g.queries:
                row = []
                for c in conts:
                    ids = torch.tensor([g.prefix + q + c])
                    lp = model(ids).logits.log_softmax(-1)[0]
                    n = len(g.prefix + q)
                    row.append(sum(float(lp[n - 1 + t, c[t]]) for t in range(len(c))))
                rows.append(row)
    return np.array(rows)


@pytest.fixture
def case(tiny_lm):
    model, tok = tiny_lm

    def enc(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    groups = [
        Group(
            enc("Classify the sentiment.\n\nReview: the film was good\nSentiment: positive\n\n"),
            [
                enc("Review: the plot was bad\nSentiment:"),
                enc("Review: great\nSentiment:"),
                enc("N/A"),
            ],
        ),
        Group(enc("Review: dull\n\n"), [enc("Review: the cast was lovely and fine\nSentiment:")]),
    ]
    conts = [enc(" positive"), enc("positive"), enc(" terrible great")]
    return model, tok, groups, conts


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_prefix_reuse_matches_no_reuse_and_reference(case, batch_size):
    model, tok, groups, conts = case
    assert {len(c) for c in conts} != {1}, "the case must exercise multi-token verbalizers"
    scorer = PrefixScorer(model, tok.pad_token_id, batch_size)
    reused = scorer.score(groups, conts)
    plain = scorer.score(without_reuse(groups), conts)
    ref = _reference(model, groups, conts)
    np.testing.assert_allclose(reused, plain, atol=1e-5)
    np.testing.assert_allclose(reused, ref, atol=1e-5)


def test_multi_token_verbalizer_label_scores(tiny_lm):
    _, tok = tiny_lm
    v = Verbalizer.from_config({"neg": ["terrible", "bad"], "pos": "positive"})
    conts = v.tokenize(tok, lambda w: w)  # no space: "positive" is 3 tokens here
    assert conts.owner == [0, 0, 1]
    assert not conts.single_token
    logprobs = torch.log(torch.tensor([[0.1, 0.2, 0.3]]))
    scores = conts.label_scores(logprobs)
    np.testing.assert_allclose(scores.exp().numpy(), [[0.3, 0.3]], rtol=1e-6)
    lengths = conts.lengths
    norm = conts.label_scores(logprobs, normalize=True)
    expect_pos = float(logprobs[0, 2] / lengths[2])
    assert float(norm[0, 1]) == pytest.approx(expect_pos)
