import json

import numpy as np
import pytest

from lmadapt.api import load_run, predict, train
from lmadapt.config import build_run_config
from lmadapt.errors import DataError
from lmadapt.tasks import build_task
from lmadapt.tasks.classification import ClassificationConfig
from tests.conftest import write_csv


def _task(**kw):
    return build_task(ClassificationConfig(**kw))


def test_label_set_numeric_sorted_and_saved(tmp_path):
    p = write_csv(tmp_path / "t.csv", [("a", "10"), ("b", "2"), ("c", "1")])
    task = _task()
    task.fit(task.read(str(p)))
    assert task.labels == ["1", "2", "10"]
    assert task.state()["labels"] == ["1", "2", "10"]


def test_text_pair_defaults(tmp_path):
    p = write_csv(
        tmp_path / "p.csv",
        [("a b", "c d", "0"), ("e", "f", "1")],
        header=("sentence1", "sentence2", "label"),
    )
    task = _task()
    ex = task.read(str(p))
    assert (ex[0].text, ex[0].text_pair) == ("a b", "c d")


def test_single_label_metrics_by_hand():
    task = _task()
    task.labels = ["a", "b"]
    from lmadapt.tasks.classification import Example

    exs = [Example("x", label=lab) for lab in ["a", "a", "b", "b"]]
    logits = [np.array(v, dtype=float) for v in ([2, 0], [0, 2], [0, 2], [0, 2])]
    ev = task.evaluate(logits, exs)
    assert ev.metrics["accuracy"] == 0.75
    assert ev.details["confusion_matrix"] == [[1, 1], [0, 2]]
    assert ev.metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_multilabel_reads_delimited_and_list_labels(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": "y"}\n'
        '{"text": "c", "label": []}\n'
    )
    task = _task(problem="multi_label")
    ex = task.read(str(p))
    task.fit(ex)
    assert task.labels == ["x", "y"] and ex[2].label == []
    p2 = write_csv(tmp_path / "m.csv", [("a", "x|y"), ("b", "y")])
    assert _task(problem="multi_label", label_delimiter="|").read(str(p2))[0].label == ["x", "y"]


def test_regression_label_must_be_numeric(tmp_path):
    p = write_csv(tmp_path / "r.csv", [("a", "0.5"), ("b", "high")])
    with pytest.raises(DataError, match=r"line 3, field 'label': expected a number"):
        _task(problem="regression").read(str(p))


@pytest.mark.parametrize("problem", ["multi_label", "regression"])
def test_other_problems_train_end_to_end(problem, tmp_path, run_config):
    rows = [
        (f"the film was {w}", lab)
        for w, lab in [("good", "1.0"), ("bad", "0.0"), ("great", "0.9"), ("awful", "0.1")] * 6
    ]
    if problem == "multi_label":
        rows = [(t, "pos,fun" if float(v) > 0.5 else "neg") for t, v in rows]
    train_f = write_csv(tmp_path / f"{problem}.csv", rows)
    cfg = build_run_config(
        run_config(
            task={"type": "classification", "problem": problem},
            data={"train": str(train_f), "dev": str(train_f)},
            output_dir=str(tmp_path / problem),
        )
    )
    metrics = train(cfg)
    key = "mse" if problem == "regression" else "micro_f1"
    assert key in metrics["dev"]
    out = predict(load_run(metrics["run_dir"]), ["the film was good"])
    assert ("score" if problem == "regression" else "probabilities") in out[0]
    assert json.loads((tmp_path / problem / "run.json").read_text())["task"]["problem"] == problem
