"""Perturbations for the robustness evaluation (`lmadapt.evaluate.robustness`): light enough
for the run config to check `report.perturbations` against without loading the evaluation.

Each perturbation is named, seeded and label-preserving: typos (adjacent swap, dropped character,
QWERTY keyboard neighbour) at two rates, lower and upper case, punctuation stripped, words dropped,
and whitespace noise. The task decides what of an example is perturbed (`task.perturbed`): the
texts of a classification example, the words tagged O of a NER sentence (entity-preserving), and
what counts as a changed prediction (`task.robustness_views`): the label; the entities by type and
source words, so that a respelt word inside an unchanged entity is no flip.

Rates are shares of the words a perturbation may change (every word of a classification text; the
O words of a NER sentence), counted with nlpaug's rule: ceil(rate x words), so a short text gets
at least one edit. A typo edits one character of a chosen word, and only of a word of 4 or more
characters (nlpaug's default, so that short function words are left alone).

Typos and word choice come from nlpaug; case, punctuation and whitespace are plain string
operations, written here (nlpaug has no augmenter for them). nlpaug draws from Python's `random`
and numpy's global RNG: each call seeds both from (seed, perturbation, example) and puts back
whatever state they had, so results do not depend on the order of examples and a run's own
random streams are untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmadapt.errors import LmadaptError

TYPO_RATES = (0.05, 0.2)
"""The two typo rates: the share of the words that may change that get one typo. 5% is about one
typo per sentence (the count is rounded up); 20% is one word in five."""
WORD_DROP_RATE = 0.1
"""The share of the words that may change that `word_drop` removes."""
WHITESPACE_RATE = 0.5
"""The share of the spaces between words that `whitespace` replaces with a run of noise."""
WHITESPACE_NOISE = ("  ", "\t", "\n", " \t ", "   ", " \n ")

SEP = "\x00"
"""Joins words for nlpaug, which splits them back on it: no word holds it, and str.strip (which
nlpaug applies to its input) keeps it, unlike whitespace-like separators."""


@dataclass
class Words:
    """A text as words and the whitespace after each, with the words that must not change."""

    words: list[str]
    gaps: list[str]
    """Whitespace after each word (what the `whitespace` perturbation changes)."""
    fixed: list[bool]
    """Words never changed or dropped (in NER, the words of entities)."""
    origin: list[int]
    """Each word's index among the unperturbed words (so that NER tags follow dropped words)."""
    lead: str = ""
    """Whitespace before the first word."""

    @classmethod
    def of_text(cls, text: str) -> Words:
        parts = re.findall(r"(\S+)(\s*)", text)
        n = len(parts)
        return cls(
            [w for w, _ in parts],
            [g for _, g in parts],
            [False] * n,
            list(range(n)),
            text[: len(text) - len(text.lstrip())],
        )

    @classmethod
    def of_words(cls, words: list[str], fixed: list[bool]) -> Words:
        return cls(list(words), [" "] * len(words), list(fixed), list(range(len(words))))

    def text(self) -> str:
        return self.lead + "".join(w + g for w, g in zip(self.words, self.gaps))

    def editable(self) -> list[int]:
        return [i for i, f in enumerate(self.fixed) if not f]

    def with_words(self, new: list[str]) -> Words:
        """`new[i]` replaces word i; a word left empty is dropped with the whitespace after it
        (a fixed word always stays as it was). A text is never left without words: then it
        stays as it was."""
        new = [w if f else n for w, n, f in zip(self.words, new, self.fixed)]
        keep = [i for i, w in enumerate(new) if w]
        if not keep:
            return self
        return Words(
            [new[i] for i in keep],
            [self.gaps[i] for i in keep],
            [self.fixed[i] for i in keep],
            [self.origin[i] for i in keep],
            self.lead,
        )


@dataclass(frozen=True)
class Perturbation:
    name: str
    about: str
    """What it does, as the report says it."""
    apply: Callable[[Words, int], Words]
    """(words, seed) -> perturbed words; the same seed gives the same result."""
    spacing: bool = False
    """Whether it changes only the whitespace between words (nothing to change in words that
    reach the model already split, as NER's do)."""

    def seed(self, *key: int) -> int:
        """A seed of its own for one example: (run seed, example index, part) and the name."""
        seq = np.random.SeedSequence([zlib.crc32(self.name.encode()), *key])
        return int(seq.generate_state(1)[0])

    def on_text(self, text: str, *key: int) -> str:
        """`text` perturbed, its own whitespace kept where the perturbation does not change it."""
        return self.apply(Words.of_text(text), self.seed(*key)).text()

    def on_words(self, words: list[str], fixed: list[bool], *key: int) -> Words:
        """Pre-split words perturbed, `fixed` ones untouched; `origin` maps the result back."""
        return self.apply(Words.of_words(words, fixed), self.seed(*key))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's and numpy's global RNGs seeded for one call, then restored as they were."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _split(text: str) -> list[str]:
    return text.split(SEP)


def _join(tokens: list[str]) -> str:
    return SEP.join(tokens)


