"""What every task provides to the trainer, evaluation, prediction and serving.

A task owns every decision about itself (which models suit it, how peft wraps it, how it is
evaluated, decoded and served): callers ask the task and keep no table of task names.
What only some tasks can do (explain, robustness, calibration, tuning on dev, probe inputs) is
not here but in `lmadapt.tasks.capabilities`, checked with `isinstance`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np
import torch

from lmadapt.data.streams import Examples, Reread, limited, read_through
from lmadapt.data.validation import BadRow, BadRows, collect
from lmadapt.errors import ConfigError
from lmadapt.evaluate.metrics import Evaluation
from lmadapt.inference import Encoded, batched_logits
from lmadapt.models import ModelSpec

if TYPE_CHECKING:
    from lmadapt.evaluate.robustness import View

Endpoint = Literal["classify", "ner", "generate", "qa"]


class Task(Protocol):
    kind: str
    """The name the task is registered under (`task.type`)."""

    @property
    def peft_task_type(self) -> str:
        """How peft wraps a model for it (SEQ_CLS, TOKEN_CLS, CAUSAL_LM)."""

    model_kinds: tuple[str, ...]
    """Which kinds of model suit it ('encoder', 'causal')."""
    endpoint: Endpoint
    """The serving endpoint that answers with its predictions (/v1/<endpoint>)."""
    shares_backbone: bool
    """Whether its model is a head over a backbone that other tasks can share (continual
    learning's multi-head model needs this)."""
    label_distribution: bool
    """Whether it predicts one probability distribution over `labels` per example, from its
    logits (what distillation's teacher and student exchange)."""
    groups_by_length: bool
    """Whether training batches are length-grouped unless `train.group_by_length` says."""
    head_lr_floor: float | None
    """The least learning rate of the parameters of `head_modules` unless `train.head_lr` says
    (None: they train at the run's rate like the rest)."""
    train_dropout: float | None
    """The dropout its training sets unless `train.dropout` says (None: the model's own)."""
    labels: list[str]
    """The label set its predictions name (empty where predictions are free text)."""
    description: str
    """The task as a report names it, e.g. 'classification (multi_label)'."""
    default_metric: str

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every scalar its dev evaluation reports (what `train.metric` may name)."""

    def read(
        self, path: str, fmt: str, labelled: bool = True, bad: BadRows | None = None
    ) -> list[Any]:
        """Read and validate one file into examples (errors name file, line and field).

        Rows with a problem are left out and recorded in `bad`, whose owner decides whether
        the file is refused; without `bad`, every bad row is raised in one DataError.
        """

    def stream(self, path: str, fmt: str, bad: BadRows, labelled: bool = True) -> Iterable[Any]:
        """The examples of a file, as `read` gives them, to be iterated once or more (a training
        file: validated and fitted, then encoded into the feature cache; a file to predict:
        checked, then predicted a chunk at a time). A task that can reads them lazily, as a
        `lmadapt.data.streams.Reread`, so that no example is held in memory; the others return
        `read`'s list. Bad rows go to `bad` on the first pass."""

    def fit(self, train: Iterable[Any]) -> None:
        """Learn what the task needs from the training examples (e.g. the label set): a list,
        or what `stream` returned, iterated once."""

    def use_model(self, spec: ModelSpec) -> None:
        """Learn what the task needs from the model it will run on, before encoding (e.g. an
        encoder-decoder's split of prompt and response); refuse settings it cannot use."""

    def check(self, examples: list[Any], bad: BadRows | None = None) -> list[Any]:
        """Validate non-training examples against what was learned (e.g. unseen labels);
        returns the ones that pass, the others going to `bad` as in `read`."""

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state saved with the run (labels, problem type)."""

    def encode(self, examples: list[Any], tokenizer: Any) -> list[dict[str, Any]]: ...

    def feature_counts(self, examples: list[Any]) -> list[int]:
        """How many features `encode` made of each of these (encoded) examples, in order: one,
        or the windows a task cuts a long input into. A subset of a split keeps whole examples
        with all their features."""

    def collator(self, tokenizer: Any) -> Any: ...

    def build_model(self, spec: Any, trust_remote_code: bool = False) -> torch.nn.Module: ...

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Names of freshly initialised head modules that every method must train."""

    def logits(self, output: Any) -> torch.Tensor:
        """What `loss` and decoding read of a forward pass's output (`output.logits` but where
        the model answers otherwise, e.g. question answering's start and end logits)."""

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def forward_kwargs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Extra forward arguments in training (e.g. logits only where the loss reads them)."""

    def evaluate_model(self, model: torch.nn.Module, data: Encoded) -> Evaluation:
        """Score `model` on labelled examples: the task's metrics plus the mean loss."""

    def predict_model(self, model: torch.nn.Module, data: Encoded) -> list[dict[str, Any]]:
        """Task-level predictions (labels, entities, text) for unlabelled examples."""

    def report(self, evaluation: Evaluation) -> str:
        """Markdown sections for report.md."""

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]: ...

    def examples_from_texts(self, texts: list[str]) -> list[Any]:
        """Unlabelled examples for prediction."""


