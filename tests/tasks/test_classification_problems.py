import typing

import pytest

from lmadapt.tasks import build_task
from lmadapt.tasks.classification_problems import PROBLEMS, Problem
from lmadapt.tasks.configs import ClassificationConfig

PROBLEM_NAMES = typing.get_args(typing.get_type_hints(ClassificationConfig)["problem"])


def test_every_configurable_problem_has_a_strategy():
    assert set(PROBLEM_NAMES) == set(PROBLEMS)


@pytest.mark.parametrize("problem", PROBLEM_NAMES)
def test_each_strategy_provides_the_protocol(problem):
    task = build_task(ClassificationConfig(problem=problem))
    members = [n for n in dir(Problem) if not n.startswith("_")]
    members += list(Problem.__annotations__)
    missing = [n for n in members if not hasattr(task.problem, n)]
    assert not missing, missing
    assert task.default_metric in task.metric_names
    assert task.label_distribution == (problem == "single_label")
    assert task.temperature is None and set(task.state()) - {"temperature"} == {
        "labels",
        "problem",
        "text_column",
        "text_pair_column",
    }
