"""Every registered task provides what the `Task` protocol says, with values callers can use:
callers ask the task, so a task missing a member would fail far from here. Each has exactly the
optional capabilities it claims, whole: callers check them with isinstance, so a stray stub would
make a task claim what it cannot do."""

from __future__ import annotations

import typing

import pytest
from peft import TaskType

from lmadapt.models import Kind
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.base import Endpoint, Task
from lmadapt.tasks.capabilities import (
    AdaptableTask,
    CalibratableTask,
    ExplainableTask,
    PerturbableTask,
    ProbeableTask,
    TunableTask,
)
from lmadapt.train.loop import BatchPreparingTask

MEMBERS = [
    name for name in dir(Task) if not name.startswith("_") and name not in ("register",)
] + list(typing.get_type_hints(Task))

CAPABILITIES = (
    ExplainableTask,
    PerturbableTask,
    CalibratableTask,
    TunableTask,
    ProbeableTask,
    BatchPreparingTask,
    AdaptableTask,
)
CLAIMS = {
    "classification": {ExplainableTask, PerturbableTask, CalibratableTask, AdaptableTask},
    "token_classification": {ExplainableTask, PerturbableTask, CalibratableTask, AdaptableTask},
    "prompt_classification": {PerturbableTask},
    "question_answering": {PerturbableTask, TunableTask, ProbeableTask},
    "generation": {ExplainableTask},
    "preference": {BatchPreparingTask, AdaptableTask},
}


def _members(capability: type) -> list[str]:
    return [name for name in vars(capability) if not name.startswith("_")]


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


def test_every_registered_task_states_its_capabilities():
    assert set(CLAIMS) == set(TASKS.names())


@pytest.mark.parametrize("name", TASKS.names())
def test_task_has_exactly_the_capabilities_it_claims(name):
    task = build_task(parse_section(TASKS, "type", name, "task"))
    for capability in CAPABILITIES:
        members = _members(capability)
        assert members
        if capability in CLAIMS[name]:
            assert isinstance(task, capability), f"{name} is not a {capability.__name__}"
            assert all(callable(getattr(task, m)) for m in members)
        else:
            assert not isinstance(task, capability), f"{name} claims {capability.__name__}"
            # None is how a subclass says it lacks what its parent has (as with __hash__)
            stray = [m for m in members if getattr(task, m, None) is not None]
            assert not stray, f"{name} has {stray} of {capability.__name__} without the rest"


def test_core_protocol_leaves_the_capabilities_out():
    optional = {m for capability in CAPABILITIES for m in _members(capability)}
    assert optional and not optional & set(MEMBERS)
