"""A subset of a data file, written in its own format, reads back as the same examples."""

from __future__ import annotations

import json

import pytest

from lmadapt.data.subset import write_subset
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task

ROWS = [("a plain one", "pos"), ('with "quotes", and a comma', "neg"), ("two\nlines", "pos")]
ROWS_TSV = [
    ("a plain one", "pos"),
    ('with "quotes", and a comma', "neg"),
    ('"an open quote', "pos"),
]


def _write(path, fmt):
    if fmt == "csv":
        import csv

        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(ROWS)
    elif fmt == "tsv":  # no quoting in TSV: a row is a line, a quote is text
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS_TSV))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS))
    else:
        path.write_text(json.dumps([{"text": t, "label": y} for t, y in ROWS]))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json"])
def test_tabular_subset_reads_back(tmp_path, fmt):
    src = tmp_path / f"all.{fmt}"
    _write(src, fmt)
    task = build_task(parse_section(TASKS, "type", "classification", "task"))
    examples = task.read(str(src))
    lines = task.profile(examples).source_lines
    out = write_subset(src, "auto", [lines[2], lines[1]], tmp_path / f"sub.{fmt}")
    back = task.read(str(out))
    rows = ROWS_TSV if fmt == "tsv" else ROWS
    assert [(ex.text, ex.label) for ex in back] == [rows[2], rows[1]]  # in the order asked


def test_conll_subset_keeps_whole_sentences(tmp_path):
    src = tmp_path / "all.conll"
    src.write_text(
        "-DOCSTART- -X- -X- O\n\nAnna X X B-PER\nsang X X O\n\nIn X X O\nRome X X B-LOC\n"
    )
    task = build_task(parse_section(TASKS, "type", "token_classification", "task"))
    examples = task.read(str(src))
    out = write_subset(src, "auto", [task.profile(examples).source_lines[1]], tmp_path / "s.conll")
    (back,) = task.read(str(out))
    assert back.words == ["In", "Rome"] and back.tags == ["O", "B-LOC"]
