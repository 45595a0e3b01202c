"""Every registered task provides what the `Task` protocol says, with values callers can use:
callers ask the task, so a task missing a member would fail far from here."""

from __future__ import annotations

import typing

import pytest
from peft import TaskType

from lmadapt.models import Kind
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.base import Endpoint, Task

MEMBERS = [
    name for name in dir(Task) if not name.startswith("_") and name not in ("register",)
] + list(typing.get_type_hints(Task))


@pytest.mark.parametrize("name", TASKS.names())
def test_task_follows_the_protocol(name):
    task = build_task(parse_section(TASKS, "type", name, "task"))
    missing = [m for m in set(MEMBERS) if not hasattr(task, m)]
    assert not missing, f"{name} lacks {sorted(missing)}"
    assert task.kind == name
    assert task.peft_task_type in {t.value for t in TaskType}
    assert set(task.model_kinds) <= set(typing.get_args(Kind)) and task.model_kinds
    assert task.endpoint in typing.get_args(Endpoint)
    assert isinstance(task.shares_backbone, bool) and isinstance(task.label_distribution, bool)
    assert isinstance(task.labels, list) and isinstance(task.description, str)
    assert task.default_metric in task.metric_names
    for method in (
        "read",
        "fit",
        "use_model",
        "check",
        "encode",
        "collator",
        "build_model",
        "loss",
    ):
        assert callable(getattr(task, method))


def test_protocol_lists_the_members_callers_use():
    for member in ("peft_task_type", "model_kinds", "endpoint", "evaluate_model", "predict_model"):
        assert member in MEMBERS
