"""#34: `lmadapt predict RUN --file` reads, encodes and predicts a chunk of the file at a time and
prints each row as it is made, so memory stays flat in the file's size; a bad row anywhere in
the file is still refused before any prediction is printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmadapt.api as api
from lmadapt.api import load_run, predict, predictions, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from tests.conftest import sentiment_rows, write_csv


def texts_file(path: Path, texts: list[str]) -> Path:
    """The texts to predict, one JSON object a line."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_bert) -> Path:
    tmp = tmp_path_factory.mktemp("predict-file")
    data = write_csv(tmp / "train.csv", sentiment_rows(32, seed=1))
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": "lora"},
        "data": {"train": str(data)},
        "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32", "threads": 1},
        "output_dir": str(tmp / "run"),
    }
    return Path(train(build_run_config(cfg))["run_dir"])


def test_a_file_is_predicted_a_chunk_at_a_time_as_all_at_once(run, tmp_path, monkeypatch):
    rows = sentiment_rows(23, seed=5)
    file = texts_file(tmp_path / "in.jsonl", [text for text, _ in rows])
    loaded = load_run(run)
    whole = predict(loaded, [text for text, _ in rows])
    sizes = []
    real = loaded.task.predict_model

    def spy(model, data):
        sizes.append(len(data.examples))
        return real(model, data)

    monkeypatch.setattr(loaded.task, "predict_model", spy)
    monkeypatch.setattr(api, "PREDICT_CHUNK", 5)
    chunked = predict(loaded, file=file)
    assert sizes == [5, 5, 5, 5, 3]  # never more than a chunk of the file in memory
    assert [r["label"] for r in chunked] == [r["label"] for r in whole]
    for a, b in zip(chunked, whole):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_the_first_prediction_comes_before_the_file_is_predicted_through(
    run, tmp_path, monkeypatch
):
    file = texts_file(tmp_path / "in.jsonl", ["a fine film"] * 9)
    loaded = load_run(run)
    calls = []
    real = loaded.task.predict_model
    monkeypatch.setattr(loaded.task, "predict_model", lambda m, d: calls.append(1) or real(m, d))
    monkeypatch.setattr(api, "PREDICT_CHUNK", 4)
    first = next(predictions(loaded, file=file))
    assert "label" in first and len(calls) == 1


def test_a_bad_row_at_the_end_refuses_the_file_before_any_prediction(run, tmp_path, capsys):
    texts = [text for text, _ in sentiment_rows(10, seed=2)] + ["   "]
    file = texts_file(tmp_path / "in.jsonl", texts)
    assert main(["predict", str(run), "--file", str(file)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing half-written
    assert "line 11" in err and "Traceback" not in err, err


def test_cli_prints_one_json_row_per_line_of_the_file(run, tmp_path, capsys, monkeypatch):
    rows = sentiment_rows(11, seed=3)
    file = texts_file(tmp_path / "in.jsonl", [text for text, _ in rows])
    monkeypatch.setattr(api, "PREDICT_CHUNK", 4)
    assert main(["predict", str(run), "--file", str(file)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in printed] == [p["label"] for p in predict(run, file=file)]
    assert len(printed) == 11
