"""The three problems a classification task solves, one strategy each, chosen once from
`task.problem`: single-label (softmax + CE), multi-label (sigmoid + BCE) and regression (MSE).

Each owns everything that differs between them: how a label cell is read and validated, what is
learned from the training labels, the training target and loss, how logits become predictions,
metrics and explanation targets, and calibration with its report sections (single-label only).
The task around them reads texts, tokenizes and explains words the same way for all three.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, softmax

from lmadapt.data.readers import Record
from lmadapt.data.validation import BadRows
from lmadapt.errors import DataError
from lmadapt.evaluate import calibration, plots
from lmadapt.evaluate import metrics as M
from lmadapt.evaluate.errors import examples_markdown, length_slices, ranked, slices_markdown
from lmadapt.evaluate.explain import Target
from lmadapt.evaluate.metrics import Evaluation
from lmadapt.evaluate.robustness import View
from lmadapt.tasks.base import keep_valid

if TYPE_CHECKING:
    from lmadapt.tasks.classification import Example
    from lmadapt.tasks.configs import ClassificationConfig


class Problem(Protocol):
    hf_problem_type: str
    """The `problem_type` transformers' sequence-classification head is built with."""
    default_metric: str
    metric_names: tuple[str, ...]
    label_distribution: bool
    """Whether the logits are one softmax distribution over the labels (see `Task`)."""
    temperature: float | None
    """The temperature fitted on dev after training (single-label; None before and elsewhere)."""

    def label(self, value: Any, record: Record, column: str) -> Any:
        """The raw label of `record`'s `column` cell, validated (errors name the record)."""

    def label_set(self, train: Iterable[Example], column: str) -> list[str]:
        """The labels learned from the training examples, iterated once."""

    def strata_counts(self, examples: list[Example]) -> tuple[list[str], dict[str, int]]:
        """Each example's stratum and the examples per label (see `DataProfile`)."""

    def check(
        self, examples: list[Example], labels: list[str], column: str, bad: BadRows | None
    ) -> list[Example]:
        """The examples whose labels are among `labels`; the others go to `bad`."""

    def target(self, label: Any, labels: list[str]) -> Any:
        """What the features' `labels` hold for an example's label."""

    def loss(self, logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor: ...

    def evaluate(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> Evaluation:
        """The metrics (and report details) of (N, C) logits against the examples' labels."""

    def decode(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> list[dict[str, Any]]:
        """One prediction row per example from (N, C) logits."""

    def explain_targets(
        self, logits: np.ndarray, labels: list[str], label: str | None
    ) -> list[Target]:
        """What explain attributes in one example's (C,) logits: the prediction, or `label`."""

    def view(self, text: str, example: Example, prediction: dict[str, Any]) -> View:
        """The robustness report's gold and prediction for one example."""

    def fit_calibration(self, evaluations: dict[str, Evaluation]) -> dict[str, float]:
        """See `CalibratableTask.fit_calibration`."""

    def state(self) -> dict[str, Any]:
        """What the run saves of the problem beside the labels."""

    def report(self, evaluation: Evaluation) -> list[str]:
        """report.md sections after the per-class scores and confusion matrix."""

    def plots(
        self, evaluation: Evaluation, labels: list[str], out_dir: Path, prefix: str
    ) -> list[Path]: ...


class _Uncalibrated:
    """What a problem without calibration, state, report sections or plots answers."""

    def fit_calibration(self, evaluations: dict[str, Evaluation]) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def report(self, evaluation: Evaluation) -> list[str]:
        return []

    def plots(
        self, evaluation: Evaluation, labels: list[str], out_dir: Path, prefix: str
    ) -> list[Path]:
        return []


class SingleLabel:
    """One label per example: softmax over the labels, cross-entropy, temperature scaling."""

    hf_problem_type = "single_label_classification"
    default_metric = "accuracy"
    metric_names: tuple[str, ...] = ("accuracy", "macro_f1", "ece", "loss")
    label_distribution = True

    def __init__(self, cfg: ClassificationConfig, state: dict[str, Any]):
        self.cfg = cfg
        self.temperature: float | None = state.get("temperature")

    @staticmethod
    def names(label: str) -> list[str]:
        return [label]

    def label(self, value: Any, record: Record, column: str) -> str:
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict, float)):
            raise record.error(f"expected a label name or integer, got {value!r}", column)
        name = str(value).strip()
        if not name:
            raise record.error("empty label", column)
        return name

    def label_set(self, train: Iterable[Example], column: str) -> list[str]:
        names, file = _names_in(train, self.names)
        if len(names) < 2:
            raise DataError(
                file, f"needs at least 2 distinct labels, found {sorted(names)}", field=column
            )
        return _ordered(names)

    def strata_counts(self, examples: list[Example]) -> tuple[list[str], dict[str, int]]:
        return [ex.label for ex in examples], _counts(examples, self.names)

    def check(
        self, examples: list[Example], labels: list[str], column: str, bad: BadRows | None
    ) -> list[Example]:
        return known_labels(examples, labels, self.names, column, bad)

    def target(self, label: str, labels: list[str]) -> int:
        return {n: i for i, n in enumerate(labels)}[label]

    def loss(self, logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, gold)

    def evaluate(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> Evaluation:
        probs = softmax(logits, axis=-1)
        gold = np.array([self.target(ex.label, labels) for ex in examples])
        ev = M.single_label_metrics(probs.argmax(-1), gold, labels)
        calibration.add_calibration(ev, logits, gold, self.temperature)
        ev.details |= _error_analysis(probs, gold, examples, labels)
        return ev

    def decode(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> list[dict[str, Any]]:
        if self.cfg.calibrate:  # softmax(logits / T): the same labels, calibrated confidences
            t = calibration.require_fitted(self.temperature)
            probs = calibration.scaled_probs(logits, t)
        else:
            probs = softmax(logits, axis=-1)
        return _label_rows(examples, probs, labels, lambda p: labels[int(p.argmax())])

    def explain_targets(
        self, logits: np.ndarray, labels: list[str], label: str | None
    ) -> list[Target]:
        probs = softmax(logits, axis=-1)
        chosen = [int(probs.argmax())] if label is None else [labels.index(label)]
        return _label_targets(probs, labels, chosen, lambda z, c: F.log_softmax(z, -1)[:, c])

    def view(self, text: str, example: Example, prediction: dict[str, Any]) -> View:
        pred = str(prediction["label"])
        return View(text, str(example.label), pred, pred)

    def fit_calibration(self, evaluations: dict[str, Evaluation]) -> dict[str, float]:
        """Temperature scaling fitted on the dev logits (kept in `state`), with each
        evaluation's calibrated ECE added; nothing without a dev evaluation."""
        self.temperature = calibration.fit_on_dev(evaluations)
        return {} if self.temperature is None else {"temperature": self.temperature}

    def state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def report(self, evaluation: Evaluation) -> list[str]:
        parts = []
        d = evaluation.details
        if "reliability" in d:
            parts.append(calibration.calibration_markdown(evaluation, "text"))
        if "confident_errors" in d:
            columns = ["text", "gold", "predicted", "confidence"]
            parts += [
                "### Most confident errors\n\n" + examples_markdown(d["confident_errors"], columns),
                "### Least confident correct predictions\n\n"
                + examples_markdown(d["unsure_correct"], columns),
                "### Accuracy by input length\n\n"
                + slices_markdown(d["length_slices"], "words", "accuracy"),
            ]
        return parts

    def plots(
        self, evaluation: Evaluation, labels: list[str], out_dir: Path, prefix: str
    ) -> list[Path]:
        cm = evaluation.details.get("confusion_matrix")
        if cm is None:
            return []
        path = out_dir / f"{prefix}confusion_matrix.png"
        plots.confusion_matrix(np.array(cm), labels, path, title=f"{prefix}confusion matrix")
        return [path, *calibration.reliability_plot(evaluation, out_dir, prefix)]


class MultiLabel(_Uncalibrated):
    """Any set of labels per example (possibly none): a sigmoid per label, binary CE, and a
    label predicted where its probability reaches `task.threshold`."""

    hf_problem_type = "multi_label_classification"
    default_metric = "micro_f1"
    metric_names: tuple[str, ...] = (
        "micro_f1",
        "macro_f1",
        "samples_f1",
        "subset_accuracy",
        "loss",
    )
    label_distribution = False
    temperature: float | None = None

    def __init__(self, cfg: ClassificationConfig, state: dict[str, Any]):
        self.cfg = cfg

    @staticmethod
    def names(label: list[str]) -> list[str]:
        return label

    def label(self, value: Any, record: Record, column: str) -> list[str]:
        parts = value if isinstance(value, list) else str(value).split(self.cfg.label_delimiter)
        names = [str(p).strip() for p in parts if str(p).strip()]
        return sorted(set(names))  # an empty list is allowed: no label applies

    def label_set(self, train: Iterable[Example], column: str) -> list[str]:
        names, file = _names_in(train, self.names)
        if not names:
            raise DataError(file, "no labels found", field=column)
        return _ordered(names)

    def strata_counts(self, examples: list[Example]) -> tuple[list[str], dict[str, int]]:
        return ["+".join(ex.label) for ex in examples], _counts(examples, self.names)

    def check(
        self, examples: list[Example], labels: list[str], column: str, bad: BadRows | None
    ) -> list[Example]:
        return known_labels(examples, labels, self.names, column, bad)

    def target(self, label: list[str], labels: list[str]) -> list[float]:
        index = {n: i for i, n in enumerate(labels)}
        vec = [0.0] * len(labels)
        for n in label:
            vec[index[n]] = 1.0
        return vec

    def loss(self, logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, gold.float())

    def evaluate(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> Evaluation:
        gold = np.array([self.target(ex.label, labels) for ex in examples], dtype=int)
        pred = (expit(logits) >= self.cfg.threshold).astype(int)
        return M.multilabel_metrics(pred, gold, labels)

    def decode(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> list[dict[str, Any]]:
        def predicted(p: np.ndarray) -> list[str]:
            return [n for n, v in zip(labels, p) if v >= self.cfg.threshold]

        return _label_rows(examples, expit(logits), labels, predicted)

    def explain_targets(
        self, logits: np.ndarray, labels: list[str], label: str | None
    ) -> list[Target]:
        """`label`, or each predicted label (the likeliest where none reaches the threshold)."""
        probs = expit(logits)
        if label is not None:
            chosen = [labels.index(label)]
        else:
            chosen = [int(i) for i in np.flatnonzero(probs >= self.cfg.threshold)]
            chosen = chosen or [int(probs.argmax())]
        return _label_targets(probs, labels, chosen, lambda z, c: F.logsigmoid(z[:, c]))

    def view(self, text: str, example: Example, prediction: dict[str, Any]) -> View:
        pred = ", ".join(prediction["label"])
        return View(text, ", ".join(example.label), pred, pred)


class Regression(_Uncalibrated):
    """One finite number per example: a single output, MSE, correlation metrics."""

    hf_problem_type = "regression"
    default_metric = "mse"
    metric_names: tuple[str, ...] = ("mse", "pearson", "spearman", "loss")
    label_distribution = False
    temperature: float | None = None

    def __init__(self, cfg: ClassificationConfig, state: dict[str, Any]):
        """A score needs no setting and saves no state."""

    def label(self, value: Any, record: Record, column: str) -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise record.error(f"expected a number, got {value!r}", column) from None
        if not np.isfinite(out):
            raise record.error(f"expected a finite number, got {value!r}", column)
        return out

    def label_set(self, train: Iterable[Example], column: str) -> list[str]:
        """The one output, named 'score'."""
        return ["score"]

    def strata_counts(self, examples: list[Example]) -> tuple[list[str], dict[str, int]]:
        """Each example's quartile."""
        cuts = np.quantile([ex.label for ex in examples], [0.25, 0.5, 0.75])
        strata = [f"q{int(np.searchsorted(cuts, ex.label))}" for ex in examples]
        return strata, {"score": len(examples)}

    def check(
        self, examples: list[Example], labels: list[str], column: str, bad: BadRows | None
    ) -> list[Example]:
        """Every number is a valid score."""
        return examples

    def target(self, label: float, labels: list[str]) -> float:
        return float(label)

    def loss(self, logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.squeeze(-1), gold.float())

    def evaluate(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> Evaluation:
        gold = np.array([ex.label for ex in examples], dtype=float)
        return Evaluation(M.regression_metrics(logits[:, 0], gold))

    def decode(
        self, logits: np.ndarray, examples: list[Example], labels: list[str]
    ) -> list[dict[str, Any]]:
        return [{"text": ex.text, "score": float(v)} for ex, v in zip(examples, logits[:, 0])]

    def explain_targets(
        self, logits: np.ndarray, labels: list[str], label: str | None
    ) -> list[Target]:
        """The score itself, which has no probability."""
        value = round(float(logits[0]), 6)
        return [Target({"label": "score", "value": value}, None, lambda z: z[:, 0])]

    def view(self, text: str, example: Example, prediction: dict[str, Any]) -> View:
        """A score has no value that flips."""
        return View(text, f"{example.label:g}", f"{prediction['score']:.4g}", None)


PROBLEMS: dict[str, Callable[[ClassificationConfig, dict[str, Any]], Problem]] = {
    "single_label": SingleLabel,
    "multi_label": MultiLabel,
    "regression": Regression,
}
"""`task.problem` -> its strategy, built with the config and the run's saved state."""


# ---------------------------------------------------------------------- shared by label names
def _names_in(train: Iterable[Example], names: Callable[[Any], list[str]]) -> tuple[set[str], str]:
    """Every label name in `train` and the file it came from, in one pass: `train` may be a
    stream of a file larger than memory."""
    seen: set[str] = set()
    file = ""
    for ex in train:
        file = file or ex.file
        seen.update(names(ex.label))
    return seen, file


def _ordered(names: set[str]) -> list[str]:
    """Numerically where every name is an integer, else alphabetically."""
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return sorted(names, key=int) if numeric else sorted(names)


def _counts(examples: list[Example], names: Callable[[Any], list[str]]) -> dict[str, int]:
    """Examples per label name, each name of a multi-label row counting."""
    return dict(sorted(Counter(n for ex in examples for n in names(ex.label)).items()))


def known_labels(
    examples: list[Example],
    labels: list[str],
    names: Callable[[Any], list[str]],
    column: str,
    bad: BadRows | None,
    unknown: str = "does not occur in the training data",
) -> list[Example]:
    """The examples whose label names are all in `labels`; the others are bad rows, each saying
    that its label `unknown` (what `labels` were taken from: the training data, a verbalizer)."""
    known = set(labels)

    def checked(ex: Example) -> Example:
        for name in names(ex.label):
            if name not in known:
                raise DataError(
                    ex.file,
                    f"label {name!r} {unknown} (known: {', '.join(labels)})",
                    ex.line,
                    column,
                )
        return ex

    return keep_valid(examples, checked, bad)


def _label_rows(
    examples: list[Example],
    probs: np.ndarray,
    labels: list[str],
    predicted: Callable[[np.ndarray], Any],
) -> list[dict[str, Any]]:
    """Prediction rows: the `predicted` label(s) of each example's probabilities, and those."""
    out = []
    for ex, p in zip(examples, probs):
        scores = {n: round(float(v), 6) for n, v in zip(labels, p)}
        row = {"text": ex.text, "label": predicted(p), "probabilities": scores}
        if ex.text_pair:
            row["text_pair"] = ex.text_pair
        out.append(row)
    return out


def _label_targets(
    probs: np.ndarray,
    labels: list[str],
    chosen: list[int],
    log_prob: Callable[[torch.Tensor, int], torch.Tensor],
) -> list[Target]:
    """An explanation target per chosen label: its log-probability, (B, C) logits -> (B,)."""
    return [
        Target({"label": labels[c]}, round(float(probs[c]), 6), _bound(log_prob, c)) for c in chosen
    ]


def _bound(
    log_prob: Callable[[torch.Tensor, int], torch.Tensor], c: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`log_prob` of label `c` alone: (B, C) logits -> (B,)."""
    return lambda z: log_prob(z, c)


def _error_analysis(
    probs: np.ndarray, gold: np.ndarray, examples: list[Example], labels: list[str]
) -> dict[str, Any]:
    """Details for report.md: the most confident errors, the least confident correct
    predictions (by the model's own top-label probability) and accuracy per length slice."""
    pred, confidence = probs.argmax(-1), probs.max(-1)
    correct = pred == gold

    def row(i: int) -> dict[str, Any]:
        ex = examples[i]
        text = ex.text + (f" ‖ {ex.text_pair}" if ex.text_pair else "")
        return {
            "text": text,
            "gold": labels[gold[i]],
            "predicted": labels[pred[i]],
            "confidence": float(confidence[i]),
        }

    lengths = [len(ex.text.split()) + len((ex.text_pair or "").split()) for ex in examples]
    return {
        "confident_errors": [row(i) for i in ranked(confidence, ~correct)],
        "unsure_correct": [row(i) for i in ranked(confidence, correct, highest=False)],
        "length_slices": length_slices(lengths, lambda idx: correct[idx].mean()),
    }
