"""Bad rows: every row-level problem of a file found in one pass, then refused together or skipped.

Readers validate each row inside `BadRows.row()`: a DataError raised there is recorded and the
row dropped, so one run reports every bad row instead of the first. File-level problems (missing
file, bad encoding, header without a needed column) are raised outside `row()`, or as a
`FileError` inside it, and always stop the read. The collector is handed down from the caller
that owns the policy (`collect`); whoever creates it decides, in `finish`, whether the file is
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from lmadapt.errors import DataError

MAX_LISTED = 20
"""Bad rows an error message lists; the rest are counted."""

T = TypeVar("T")
R = TypeVar("R")


def text_problem(value: Any) -> str | None:
    """Why `value` cannot be a text input (None when it can): not a string, blank, or holding a
    lone surrogate that no tokenizer encodes (a JSON "\\ud800" escape, or bytes that are not
    UTF-8 in a command-line argument, which Python decodes to surrogates)."""
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__} {value!r}"
    if not value.strip():
        return "empty text"
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "text is not valid UTF-8 (an unpaired surrogate: a bad \\u escape or bytes)"
    return None


class FileError(DataError):
    """A problem of the whole file found while checking a row (e.g. a CSV header without a
    needed column): never recorded as a bad row, never skipped."""


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int | None
    field: str | None
    message: str

    @classmethod
    def from_error(cls, e: DataError) -> BadRow:
        # DataError keeps no bare message: strip the "file F, line L, field 'x': " it prepends.
        prefix = str(DataError(e.file, "", e.line, e.field))
        return cls(e.file, e.line, e.field, str(e)[len(prefix) :])

    def __str__(self) -> str:
        return str(DataError(self.file, self.message, self.line, self.field))


class BadRowsError(DataError):
    """A file refused for its bad rows, all listed; `line` and `field` are the first row's."""

    def __init__(self, rows: list[BadRow], summary: str | None = None):
        first = rows[0]
        if summary is None and len(rows) == 1:  # the message a single bad row always had
            super().__init__(first.file, first.message, first.line, first.field)
        else:
            listed = "".join(f"\n  {r}" for r in rows[:MAX_LISTED])
            more = f"\n  ... and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
            head = summary or f"{len(rows)} bad rows"
            super().__init__(first.file, f"{head}:{listed}{more}")
            self.line, self.field = first.line, first.field
        self.rows = rows


@dataclass
class BadRows:
    """The bad rows of one file and the policy for them (`data.bad_rows`)."""

    file: str
    policy: Literal["error", "skip"] = "error"
    max_bad_fraction: float = 0.1
    total: int = 0
    """Rows in the file, good and bad; set by the reader that splits the file into rows."""
    rows: list[BadRow] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.rows.append(BadRow.from_error(error))

    @contextmanager
    def row(self) -> Iterator[None]:
        """Check one row: a DataError inside is recorded (FileError passes through)."""
        try:
            yield
        except FileError:
            raise
        except DataError as e:
            self.add(e)

    def keep(self, items: Iterable[T], check: Callable[[T], R]) -> list[R]:
        """`check` of every item that passes it; the others are recorded as bad rows."""
        out = []
        for item in items:
            with self.row():
                out.append(check(item))
        return out

    def finish(self) -> None:
        """Refuse the file: any bad row under `error`, too many under `skip`."""
        if not self.rows:
            return
        # File order: parsing finds its bad rows before the field checks find theirs.
        self.rows.sort(key=lambda r: (r.line is None, r.line or 0))
        if self.policy == "error":
            raise BadRowsError(self.rows)
        total = max(self.total, len(self.rows))
        if len(self.rows) > self.max_bad_fraction * total:
            raise BadRowsError(
                self.rows,
                f"{len(self.rows)} of {total} rows are bad ({len(self.rows) / total:.1%}), "
                f"more than data.max_bad_fraction={self.max_bad_fraction} allows with "
                "data.bad_rows=skip",
            )


@contextmanager
def collect(file: str, bad: BadRows | None) -> Iterator[BadRows]:
    """The caller's collector, or one of our own that refuses any bad row on the way out.

    Nested readers pass the collector down, so only the outermost one finishes it: a file's
    parse errors and field errors end up in one report.
    """
    if bad is not None:
        yield bad
        return
    own = BadRows(file)
    yield own
    own.finish()
