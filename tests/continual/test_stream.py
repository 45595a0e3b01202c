"""End to end: tiny streams on the tiny random BERT, once per strategy, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from lmadapt.cli import main
from lmadapt.continual import run_continual, run_continual_many
from lmadapt.continual.config import build_continual_config, load_continual_config
from lmadapt.continual.strategies import STRATEGIES
from lmadapt.errors import ConfigError, DataError
from tests.conftest import sentiment_rows, write_csv
from tests.data.test_bad_rows import csv_with_bad_rows
from tests.tasks.test_token_classification import ner_sentences, write_conll

TRAIN = {"epochs": 1, "batch_size": 8, "log_every": 2, "precision": "fp32", "threads": 1}


@pytest.fixture
def stream_files(tmp_path):
    return {
        "cls_train": write_csv(tmp_path / "a_train.csv", sentiment_rows(32, seed=1)),
        "cls_dev": write_csv(tmp_path / "a_dev.csv", sentiment_rows(12, seed=2)),
        "ner_train": write_conll(tmp_path / "b_train.conll", ner_sentences(24, seed=1)),
        "ner_dev": write_conll(tmp_path / "b_dev.conll", ner_sentences(8, seed=2)),
        "cls_more": write_csv(tmp_path / "a_more.csv", sentiment_rows(16, seed=3)),
    }


def _config(tiny_bert, files, out, strategy, repeat=False, **extra):
    stream = [
        {
            "name": "sent",
            "task": {"type": "classification"},
            "data": {"train": str(files["cls_train"]), "dev": str(files["cls_dev"])},
        },
        {
            "name": "ner",
            "task": {"type": "token_classification"},
            "data": {"train": str(files["ner_train"]), "dev": str(files["ner_dev"])},
            "train": {"batch_size": 4},
        },
    ]
    if repeat:
        stream.append({"name": "sent", "data": {"train": str(files["cls_more"])}})
    return {
        "model": tiny_bert,
        "strategy": strategy,
        "train": TRAIN,
        "stream": stream,
        "output_dir": str(out),
        **extra,
    }


SMALL = {
    "naive": {},
    "ewc": {"fisher_samples": 8},
    "l2": {},
    "replay": {"buffer_size": 10, "batch_size": 4},
    "lwf": {},
    "adapters": {"r": 2},
}


def test_every_strategy_is_covered():
    assert set(SMALL) == set(STRATEGIES.names())


@pytest.mark.parametrize("name", list(SMALL))
def test_two_task_stream(name, tiny_bert, stream_files, tmp_path):
    cfg = build_continual_config(
        _config(tiny_bert, stream_files, tmp_path / name, {"name": name, **SMALL[name]})
    )
    s = run_continual(cfg)
    out = tmp_path / name
    assert s["tasks"] == ["sent", "ner"] and s["metrics"] == {"sent": "accuracy", "ner": "f1"}
    R = s["matrix"]
    assert R[0][1] is None and all(v is not None for v in R[1])
    assert s["bwt"] == pytest.approx(R[1][0] - R[0][0])
    assert s["forgetting"]["ner"] is None
    for f in ["continual.json", "report.md", "config.yaml", "plots/accuracy_matrix.png"]:
        assert (out / f).is_file(), f
    assert not (out / "steps/00-sent/checkpoints").exists()
    assert json.loads((out / "continual.json").read_text())["bwt"] == s["bwt"]
    if name == "adapters":  # earlier predictions are checked bit for bit by the runner too
        assert s["bwt"] == 0.0 and R[1][0] == R[0][0]
    # the written config reads back
    assert load_continual_config(out / "config.yaml").strategy.name == name


@pytest.mark.parametrize("name", ["replay", "lwf", "adapters"])
def test_revisited_task_continues_its_head(name, tiny_bert, stream_files, tmp_path):
    cfg = build_continual_config(
        _config(tiny_bert, stream_files, tmp_path / "r", {"name": name}, repeat=True)
    )
    s = run_continual(cfg)
    assert s["tasks"] == ["sent", "ner"] and len(s["matrix"]) == 3
    assert [st["task"] for st in s["steps"]] == ["sent", "ner", "sent"]
    assert s["steps"][2]["train_samples"] == 16
    # BWT is over ner only (sent was trained last): R[2][ner] - R[1][ner]
    assert s["bwt"] == pytest.approx(s["matrix"][2][1] - s["matrix"][1][1])
    assert not math.isnan(s["average_accuracy"])


def test_config_errors_name_the_entry(tiny_bert, stream_files, tmp_path):
    base = _config(tiny_bert, stream_files, tmp_path / "x", "naive")
    bad = json.loads(json.dumps(base))
    del bad["stream"][1]["data"]["dev"]
    with pytest.raises(ConfigError, match=r"stream\[1\].data.dev"):
        build_continual_config(bad)
    bad = json.loads(json.dumps(base))
    bad["stream"].append(
        {"name": "sent", "task": {"type": "token_classification"}, "data": {"train": "x.csv"}}
    )
    with pytest.raises(ConfigError, match=r"stream\[2\].task"):
        build_continual_config(bad)
    bad = json.loads(json.dumps(base))
    bad["stream"][0]["train"] = {"lr": -1}
    with pytest.raises(ConfigError, match=r"stream\[0\].train.lr"):
        build_continual_config(bad)
    with pytest.raises(ConfigError, match="stream"):
        build_continual_config({"strategy": "naive"})


def test_cli_and_many_strategies(tiny_bert, stream_files, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_bert, stream_files, tmp_path / "cli", "ewc")))
    rc = main(["continual", str(path), "strategy=l2", "strategy.strength=0.5"])
    assert rc == 0 and "strategy `l2`" in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "cli/continual.json").read_text())["strategy_config"]["strength"]
        == 0.5
    )
    assert main(["continual", str(path), "strategy=l2"]) == 2  # output_dir exists
    s = run_continual_many(path, ["naive", "adapters"], [f"output_dir={tmp_path / 'many'}"])
    assert set(s["runs"]) == {"naive", "adapters"}
    assert "| adapters |" in (tmp_path / "many/summary.md").read_text()


# #29 item 14: data.bad_rows means the same here as in train
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_continual_honours_bad_rows(policy, tiny_bert, stream_files, tmp_path):
    bad_file, bad_lines = csv_with_bad_rows(tmp_path / "bad_train.csv", good=40)
    raw = _config(
        tiny_bert,
        {**stream_files, "cls_train": bad_file},
        tmp_path / "out",
        {"name": "naive", **SMALL["naive"]},
    )
    raw["stream"] = raw["stream"][:1]
    raw["stream"][0]["data"].update(bad_rows=policy, max_bad_fraction=0.2)
    config = build_continual_config(raw)
    if policy == "error":
        with pytest.raises(DataError, match="3 bad rows"):
            run_continual(config)
        return
    summary = run_continual(config)
    assert summary["bad_rows_skipped"] == {
        f"sent: {bad_file}": 3,
        f"sent: {stream_files['cls_dev']}": 0,
    }
    assert summary["steps"][0]["train_samples"] == 40
    assert "bad rows left out" in (tmp_path / "out" / "report.md").read_text()
