"""Error-analysis helpers: ranking, length slices, escaped example tables."""

from __future__ import annotations

import numpy as np

from lmadapt.evaluate.errors import examples_markdown, length_slices, ranked, slices_markdown


def test_ranked_keeps_only_masked_entries_in_score_order():
    scores = [0.2, 0.9, 0.5, 0.9, 0.1]
    keep = [True, True, False, True, True]
    assert ranked(scores, keep) == [1, 3, 0, 4]  # the tie keeps input order
    assert ranked(scores, keep, k=2, highest=False) == [4, 0]
    assert ranked(scores, [False] * 5) == []


def test_length_slices_are_quartiles_with_their_metric():
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]
    correct = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    slices = length_slices(lengths, lambda idx: correct[idx].mean())
    assert [(s["shortest"], s["longest"], s["count"]) for s in slices] == [
        (1, 2, 2),
        (3, 4, 2),
        (5, 6, 2),
        (7, 8, 2),
    ]
    assert [s["value"] for s in slices] == [1.0, 0.5, 0.0, 0.5]
    table = slices_markdown(slices, "words", "accuracy")
    assert "| 1–2 | 2 | 1.0000 |" in table and "length (words)" in table


def test_equal_lengths_make_one_slice():
    (only,) = length_slices([5, 5, 5], lambda idx: len(idx))
    assert (only["shortest"], only["longest"], only["count"], only["value"]) == (5, 5, 3, 3.0)
    assert "| 5 | 3 |" in slices_markdown([only], "words", "n")
    assert length_slices([], lambda idx: 0.0) == []


def test_example_cells_are_escaped():
    rows = [{"text": "a | b\nc", "confidence": 0.91234}]
    table = examples_markdown(rows, ["text", "confidence"])
    assert table.splitlines()[-1] == "| a \\| b c | 0.9123 |"
    assert examples_markdown([], ["text"]) == "_none_"