@dataclass
class DataProfile:
    """What a task says about a labelled training set (`profile`): what `lmadapt auto` chooses
    its routes by and carves a stratified dev set with. Only tasks that `lmadapt auto` can
    adapt describe their data this way."""

    examples: int
    label_counts: dict[str, int]
    """Examples per label (classification) or entity mentions per type (token classification):
    the "examples per class" that decides between few-shot and many-shot routes. Empty where the
    data has no labels (preference pairs)."""
    strata: list[str]
    """One per example: what a stratified split keeps in proportion (e.g. its label)."""
    source_lines: list[list[int]]
    """One per example: the lines of its file it was read from, so a subset of the file can be
    written in the file's own format (and read back by the same task config)."""
    mean_words: float
    max_words: int

    @property
    def min_per_label(self) -> int:
        return min(self.label_counts.values(), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "label_counts": self.label_counts,
            "min_per_label": self.min_per_label,
            "mean_words": round(self.mean_words, 1),
            "max_words": self.max_words,
        }


def stream_split(
    task: Task,
    path: str,
    fmt: str,
    policy: Literal["error", "skip"],
    max_bad_fraction: float,
    labelled: bool = True,
    limit: int | None = None,
    check: bool = True,
) -> tuple[Examples, list[BadRow]]:
    """One data file read and validated under `data.bad_rows` (`policy`): refused with every bad
    row listed, or the bad rows left out and returned beside the examples. The examples are the
    task's `stream` (a `Reread` where the task streams its files, so a file need not fit in
    memory; else `read`'s list), the first `limit` kept; `check` validates each labelled one
    against what the task has learned (a dev/test file's labels against train's). The file is
    read through once here, so that its bad rows are known (and refused under `policy`) before
    anything uses the examples."""
    bad = BadRows(path, policy, max_bad_fraction)
    examples = task.stream(path, fmt, bad, labelled)
    if isinstance(examples, Reread):
        examples = Reread(_checked(task, examples.read, labelled and check), bad)
    elif labelled and check:
        examples = task.check(list(examples), bad)
    kept = limited(examples, limit)
    read_through(kept)
    bad.finish()
    assert isinstance(kept, Sized), type(kept)  # a list, or a Reread that counted its rows
    return kept, bad.rows


def _checked(
    task: Task, read: Callable[[BadRows], Iterable[Any]], labelled: bool
) -> Callable[[BadRows], Iterator[Any]]:
    """`read` with each labelled example passed through `task.check` (e.g. a label the task
    does not know is a bad row), one at a time."""

    def checked(into: BadRows) -> Iterator[Any]:
        for example in read(into):
            yield from task.check([example], into) if labelled else (example,)

    return checked


class FromFile(Protocol):
    """An example that names the file it was read from."""

    @property
    def file(self) -> str: ...


E = TypeVar("E", bound=FromFile)


def keep_valid(examples: list[E], valid: Callable[[E], E], bad: BadRows | None) -> list[E]:
    """What `Task.check` returns: the examples that `valid` passes; each other one is a bad row
    (the DataError `valid` raised) in `bad`, or, without `bad`, all of them are raised in one
    error."""
    if not examples:
        return examples
    with collect(examples[0].file, bad) as bad:
        return bad.keep(examples, valid)


