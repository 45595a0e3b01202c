"""Robustness: how a trained model's score and predictions move when its inputs are perturbed
(`lmadapt.evaluate.perturbations`: named, seeded, label-preserving). The task decides what of an
example is perturbed (`task.perturbed`) and what counts as a changed prediction
(`task.robustness_views`): the label; the entities by type and source words, so that a respelt
word inside an unchanged entity is no flip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from lmadapt.errors import LmadaptError
from lmadapt.evaluate.perturbations import Perturbation, select
from lmadapt.evaluate.report import cell, markdown_table
from lmadapt.inference import Encoded

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    import torch

    from lmadapt.evaluate.metrics import Evaluation
    from lmadapt.tasks.base import Task

FRAGILE_SHOWN = 5
"""How many of the most fragile examples the report lists."""


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
