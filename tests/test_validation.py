"""Bad input is rejected before training: exit 2, a message naming file/line/field, no run dir."""

from pathlib import Path

import pytest
import yaml

from lmadapt.cli import main
from tests.conftest import sentiment_rows, write_csv


def _run(tmp_path, cfg, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    return code, err


def _bad_train(tmp_path, name, content: bytes | str):
    p = tmp_path / name
    if isinstance(content, str):
        p.write_text(content, encoding="utf-8")
    else:
        p.write_bytes(content)
    return p


CASES = {
    "missing file": (None, "file not found", None),
    "empty file": ("", "file is empty", None),
    "missing column": (
        "text,lbl\nthe film was good,pos\n",
        "missing column",
        "line 2, field 'label'",
    ),
    "empty text": (
        "text,label\nthe film was good,pos\n  ,neg\n",
        "empty text",
        "line 3, field 'text'",
    ),
    "bad encoding": (
        b"text,label\nthe film was good,pos\ncaf\xe9 bad,neg\n",
        "not valid UTF-8",
        "line 3",
    ),
    "wrong field count": ("text,label\na,b,c\n", "expected 2 fields", "line 2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_file(case, tmp_path, run_config, capsys):
    content, message, where = CASES[case]
    train = tmp_path / "bad_train.csv"
    if content is not None:
        _bad_train(tmp_path, "bad_train.csv", content)
    cfg = run_config(data={"train": str(train)})
    code, err = _run(tmp_path, cfg, capsys)
    assert code == 2
    assert message in err and str(train) in err
    if where:
        assert where in err
    assert "Traceback" not in err
    assert not Path(cfg["output_dir"]).exists()


def test_dev_label_unseen_in_train(tmp_path, run_config, capsys):
    dev = write_csv(tmp_path / "dev2.csv", [*sentiment_rows(3), ("the film was odd", "neutral")])
    cfg = run_config(data={"dev": str(dev)})
    code, err = _run(tmp_path, cfg, capsys)
    assert code == 2
    assert "label 'neutral' does not occur in the training data" in err
    assert f"{dev}, line 5, field 'label'" in err
    assert not Path(cfg["output_dir"]).exists()


def test_existing_output_dir_is_refused(tmp_path, run_config, capsys):
    cfg = run_config()
    Path(cfg["output_dir"]).mkdir()
    code, err = _run(tmp_path, cfg, capsys)
    assert code == 2 and "overwrite=true" in err


def test_bad_config_value(tmp_path, run_config, capsys):
    code, err = _run(tmp_path, run_config(train={"epochs": "many"}), capsys)
    assert code == 2 and "train.epochs" in err and "cfg.yaml" in err