@functools.cache
def _typist(action: str, rate: float) -> Any:
    """An nlpaug character augmenter: `rate` of the words it is given get one typo each."""
    import nlpaug.augmenter.char as nac  # imports torch and transformers: only when used

    common = {
        "aug_word_p": rate,
        "aug_word_max": None,  # nlpaug caps at 10 words by default; the rate alone decides
        "aug_char_min": 1,
        "aug_char_max": 1,
        "tokenizer": _split,
        "reverse_tokenizer": _join,
    }
    if action == "keyboard":
        # nlpaug's QWERTY neighbours of a letter or digit, with or without shift (without upper
        # case it could not touch a capital, so no all-caps headline); never a symbol.
        return nac.KeyboardAug(include_special_char=False, **common)
    return nac.RandomCharAug(action=action, **common)


@functools.cache
def _word_dropper(rate: float) -> Any:
    import nlpaug.augmenter.word as naw

    return naw.RandomWordAug(
        action="delete", aug_p=rate, aug_max=None, tokenizer=_split, reverse_tokenizer=_join
    )


def _typos(action: str, rate: float) -> Callable[[Words, int], Words]:
    def apply(w: Words, seed: int) -> Words:
        idx = w.editable()
        if not idx:
            return w
        with seeded(seed):
            out = _split(_typist(action, rate).augment(_join([w.words[i] for i in idx]))[0])
        new = list(w.words)
        for i, word in zip(idx, out, strict=True):
            new[i] = word
        return w.with_words(new)

    return apply


def _word_drop(rate: float) -> Callable[[Words, int], Words]:
    def apply(w: Words, seed: int) -> Words:
        idx = w.editable()
        if not idx:
            return w
        # nlpaug is handed the words' positions rather than the words, so that it is known which
        # ones it dropped: their whitespace (and, in NER, their tags) goes with them.
        with seeded(seed):
            kept = _split(_word_dropper(rate).augment(_join([str(i) for i in idx]))[0])
        gone = set(idx) - {int(k) for k in kept}
        return w.with_words(["" if i in gone else t for i, t in enumerate(w.words)])

    return apply


# Case, punctuation and whitespace: string operations written here, nlpaug has no augmenter
# for them.
def _recase(fn: Callable[[str], str]) -> Callable[[Words, int], Words]:
    def apply(w: Words, seed: int) -> Words:
        return w.with_words([fn(t) for t in w.words])

    return apply


def _strip_punctuation(w: Words, seed: int) -> Words:
    """Unicode punctuation (categories P*) removed; a word of punctuation alone goes."""
    return w.with_words(
        ["".join(c for c in t if not unicodedata.category(c).startswith("P")) for t in w.words]
    )


def _whitespace(w: Words, seed: int) -> Words:
    rng = np.random.default_rng(seed)
    gaps = list(w.gaps)
    for i in range(len(gaps) - 1):  # between words only
        if rng.random() < WHITESPACE_RATE:
            gaps[i] = WHITESPACE_NOISE[rng.integers(len(WHITESPACE_NOISE))]
    return dataclasses.replace(w, gaps=gaps)


def _perturbations() -> dict[str, Perturbation]:
    out = []
    for rate in TYPO_RATES:
        pct = round(100 * rate)
        out += [
            Perturbation(
                f"typo_swap_{pct}",
                f"{pct}% of words: two adjacent characters swapped",
                _typos("swap", rate),
            ),
            Perturbation(
                f"typo_delete_{pct}",
                f"{pct}% of words: one character dropped",
                _typos("delete", rate),
            ),
            Perturbation(
                f"typo_keyboard_{pct}",
                f"{pct}% of words: one character replaced by a keyboard neighbour",
                _typos("keyboard", rate),
            ),
        ]
    pct = round(100 * WORD_DROP_RATE)
    out += [
        Perturbation("lowercase", "every word lower-cased", _recase(str.lower)),
        Perturbation("uppercase", "every word upper-cased", _recase(str.upper)),
        Perturbation("no_punctuation", "punctuation removed", _strip_punctuation),
        Perturbation(f"word_drop_{pct}", f"{pct}% of words dropped", _word_drop(WORD_DROP_RATE)),
        Perturbation(
            "whitespace",
            f"{round(100 * WHITESPACE_RATE)}% of spaces become runs of spaces, tabs, newlines",
            _whitespace,
            spacing=True,
        ),
    ]
    return {p.name: p for p in out}


PERTURBATIONS: dict[str, Perturbation] = _perturbations()


def select(names: list[str] | None, seed: int = 0) -> list[Perturbation]:
    """The named perturbations in the order given (every one for None); an unknown name is an
    error that lists the known ones, and so is a seed they cannot take (< 0)."""
    if seed < 0:
        raise LmadaptError(f"the perturbation seed must be >= 0, got {seed}")
    if names is None:
        return list(PERTURBATIONS.values())
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise LmadaptError(
            f"unknown perturbation {unknown[0]!r}; known: {', '.join(PERTURBATIONS)}"
        )
    if not names:
        raise LmadaptError("no perturbation selected")
    return [PERTURBATIONS[n] for n in dict.fromkeys(names)]
