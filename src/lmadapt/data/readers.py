"""File formats -> records. Every record keeps its line number so errors can point at it.

A row that cannot become a record (wrong field count, invalid JSON line) is a bad row: the
readers record it in a `BadRows` collector and go on, so one pass reports all of them.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmadapt.data.validation import BadRows, FileError, collect
from lmadapt.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "json")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


@dataclass(frozen=True)
class Record:
    file: str
    line: int
    fields: dict[str, Any]
    tabular: bool = False
    """From a csv/tsv file, where every row has the header's columns."""

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(self.file, message, line=self.line, field=field)

    def missing(self, column: str) -> DataError:
        """A missing column: in a csv/tsv file the header lacks it, which no row can fix."""
        message = f"missing column; columns present: {', '.join(map(str, self.fields))}"
        kind = FileError if self.tabular else DataError
        return kind(self.file, message, line=self.line, field=column)


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(str(path), f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
        return fmt
    ext = Path(path).suffix.lower()
    if ext not in _EXTENSIONS:
        raise DataError(
            str(path),
            f"cannot tell the format from extension '{ext}'; set data.format "
            f"to one of {', '.join(FORMATS)}",
        )
    return _EXTENSIONS[ext]


def read_text(path: str | Path) -> str:
    """Read UTF-8 text (BOM allowed); a bad byte is reported with its line number."""
    p = Path(path)
    if not p.exists():
        raise DataError(str(path), "file not found")
    if not p.is_file():
        raise DataError(str(path), "not a regular file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            str(path), f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", line
        ) from None
    if not text.strip():
        raise DataError(str(path), "file is empty")
    return text


def read_records(path: str | Path, fmt: str = "auto", bad: BadRows | None = None) -> list[Record]:
    """Read csv/tsv (header row), jsonl (one object a line) or json (a list of objects).

    Bad rows go to `bad`; without one, they are all raised together at the end.
    """
    fmt = detect_format(path, fmt)
    text = read_text(path)
    with collect(str(path), bad) as bad:
        records = _READERS[fmt](str(path), text, bad)
        bad.total = len(records) + len(bad.rows)
        if not records:
            bad.finish()  # every row was bad: refused under any policy
            raise DataError(str(path), "no data rows (only a header or blank lines)")
        return records


def _read_delimited(file: str, text: str, delimiter: str, bad: BadRows) -> list[Record]:
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(file, "binary data (NUL byte) in a text file", line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        # The header is the first non-blank row; csv.Error (e.g. a huge field) is a data error.
        header = next((row for row in reader if any(c.strip() for c in row)), None)
    except csv.Error as e:
        raise DataError(file, f"malformed {kind} header: {e}", reader.line_num) from None
    if header is None:
        raise DataError(file, "file is empty")
    header_line = reader.line_num
    header = [h.strip() for h in header]
    if len(header) < 2 and delimiter == ",":
        tsv = "\t" in header[0]
        hint = " (tab-separated? use a .tsv extension or data.format=tsv)" if tsv else ""
        raise DataError(file, f"header has a single column {header!r}{hint}", header_line)
    if len(set(header)) != len(header) or any(not h for h in header):
        raise DataError(file, f"header has empty or repeated column names: {header}", header_line)
    records = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return records
        except csv.Error as e:  # e.g. a huge field; the reader goes on with the next row
            bad.add(DataError(file, f"malformed {kind}: {e}", reader.line_num))
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            bad.add(
                DataError(
                    file,
                    f"expected {len(header)} fields ({', '.join(header)}), found {len(row)}"
                    " (wrong delimiter or unquoted separator?)",
                    reader.line_num,
                )
            )
            continue
        records.append(Record(file, reader.line_num, dict(zip(header, row)), tabular=True))


def _loads(file: str, text: str, line: int | None) -> Any:
    """json.loads whose every failure is a DataError: syntax, >4300-digit ints, deep nesting."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = line if line is not None else e.lineno
        raise DataError(file, f"invalid JSON ({e.msg} at column {e.colno})", where) from None
    except (ValueError, RecursionError) as e:
        raise DataError(file, f"unreadable JSON value ({e})", line) from None


def _read_jsonl(file: str, text: str, bad: BadRows) -> list[Record]:
    records = []
    # split on \n only: str.splitlines() also breaks at U+2028 etc., which JSON strings may hold.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        with bad.row():
            obj = _loads(file, line, i)
            if not isinstance(obj, dict):
                raise DataError(file, f"expected a JSON object, got {type(obj).__name__}", i)
            records.append(Record(file, i, obj))
    return records


def _read_json(file: str, text: str, bad: BadRows) -> list[Record]:
    data = _loads(file, text, None)
    if not isinstance(data, list):
        raise DataError(file, f"expected a JSON list of objects, got {type(data).__name__}", 1)
    # json.loads keeps no positions; index i is reported as "line" i+1 of the list (1-based item).
    records = []
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            bad.add(DataError(file, f"item {i}: expected a JSON object, got {type(obj).__name__}"))
            continue
        records.append(Record(file, i, obj))
    return records


_READERS = {
    "csv": lambda f, t, b: _read_delimited(f, t, ",", b),
    "tsv": lambda f, t, b: _read_delimited(f, t, "\t", b),
    "jsonl": _read_jsonl,
    "json": _read_json,
}


def get_text(record: Record, column: str) -> str:
    """A required, non-empty text field."""
    if column not in record.fields:
        raise record.missing(column)
    value = record.fields[column]
    if not isinstance(value, str):
        raise record.error(f"expected text, got {type(value).__name__} {value!r}", column)
    if not value.strip():
        raise record.error("empty text", column)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates
            message = "text holds an unpaired surrogate (bad \\u escape)"
            raise record.error(message, column) from None
    return value.strip()