def check_model_suits(task: Task, spec: ModelSpec, field: str = "model") -> None:
    """Refuse a model whose kind the task cannot use, naming the config field; else tell the
    task which model it gets (`Task.use_model`)."""
    if spec.kind not in task.model_kinds:
        raise ConfigError(
            field,
            f"{spec.name} is a {spec.kind} model; task '{task.kind}' needs a "
            f"{' or '.join(task.model_kinds)} model",
        )
    task.use_model(spec)


class LogitsTask(ABC):
    """Shared by tasks whose evaluation and predictions are a function of one batched forward
    pass's logits: they provide `evaluate` and `decode` over those logits, the `loss` of them,
    `read` and `robustness_view` (and, to be a `PerturbableTask`, `perturbed`)."""

    per_token = False
    """Whether logits are per token, (T, C), rather than per sequence, (C,)."""
    shares_backbone = True
    label_distribution = False
    groups_by_length = True
    head_lr_floor: float | None = None
    train_dropout: float | None = None
    windowed = False
    """Whether `encode` cuts a long input into several windows (features), recording them on the
    example as `windows`."""

    @abstractmethod
    def read(
        self, path: str, fmt: str, labelled: bool = True, bad: BadRows | None = None
    ) -> list[Any]:
        """See `Task.read`."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """See `Task.loss`."""

    @abstractmethod
    def evaluate(self, logits: list[np.ndarray], examples: list[Any]) -> Evaluation:
        """The metrics (and report details) of each example's `outputs`, in input order."""

    @abstractmethod
    def decode(self, logits: list[np.ndarray], examples: list[Any]) -> list[dict[str, Any]]:
        """One prediction row per example from its `outputs`, in input order."""

    @abstractmethod
    def robustness_view(self, example: Any, prediction: dict[str, Any]) -> View:
        """The robustness report's text, gold and prediction for one example."""

    def forward_kwargs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {}

    def stream(self, path: str, fmt: str, bad: BadRows, labelled: bool = True) -> Iterable[Any]:
        """`read`'s list: examples are held in memory unless the task streams them."""
        return self.read(path, fmt, labelled, bad=bad)

    def feature_counts(self, examples: list[Any]) -> list[int]:
        """One feature per example, or for a windowed task the windows `encode` recorded on
        each (`example.windows`)."""
        return [len(ex.windows) for ex in examples] if self.windowed else [1] * len(examples)

    def logits(self, output: Any) -> torch.Tensor:
        return output.logits

    def use_model(self, spec: ModelSpec) -> None:
        """A head over the model's output needs nothing from the model in advance."""
        return None

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What evaluation and prediction keep of a batch's logits: all of them by default."""
        return logits

    def outputs_loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss from `outputs`; the same as `loss` when outputs are the logits."""
        return self.loss(outputs, batch)

    def batch_outputs(
        self, model: torch.nn.Module, data: Encoded
    ) -> tuple[list[np.ndarray], float | None]:
        """`outputs` of every feature, in input order, and the mean loss where labelled."""
        return batched_logits(
            model,
            data.features,
            data.collator,
            data.batch_size,
            loss_fn=self.outputs_loss,
            per_token=self.per_token,
            transform=self.outputs,
            read=self.logits,
            forward_args=data.forward_args,
        )

    def evaluate_model(self, model: torch.nn.Module, data: Encoded) -> Evaluation:
        logits, loss = self.batch_outputs(model, data)
        return self._with_loss(self.evaluate(logits, data.examples), loss)

    def predict_model(self, model: torch.nn.Module, data: Encoded) -> list[dict[str, Any]]:
        return self.decode(self.batch_outputs(model, data)[0], data.examples)

    def robustness_views(
        self, model: torch.nn.Module, data: Encoded
    ) -> tuple[Evaluation, list[View]]:
        """One forward pass for both: `evaluate_model`'s evaluation and the task's
        `robustness_view` of each `predict_model` prediction."""
        logits, loss = self.batch_outputs(model, data)
        ev = self._with_loss(self.evaluate(logits, data.examples), loss)
        preds = self.decode(logits, data.examples)
        return ev, [self.robustness_view(ex, p) for ex, p in zip(data.examples, preds)]

    @staticmethod
    def _with_loss(ev: Evaluation, loss: float | None) -> Evaluation:
        """`ev` with the mean loss among its metrics where the examples were labelled."""
        if loss is not None:
            ev.metrics["loss"] = loss
        return ev
