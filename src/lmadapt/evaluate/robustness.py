"""Robustness: how a trained model's score and predictions move when its inputs are perturbed.

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
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from lmadapt.errors import LmadaptError
from lmadapt.evaluate.report import cell, markdown_table
from lmadapt.inference import Encoded

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    import torch

    from lmadapt.evaluate.metrics import Evaluation
    from lmadapt.tasks.base import Task

TYPO_RATES = (0.05, 0.2)
"""The two typo rates: the share of the words that may change that get one typo. 5% is about one
typo per sentence (the count is rounded up); 20% is one word in five."""
WORD_DROP_RATE = 0.1
"""The share of the words that may change that `word_drop` removes."""
WHITESPACE_RATE = 0.5
"""The share of the spaces between words that `whitespace` replaces with a run of noise."""
WHITESPACE_NOISE = ("  ", "\t", "\n", " \t ", "   ", " \n ")
FRAGILE_SHOWN = 5
"""How many of the most fragile examples the report lists."""

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


# ---------------------------------------------------------------------- evaluation


@dataclass
class View:
    """One example as the robustness report shows and compares it (the task builds it)."""

    text: str
    gold: str
    prediction: str
    """The prediction as the report shows it."""
    key: Any
    """What is compared to tell whether the prediction changed (the label; the entities by type
    and source words); None where a prediction has no discrete value (regression), so that
    nothing can flip."""


@dataclass
class Row:
    perturbation: str
    about: str
    changed: float
    """Share of the examples whose input the perturbation changed."""
    metric: float
    delta: float
    """metric - clean metric."""
    flip_rate: float | None
    """Share of the examples whose prediction differs from the clean one (None: regression)."""


@dataclass
class Fragile:
    """An example whose prediction several perturbations changed."""

    index: int
    """Its position in the evaluated data (0-based)."""
    text: str
    gold: str
    prediction: str
    flipped_by: list[str]
    perturbed_text: str
    """Its text under the first perturbation in `flipped_by` ..."""
    perturbed_prediction: str
    """... and the prediction there."""


@dataclass
class RobustnessResult:
    metric: str
    """The task's default metric, the one every row reports."""
    clean: float
    examples: int
    seed: int
    rows: list[Row]
    not_applicable: list[str]
    """Perturbations the task has nothing to apply to (whitespace for pre-split NER words)."""
    fragile: list[Fragile]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def markdown(self, title: str) -> str:
        m = self.metric
        rows = [["clean", "unperturbed", "", f"{self.clean:.4f}", "", ""]]
        rows += [
            [
                r.perturbation,
                r.about,
                _percent(r.changed),
                f"{r.metric:.4f}",
                f"{r.delta:+.4f}",
                _percent(r.flip_rate),
            ]
            for r in self.rows
        ]
        lines = [
            f"## {title}",
            "",
            f"{m} on {self.examples:,} examples under seeded, label-preserving perturbations "
            f"(seed {self.seed}); changed: examples whose input the perturbation changed; "
            "flip rate: examples whose prediction changed.",
            "",
            markdown_table(["perturbation", "what", "changed", m, "delta", "flip rate"], rows),
        ]
        if self.not_applicable:
            lines += ["", f"Not applicable to this task: {', '.join(self.not_applicable)}."]
        if self.fragile:
            lines += [
                "",
                "### Most fragile examples (flipped by the most perturbations)",
                "",
                markdown_table(
                    [
                        "#",
                        "text",
                        "gold",
                        "prediction",
                        "flipped by",
                        "perturbed text (first of them)",
                        "its prediction",
                    ],
                    [
                        [
                            f.index,
                            cell(f.text),
                            cell(f.gold),
                            cell(f.prediction),
                            ", ".join(f.flipped_by),
                            cell(f.perturbed_text),
                            cell(f.perturbed_prediction),
                        ]
                        for f in self.fragile
                    ],
                ),
            ]
        return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@runtime_checkable
class PerturbableTask(Protocol):
    """What a task provides to be evaluated here (a capability, `lmadapt.tasks.capabilities`).
    Generation has none: scoring a perturbed prompt means decoding it again, for a metric (loss,
    text overlap) whose change says little about how robust the model is."""

    def perturbed(self, examples: list[Any], p: Perturbation, seed: int) -> list[Any] | None:
        """Copies of labelled examples with their input perturbed by `p` and their labels kept;
        None when `p` has nothing to change in this task's inputs."""

    def robustness_views(
        self, model: torch.nn.Module, data: Encoded
    ) -> tuple[Evaluation, list[View]]:
        """`evaluate_model`'s evaluation and each example's text, gold and prediction as the
        robustness report shows and compares them (one pass where the task can)."""


def check_perturbable(task: Task) -> PerturbableTask:
    """Refuse, before any work, a task that cannot be perturbed; else the task, as one that can."""
    if not isinstance(task, PerturbableTask):
        raise LmadaptError(
            f"robustness covers classification and token classification runs, not {task.kind}"
        )
    return task


def robustness(
    task: Task,
    model: Any,
    tokenizer: Any,
    examples: list[Any],
    batch_size: int,
    seed: int = 0,
    perturbations: list[str] | None = None,
) -> RobustnessResult:
    """Evaluate `model` on labelled `examples` and on each perturbed copy of them: the task's
    default metric and its change, and the share of predictions that change."""
    chosen = select(perturbations, seed)
    if not examples:
        raise LmadaptError("robustness needs at least one labelled example")
    perturbable = check_perturbable(task)
    collate = task.collator(tokenizer)
    metric = task.default_metric

    def score(exs: list[Any]) -> tuple[float, list[View]]:
        data = Encoded(task.encode(exs, tokenizer), exs, collate, batch_size)
        ev, views = perturbable.robustness_views(model, data)
        return ev.metrics[metric], views

    clean, base = score(examples)
    rows, skipped = [], []
    flips: dict[int, list[tuple[str, View]]] = {}
    for p in chosen:
        perturbed = perturbable.perturbed(examples, p, seed)
        if perturbed is None:
            skipped.append(p.name)
            continue
        value, views = score(perturbed)
        flipped = [
            i for i, (a, b) in enumerate(zip(base, views)) if a.key is not None and a.key != b.key
        ]
        for i in flipped:
            flips.setdefault(i, []).append((p.name, views[i]))
        rows.append(
            Row(
                p.name,
                p.about,
                float(np.mean([a.text != b.text for a, b in zip(base, views)])),
                value,
                value - clean,
                None if base[0].key is None else len(flipped) / len(examples),
            )
        )
    ranked = sorted(flips.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:FRAGILE_SHOWN]
    fragile = [
        Fragile(
            i,
            base[i].text,
            base[i].gold,
            base[i].prediction,
            [name for name, _ in hits],
            hits[0][1].text,
            hits[0][1].prediction,
        )
        for i, hits in ranked
    ]
    return RobustnessResult(metric, clean, len(examples), seed, rows, skipped, fragile)
