"""Error analysis shared by tasks: predictions ranked by confidence or by how wrong they are, and
a metric per slice of input length, with the markdown tables report.md shows them in.

Tasks compute the per-example numbers (confidence, correctness, error counts) and the metric of a
slice; this module only ranks, slices and renders, so every task reports them the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmadapt.evaluate.report import cell, markdown_table

TOP_K = 10
"""Examples listed per ranking in report.md."""
LENGTH_SLICES = 4
"""Length slices: quartiles of the lengths."""


def ranked(
    scores: Sequence[float], keep: Sequence[bool], k: int = TOP_K, highest: bool = True
) -> list[int]:
    """Indices of the (at most) `k` kept entries with the highest (or lowest) score; ties keep
    input order, so the listing is reproducible."""
    values = np.asarray(scores, dtype=float)
    order = np.argsort(-values if highest else values, kind="stable")
    kept = np.asarray(keep, dtype=bool)
    return [int(i) for i in order if kept[i]][:k]


def length_slices(
    lengths: Sequence[int], metric: Callable[[np.ndarray], float], n: int = LENGTH_SLICES
) -> list[dict[str, Any]]:
    """`metric` of each slice of examples by length, cut at the length quantiles (quartiles by
    default; slices merge where quantiles coincide). Each slice: its length range (`shortest`,
    `longest`, as found in it), `count` and `value`, given the slice's example indices."""
    sizes = np.asarray(lengths)
    if not len(sizes):
        return []
    cuts = np.unique(np.quantile(sizes, [q / n for q in range(1, n)]))
    which = np.searchsorted(cuts, sizes, side="right")
    out = []
    for s in range(len(cuts) + 1):
        idx = np.flatnonzero(which == s)
        if len(idx):
            out.append(
                {
                    "shortest": int(sizes[idx].min()),
                    "longest": int(sizes[idx].max()),
                    "count": len(idx),
                    "value": float(metric(idx)),
                }
            )
    return out


def slices_markdown(slices: list[dict[str, Any]], unit: str, metric: str) -> str:
    """A table of `length_slices`, lengths counted in `unit` (e.g. 'words')."""
    rows = [
        [
            f"{s['shortest']}"
            if s["shortest"] == s["longest"]
            else f"{s['shortest']}–{s['longest']}",
            s["count"],
            f"{s['value']:.4f}",
        ]
        for s in slices
    ]
    return markdown_table([f"length ({unit})", "count", metric], rows)


def examples_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Listed examples as a table, every value one escaped cell (free text may hold | or
    newlines); floats to 4 decimals; `_none_` when nothing qualifies."""
    if not rows:
        return "_none_"

    def show(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else cell(v)

    return markdown_table(columns, [[show(r[c]) for c in columns] for r in rows])
