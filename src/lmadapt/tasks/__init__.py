"""Tasks: what the model predicts (head, loss, metrics, decoding). One file each, registered here."""

from lmadapt.registry import Registry

TASKS: Registry = Registry("task")

from lmadapt.tasks import classification, token_classification  # noqa: E402,F401  (register)
from lmadapt.tasks.base import Evaluation, Task  # noqa: E402

__all__ = ["TASKS", "Evaluation", "Task", "build_task"]


def build_task(config, state: dict | None = None) -> Task:
    """Instantiate the task named by `config.type`; `state` restores a saved label set."""
    return TASKS.get(config.type).impl(config, state)
