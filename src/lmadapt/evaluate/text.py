"""Scores of generated text against references: one answer normalisation for every exact match
(generation runs, prompting's QA mode), ROUGE-L (rouge-score) and corpus BLEU (sacrebleu)."""

from __future__ import annotations

import re
import string

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The form two answers are compared in. A number by its value ('1,000.' and '1000', '5.00'
    and '5', '$12' and '12'); other text as SQuAD's evaluation script does it (lower case, no
    punctuation, no articles, single spaces)."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        number = float(s)
    except ValueError:
        text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())
    return str(int(number)) if number.is_integer() else repr(number)


def exact_match(predictions: list[str | None], references: list[str | None]) -> float:
    """Share of predictions equal to their reference once normalised (None never matches)."""
    return float(
        np.mean(
            [
                p is not None and r is not None and normalize_answer(p) == normalize_answer(r)
                for p, r in zip(predictions, references)
            ]
        )
    )


def overlap_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L F1 and corpus BLEU of the predictions against one reference each."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {
        "rougeL": float(np.mean(rouge)),
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
    }
