"""Bad rows: every one of a file reported in one error, or skipped and recorded (data.bad_rows).

A file with a few bad rows must not take one fix-and-rerun cycle per row, and `skip` must drop
exactly the bad rows, refuse files with too many, and never skip a problem of the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmadapt.api import prepare
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.data.validation import BadRow, BadRows
from lmadapt.errors import ConfigError, DataError
from lmadapt.evaluate.report import bad_rows_metrics, bad_rows_section
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from tests.conftest import sentiment_rows


def classification():
    return build_task(parse_section(TASKS, "type", "classification", "task"))


def csv_with_bad_rows(path: Path, good: int = 20) -> tuple[Path, list[int]]:
    """`good` valid rows and, in between, 3 bad ones: empty text, a ragged row, empty label."""
    lines = ["text,label"] + [f"{t},{label}" for t, label in sentiment_rows(good)]
    lines[3:3] = ["  ,pos"]
    lines[8:8] = ["the film,pos,extra"]
    lines[14:14] = ["the plot was dull, "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, [4, 9, 15]


def test_csv_every_bad_row_in_one_error(tmp_path):
    path, bad_lines = csv_with_bad_rows(tmp_path / "train.csv")
    with pytest.raises(DataError) as info:
        classification().read(str(path))
    message = str(info.value)
    assert message.startswith(f"file {path}: 3 bad rows:")
    assert f"file {path}, line 4, field 'text': empty text" in message
    assert f"file {path}, line 9: expected 2 fields" in message
    assert f"file {path}, line 15, field 'label': empty label" in message
    assert [r.line for r in info.value.rows] == bad_lines
    assert (info.value.line, info.value.field) == (4, "text")  # the first bad row


def test_jsonl_every_bad_row_in_one_error(tmp_path):
    rows = [json.dumps({"text": t, "label": lab}) for t, lab in sentiment_rows(10)]
    rows[2] = '{"text": "cut off", "lab'
    rows[5] = json.dumps({"text": 7, "label": "pos"})
    rows[8] = json.dumps({"text": "fine", "label": 0.5})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        classification().read(str(path))
    message = str(info.value)
    assert "3 bad rows" in message
    assert f"file {path}, line 3: invalid JSON" in message
    assert f"file {path}, line 6, field 'text': expected text, got int" in message
    assert f"file {path}, line 9, field 'label': expected a label name or integer" in message


def test_long_lists_are_capped(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(['{"text": ""}'] * 25) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        classification().read(str(path))
    message = str(info.value)
    assert "25 bad rows" in message and message.endswith("... and 5 more")
    assert "line 20, field 'text'" in message and "line 21," not in message


def test_skip_reads_the_good_rows_and_records_the_bad(tmp_path, run_config):
    path, bad_lines = csv_with_bad_rows(tmp_path / "train.csv")
    cfg = run_config(data={"train": str(path), "bad_rows": "skip", "max_bad_fraction": 0.2})
    data = prepare(build_run_config(cfg))
    assert len(data.train) == 20 and all(ex.text for ex in data.train)
    assert [r.line for r in data.bad_rows["train"]] == bad_lines
    assert {r.file for r in data.bad_rows["train"]} == {str(path)}
    assert [r.field for r in data.bad_rows["train"]] == ["text", None, "label"]
    assert data.bad_rows["dev"] == []
    assert bad_rows_metrics(data.bad_rows) == {"bad_rows_skipped": {"train": 3, "dev": 0}}


def test_skip_drops_dev_rows_with_labels_unseen_in_training(tmp_path, run_config):
    rows = sentiment_rows(20) + [("the film was odd", "neutral"), ("the plot was", "meh")]
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows), encoding="utf-8")
    cfg = run_config(data={"dev": str(dev)})
    with pytest.raises(DataError) as info:
        prepare(build_run_config(cfg))
    assert "2 bad rows" in str(info.value)
    assert "line 22, field 'label'" in str(info.value) and "line 23" in str(info.value)
    cfg["data"].update(bad_rows="skip")
    data = prepare(build_run_config(cfg))
    assert len(data.dev) == 20
    assert [r.line for r in data.bad_rows["dev"]] == [22, 23]


def test_skip_refuses_a_file_with_too_many_bad_rows(tmp_path, run_config, capsys):
    path, _ = csv_with_bad_rows(tmp_path / "train.csv", good=10)  # 3 of 13 rows bad
    cfg = run_config(data={"train": str(path), "bad_rows": "skip", "max_bad_fraction": 0.2})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "3 of 13 rows are bad" in err and "data.max_bad_fraction=0.2" in err
    assert f"file {path}, line 4, field 'text': empty text" in err
    assert not Path(cfg["output_dir"]).exists()


def test_cli_lists_every_bad_row_and_exits_2(tmp_path, run_config, capsys):
    path, _ = csv_with_bad_rows(tmp_path / "train.csv")
    cfg = run_config(data={"train": str(path)})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert all(f"{path}, line {n}" in err for n in (4, 9, 15))
    assert not Path(cfg["output_dir"]).exists()


FILE_PROBLEMS = [
    # (id, file name, content, message fragment)
    ("header-without-label", "a.csv", b"text,y\na,b\nc,d\n", "missing column"),
    ("not-utf8", "a.csv", b"text,label\nok,pos\ncaf\xe9,neg\n", "not valid UTF-8"),
    ("empty", "a.jsonl", b"", "file is empty"),
    ("json-not-a-list", "a.json", b'{"text": "a"}', "expected a JSON list"),
    ("missing", "nope.csv", None, "file not found"),
]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [case[1:] for case in FILE_PROBLEMS],
    ids=[case[0] for case in FILE_PROBLEMS],
)
def test_file_problems_are_never_skipped(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    bad = BadRows(str(path), "skip", max_bad_fraction=0.9)
    with pytest.raises(DataError, match=message):
        classification().read(str(path), bad=bad)
    assert bad.rows == []


def test_conll_bad_sentences(tmp_path):
    """A sentence with a line of the wrong width, one with an invalid tag: both reported, then
    skipped whole, the sentences around them kept."""
    path = tmp_path / "ner.conll"
    sentences = [
        "John X B-PER\nflew X O",
        "Paris X B-LOC\nis X\nbig X O",  # line 5: two columns
        "Anna X B-PER\nleft X O",
        "to X O\nBerlin X I-LOC",  # line 12: I-LOC after O (invalid in iob2)
        "Bob X B-PER\nstayed X O",
    ]
    path.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    config = {"type": "token_classification", "scheme": "iob2"}
    task = build_task(parse_section(TASKS, "type", config, "task"))
    with pytest.raises(DataError) as info:
        task.read(str(path))
    assert "2 bad rows" in str(info.value)
    assert f"file {path}, line 5: expected 3 columns" in str(info.value)
    assert f"file {path}, line 12: 'I-LOC' after 'O'" in str(info.value)

    bad = BadRows(str(path), "skip", max_bad_fraction=0.5)
    examples = task.read(str(path), bad=bad)
    bad.finish()
    assert [ex.words for ex in examples] == [["John", "flew"], ["Anna", "left"], ["Bob", "stayed"]]
    assert [r.line for r in bad.rows] == [5, 12] and bad.total == 5


def test_report_section_lists_skipped_rows():
    rows = [BadRow("train.csv", n, "text", "empty text") for n in range(2, 27)]
    rows[0] = BadRow("train.csv", 2, "label", "expected a | b\nor c")
    section = bad_rows_section({"train": rows, "dev": []}, limit=3)
    assert section is not None and section.startswith("## Skipped rows")
    assert "| train | 25 |" in section and "| dev | 0 |" in section
    assert "| train | `train.csv` | 2 | label | expected a \\| b or c |" in section
    assert "| train | `train.csv` | 4 | text | empty text |" in section
    assert "| 5 |" not in section and section.endswith("... and 22 more.")
    assert bad_rows_section({"train": [], "dev": []}) is None


def _data(**fields):
    return build_run_config({"task": "classification", "data": {"train": "x.csv", **fields}}).data


def test_config_fields():
    assert (_data().bad_rows, _data().max_bad_fraction) == ("error", 0.1)
    assert (_data(bad_rows="skip", max_bad_fraction=0).max_bad_fraction) == 0
    assert _data(max_bad_fraction="0.25").max_bad_fraction == 0.25
    for fields, name in [
        ({"bad_rows": "drop"}, "data.bad_rows"),
        ({"max_bad_fraction": 1}, "data.max_bad_fraction"),
        ({"max_bad_fraction": -0.1}, "data.max_bad_fraction"),
        ({"max_bad_fraction": "lots"}, "data.max_bad_fraction"),
    ]:
        with pytest.raises(ConfigError) as info:
            _data(**fields)
        assert info.value.field == name
