"""Entity-level metrics for IOB2 tag sequences (seqeval), shared by anything that tags words.

Chunking follows seqeval exactly, in conlleval's lenient mode or strict IOB2, so that entities a
task decodes are the ones its metrics counted.
"""

from __future__ import annotations

import warnings

import numpy as np

from lmadapt.evaluate.metrics import Evaluation


def entities(tags: list[str], strict: bool = False) -> list[tuple[str, int, int]]:
    """(type, start, end) word spans, end exclusive, as seqeval counts them.

    Lenient (conlleval): an I-X that does not continue an X entity opens one. Strict IOB2: such
    an I-X is not part of any entity.
    """
    out: list[tuple[str, int, int]] = []
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, t = ("O", None) if tag == "O" else (tag[0], tag[2:])
        if prefix == "I" and t == kind:
            continue
        if kind is not None:
            out.append((kind, start, i))
        kind, start = (t, i) if prefix == "B" or (prefix == "I" and not strict) else (None, i)
    return out


def sequence_metrics(
    gold: list[list[str]], pred: list[list[str]], labels: list[str], strict: bool = False
) -> Evaluation:
    """Entity precision/recall/F1 (seqeval micro, macro, per type) and word-level accuracy."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    types = sorted({t[2:] for t in labels if t != "O"})
    per_type = {k: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for k in types}
    micro = {"precision": 0.0, "recall": 0.0, "f1-score": 0.0}
    macro = 0.0
    if any(t != "O" for seq in gold + pred for t in seq):  # seqeval divides by zero otherwise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rep = classification_report(
                gold,
                pred,
                output_dict=True,
                zero_division=0,
                mode="strict" if strict else None,
                scheme=IOB2 if strict else None,
            )
        micro, macro = rep["micro avg"], rep["macro avg"]["f1-score"]
        for k, v in rep.items():
            if not k.endswith(" avg"):
                per_type[k] = {
                    "precision": float(v["precision"]),
                    "recall": float(v["recall"]),
                    "f1": float(v["f1-score"]),
                    "support": int(v["support"]),
                }
    flat_gold = [t for seq in gold for t in seq]
    flat_pred = [t for seq in pred for t in seq]
    index = {t: i for i, t in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=int)
    for g, p in zip(flat_gold, flat_pred):
        cm[index[g], index[p]] += 1
    metrics = {
        "f1": float(micro["f1-score"]),
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "macro_f1": float(macro),
        "accuracy": float(np.mean([g == p for g, p in zip(flat_gold, flat_pred)]))
        if flat_gold
        else 0.0,
    }
    details = {"per_type": per_type, "labels": labels, "confusion_matrix": cm.tolist()}
    return Evaluation(metrics, details)
