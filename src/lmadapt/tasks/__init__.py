"""Tasks: what the model predicts (head, loss, metrics, decoding); one file each."""

from lmadapt.registry import Registry

TASKS: Registry = Registry("task")

from lmadapt.tasks import (  # noqa: E402,F401  (each registers itself)
    classification,
    generation,
    preference,
    prompt_classification,
    question_answering,
    token_classification,
)
from lmadapt.tasks.base import Evaluation, Task  # noqa: E402

__all__ = ["TASKS", "Evaluation", "Task", "build_task"]


def build_task(config, state: dict | None = None) -> Task:
    """Instantiate the task named by `config.type`; `state` restores a saved label set."""
    return TASKS.get(config.type).impl(config, state)
