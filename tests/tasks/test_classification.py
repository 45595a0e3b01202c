import json

import numpy as np
import pytest

from lmadapt.api import evaluate, load_run, predict, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.tasks import build_task
from lmadapt.tasks.classification import Example
from lmadapt.tasks.configs import ClassificationConfig
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
    task_state = json.loads((tmp_path / problem / "run.json").read_text())["task"]
    assert task_state["problem"] == problem
    assert "temperature" not in task_state and "temperature" not in metrics  # no calibration
    assert "ece" not in metrics["dev"]


def test_calibrated_run_keeps_its_temperature_and_reports_errors(
    tmp_path, run_config, sentiment_files
):
    cfg = build_run_config(
        run_config(
            task={"type": "classification", "calibrate": True},
            data={"test": str(sentiment_files["dev"])},
        )
    )
    metrics = train(cfg)
    run_dir = tmp_path / "run"
    t = metrics["temperature"]
    # The random tiny model learns nothing (dev accuracy 0.5): its NLL still falls at the
    # search's bound, so no temperature is applied and the report says why.
    assert t == 1.0
    assert json.loads((run_dir / "run.json").read_text())["task"]["temperature"] == t
    for split in ("dev", "test"):
        assert 0 <= metrics[split]["ece"] <= 1 and 0 <= metrics[split]["ece_calibrated"] <= 1
    # fitted on dev's NLL, which scaling never raises; ECE is only measured, so not asserted
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for heading in (
        "### Calibration",
        "### Most confident errors",
        "### Least confident correct predictions",
        "### Accuracy by input length",
        "### Per class",
    ):
        assert report.count(heading) == 2, heading  # dev and test
    assert report.count("Temperature scaling not applied (T = 1): the dev NLL still falls") == 2
    assert (run_dir / "plots" / "test_reliability.png").is_file()
    assert "logits" not in json.dumps(metrics)  # per-example data stays out of metrics.json

    run = load_run(run_dir)
    run.task.temperature = 3.0  # as if fitted: predict applies it
    texts = ["the film was good", "the plot was awful", "the cast was fine"]
    calibrated = predict(run, texts)
    run.task.cfg.calibrate = False
    raw = predict(run, texts)
    assert [r["label"] for r in calibrated] == [r["label"] for r in raw]
    assert all(c["probabilities"] != r["probabilities"] for c, r in zip(calibrated, raw))
    for row in calibrated:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    ev, section = evaluate(run_dir, sentiment_files["dev"])
    assert ev.metrics["ece_calibrated"] == pytest.approx(metrics["test"]["ece_calibrated"])
    assert "### Most confident errors" in section


def test_error_analysis_ranks_by_confidence_and_slices_by_length():
    task = _task()
    task.labels = ["neg", "pos"]
    texts = ["a", "a b", "a b c", "a b c d"]
    exs = [Example(t, label=lab) for t, lab in zip(texts, ["pos", "pos", "neg", "neg"])]
    logits = [np.array(v, dtype=float) for v in ([3, 0], [0, 1], [0, 0.5], [2, 0])]
    ev = task.evaluate(logits, exs)
    d = ev.details
    assert [r["text"] for r in d["confident_errors"]] == ["a", "a b c"]
    assert (
        d["confident_errors"][0]["gold"] == "pos" and d["confident_errors"][0]["predicted"] == "neg"
    )
    assert [r["text"] for r in d["unsure_correct"]] == ["a b", "a b c d"]
    assert [(s["shortest"], s["value"]) for s in d["length_slices"]] == [
        (1, 0.0),
        (2, 1.0),
        (3, 0.0),
        (4, 1.0),
    ]
    assert "ece_calibrated" not in ev.metrics  # nothing fitted yet
    assert task.fit_calibration({"dev": ev}) == {"temperature": task.temperature}
    assert "ece_calibrated" in ev.metrics


def test_calibrate_is_single_label_only_and_needs_a_fitted_temperature():
    with pytest.raises(ConfigError, match="task.calibrate"):
        ClassificationConfig(problem="multi_label", calibrate=True)
    task = build_task(ClassificationConfig(calibrate=True), {"labels": ["neg", "pos"]})
    with pytest.raises(LmadaptError, match="no fitted temperature"):
        task.decode([np.array([0.0, 1.0])], task.examples_from_texts(["x"]))
    assert task.fit_calibration({}) == {}  # no dev set, nothing fitted
