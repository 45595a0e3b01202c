"""File formats -> records. Every record keeps its line number so errors can point at it.

A row that cannot become a record (wrong field count, invalid JSON line) is a bad row: the
readers record it in a `BadRows` collector and go on, so one pass reports all of them.
`iter_records` streams the same records (and errors) without holding the file in memory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmadapt.data.validation import BadRows, FileError, collect, text_problem
from lmadapt.errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "dataset")
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}


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
    if Path(path).is_dir() and (Path(path) / "dataset_info.json").is_file():
        return "dataset"  # written by datasets' save_to_disk
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
    _check_file(path)
    raw = Path(path).read_bytes()
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
    """Read csv/tsv (header row), jsonl (one object a line), json (a list of objects), Parquet
    or a `datasets` save_to_disk directory.

    Bad rows go to `bad`; without one, they are all raised together at the end.
    """
    fmt = detect_format(path, fmt)
    if fmt in _TEXT_FORMATS:
        text = read_text(path)
        newline = "\n" if fmt == "jsonl" else ""
        return list(_records(str(path), fmt, io.StringIO(text, newline=newline), bad))
    return list(iter_records(path, fmt, bad))


def iter_records(
    path: str | Path, fmt: str = "auto", bad: BadRows | None = None
) -> Iterator[Record]:
    """`read_records` one record at a time, the file read as the records are asked for, so a
    file larger than memory can be validated and encoded (the cache build streams it). The
    errors are `read_records`' own; a file that is not UTF-8 is reported by `read_text`."""
    fmt = detect_format(path, fmt)
    file = str(path)
    if fmt == "json":  # one JSON value: there is nothing to stream
        yield from read_records(path, fmt, bad)
        return
    if fmt in _TEXT_FORMATS:
        _check_file(path)
        yield from _records(file, fmt, _file_lines(path, "\n" if fmt == "jsonl" else ""), bad)
        return
    yield from _records(file, fmt, _TABLES[fmt](file), bad)


def _check_file(path: str | Path) -> None:
    p = Path(path)
    if not p.exists():
        raise DataError(str(path), "file not found")
    if not p.is_file():
        raise DataError(str(path), "not a regular file")


def _file_lines(path: str | Path, newline: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as f:
            yield from f
    except UnicodeDecodeError:
        read_text(path)  # raises the DataError that names the line
        raise


def _records(file: str, fmt: str, source: Any, bad: BadRows | None) -> Iterator[Record]:
    """The records a row reader yields; every row, good or bad, counts in `bad.total`."""
    with collect(file, bad) as bad:
        kept = 0
        for record in _READERS[fmt](file, source, bad):
            bad.total += 1
            if record is not None:
                kept += 1
                yield record
        if not kept:
            bad.finish()  # every row was bad: refused under any policy
            raise DataError(file, "no data rows (only a header or blank lines)")


def _no_nul(file: str, lines: Iterable[str]) -> Iterator[str]:
    for i, line in enumerate(lines, start=1):
        if "\x00" in line:
            raise DataError(file, "binary data (NUL byte) in a text file", i)
        yield line


def _read_delimited(
    file: str, lines: Iterable[str], delimiter: str, bad: BadRows
) -> Iterator[Record | None]:
    """Records of a csv/tsv file's lines; None for a bad row (recorded in `bad`).

    TSV has no quoting (IANA text/tab-separated-values; GLUE, SUBJ and HF's GLUE loaders read it
    with QUOTE_NONE): a `"` is text. With csv's default quoting a stray quote at a field's start
    silently merged every row up to the next quote into one field.
    """
    reader = csv.reader(
        _no_nul(file, lines),
        delimiter=delimiter,
        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
    )
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
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a huge field; the reader goes on with the next row
            bad.add(DataError(file, f"malformed {kind}: {e}", reader.line_num))
            yield None
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
            yield None
            continue
        yield Record(file, reader.line_num, dict(zip(header, row)), tabular=True)


def _loads(file: str, text: str, line: int | None) -> Any:
    """json.loads whose every failure is a DataError: syntax, >4300-digit ints, deep nesting."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = line if line is not None else e.lineno
        raise DataError(file, f"invalid JSON ({e.msg} at column {e.colno})", where) from None
    except (ValueError, RecursionError) as e:
        raise DataError(file, f"unreadable JSON value ({e})", line) from None


def _read_jsonl(file: str, lines: Iterable[str], bad: BadRows) -> Iterator[Record | None]:
    # lines split on \n only: str.splitlines() also breaks at U+2028 etc., which JSON strings
    # may hold.
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = None
        with bad.row():
            obj = _loads(file, line, i)
            if not isinstance(obj, dict):
                raise DataError(file, f"expected a JSON object, got {type(obj).__name__}", i)
            record = Record(file, i, obj)
        yield record


def _read_json(file: str, lines: Iterable[str], bad: BadRows) -> Iterator[Record | None]:
    data = _loads(file, "".join(lines), None)
    if not isinstance(data, list):
        raise DataError(file, f"expected a JSON list of objects, got {type(data).__name__}", 1)
    # json.loads keeps no positions; index i is reported as "line" i+1 of the list (1-based item).
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            bad.add(DataError(file, f"item {i}: expected a JSON object, got {type(obj).__name__}"))
            yield None
            continue
        yield Record(file, i, obj)


def _read_table(file: str, rows: Iterable[dict[str, Any]], bad: BadRows) -> Iterator[Record]:
    """Rows of a columnar file; "line" N is its N-th row (1-based), as errors name it."""
    for i, row in enumerate(rows, start=1):
        yield Record(file, i, row, tabular=True)


_BATCH = 4096
"""Rows a columnar reader converts to Python at a time."""


def _parquet_rows(file: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    _check_file(file)
    try:
        table = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        raise DataError(file, f"not a readable Parquet file ({e})") from None
    for batch in table.iter_batches(batch_size=_BATCH):
        yield from batch.to_pylist()


def _dataset_rows(file: str) -> Iterator[dict[str, Any]]:
    """A `datasets` save_to_disk directory: its Arrow files are memory-mapped, not loaded."""
    import datasets

    if not Path(file).is_dir():
        raise DataError(file, "not a directory (a datasets save_to_disk directory is one)")
    try:
        ds = datasets.load_from_disk(file)
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for a bad dir
        raise DataError(file, f"not a readable datasets directory ({e})") from None
    if not isinstance(ds, datasets.Dataset):
        splits = ", ".join(ds)
        raise DataError(file, f"holds several splits ({splits}); name one split's directory")
    for batch in ds.iter(batch_size=_BATCH):
        columns = list(batch)
        yield from (dict(zip(columns, values)) for values in zip(*batch.values()))


_RowReader = Callable[[str, Any, BadRows], Iterator[Record | None]]
"""(file, its lines or rows, the bad-row collector) -> records, None for a bad row."""

_READERS: dict[str, _RowReader] = {
    "csv": lambda f, lines, b: _read_delimited(f, lines, ",", b),
    "tsv": lambda f, lines, b: _read_delimited(f, lines, "\t", b),
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_table,
    "dataset": _read_table,
}
_TABLES = {"parquet": _parquet_rows, "dataset": _dataset_rows}
_TEXT_FORMATS = ("csv", "tsv", "jsonl", "json")


def get_text(record: Record, column: str) -> str:
    """A required, non-empty text field."""
    if column not in record.fields:
        raise record.missing(column)
    value = record.fields[column]
    problem = text_problem(value)
    if problem is not None:
        raise record.error(problem, column)
    return value.strip()
