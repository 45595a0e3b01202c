"""Tasks: what the model predicts (head, loss, metrics, decoding); one file each, and its config
class in `configs`, registered below by one line each. Registering by path keeps
`import lmadapt.tasks` (and so reading a run config) free of torch; a task's module is imported
when a run builds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmadapt.registry import Registry
from lmadapt.tasks import configs as c

if TYPE_CHECKING:
    from lmadapt.tasks.base import Task

TASKS: Registry = Registry("task")
TASKS.lazy(
    "lmadapt.tasks",
    [
        ("classification", c.ClassificationConfig, "ClassificationTask"),
        ("generation", c.GenerationConfig, "GenerationTask"),
        ("preference", c.PreferenceConfig, "PreferenceTask"),
        ("prompt_classification", c.PromptClassificationConfig, "PromptClassificationTask"),
        ("question_answering", c.QAConfig, "QuestionAnsweringTask"),
        ("token_classification", c.TokenClassificationConfig, "TokenClassificationTask"),
    ],
)

__all__ = ["TASKS", "build_task"]


def build_task(config: Any, state: dict | None = None) -> Task:
    """Instantiate the task named by `config.type`; `state` restores a saved label set."""
    return TASKS.get(config.type).impl(config, state)
