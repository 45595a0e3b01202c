"""What only some tasks can do, each a Protocol that callers check with `isinstance`: a task
defines the members of a capability only where it really has it, and a caller keeps its own answer
for a task without it (an error saying so, or nothing to do).

| capability          | tasks that have it                                 | asked by          |
|---------------------|----------------------------------------------------|-------------------|
| ExplainableTask     | classification, token_classification, generation   | `lmadapt explain` |
| PerturbableTask     | every task but generation                          | robustness        |
| CalibratableTask    | classification, token_classification               | training's end    |
| TunableTask         | question_answering                                 | training's end    |
| ProbeableTask       | question_answering                                 | export's check    |
| BatchPreparingTask  | preference                                         | the training loop |
| AdaptableTask       | classification, token_classification, preference   | `lmadapt auto`    |

(`BatchPreparingTask` is defined beside the loop that asks it, `lmadapt.train.loop`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from lmadapt.errors import LmadaptError
from lmadapt.evaluate.robustness import PerturbableTask

if TYPE_CHECKING:
    import torch

    from lmadapt.evaluate.explain import Explainable
    from lmadapt.evaluate.metrics import Evaluation
    from lmadapt.inference import Encoded
    from lmadapt.tasks.base import DataProfile, Task

__all__ = [
    "AdaptableTask",
    "CalibratableTask",
    "ExplainableTask",
    "PerturbableTask",
    "ProbeableTask",
    "TunableTask",
    "cannot_explain",
]


@runtime_checkable
class ExplainableTask(Protocol):
    def explainables(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        examples: list[Any],
        label: str | None,
        batch_size: int,
    ) -> list[Explainable]:
        """What `lmadapt explain` attributes in each example: its encoded input, its words and
        one target per output to explain (the predicted label, or `label`; each predicted
        entity). Refuses, as a LmadaptError, settings it cannot explain or an unknown `label`."""


@runtime_checkable
class CalibratableTask(Protocol):
    def fit_calibration(self, evaluations: dict[str, Evaluation]) -> dict[str, float]:
        """After training: fit what calibrates the task's confidences on `evaluations["dev"]`
        (kept in `state`), add its effect to each evaluation, and return what metrics.json
        records at its top level (e.g. the temperature); {} where there is nothing to fit."""


@runtime_checkable
class TunableTask(Protocol):
    def tune(self, model: torch.nn.Module, data: Encoded) -> None:
        """Settle, after training, what the task decides from the trained model's dev predictions
        (e.g. question answering's no-answer threshold); saved through `state`."""


@runtime_checkable
class ProbeableTask(Protocol):
    def probe_examples(self, sentences: list[str]) -> list[Any]:
        """Unlabelled examples made from plain sentences, for checks that need some input of
        this task (export's merged-vs-unmerged logits), where `examples_from_texts` does not
        take plain sentences."""


@runtime_checkable
class AdaptableTask(Protocol):
    """A task that `lmadapt auto` adapts: it tells its training files by their form, and
    describes the data its routes are chosen by and its dev set is carved with."""

    def recognises(self, path: str, fmt: str) -> bool:
        """Whether the file is plainly this task's data by its form alone (a CoNLL file; records
        holding `chosen` and `rejected`): auto then reads it with this task only, so that the
        reader's refusal is the file's error. False leaves it to the readers: the adaptable tasks
        try it in turn and the first that reads it takes it."""

    def profile(self, examples: list[Any]) -> DataProfile:
        """The labelled training examples described: per label, strata, source lines, lengths."""


def cannot_explain(task: Task) -> LmadaptError:
    """The refusal of `lmadapt explain` for a task that is not explainable (or, for generation,
    not as configured)."""
    return LmadaptError(
        f"task '{task.kind}' cannot be explained: explain attributes classification and "
        "token_classification runs, and generation runs with label-aware evaluation "
        "(task.labels)"
    )
