"""Scores of generated text against references: one answer normalisation for every exact match
(generation runs, prompting's QA mode), ROUGE-L (rouge-score) and corpus BLEU (sacrebleu)."""

from __future__ import annotations

import re
import string
from collections import Counter

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
        return squad_normalize(text)
    return str(int(number)) if number.is_integer() else repr(number)


def squad_normalize(text: str) -> str:
    """SQuAD's official answer normalisation (evaluate-v1.1.py / v2.0): lower case, punctuation
    and the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_exact(prediction: str, reference: str) -> float:
    """SQuAD exact match of one prediction against one reference (official normalisation)."""
    return float(squad_normalize(prediction) == squad_normalize(reference))


def squad_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 of one prediction against one reference, as the official script
    computes it (an empty answer scores 1 against an empty reference, else 0)."""
    pred, gold = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


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
