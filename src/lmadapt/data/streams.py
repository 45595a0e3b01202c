"""Examples read again from their file each time they are iterated, instead of held in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, Protocol

from lmadapt.data.validation import BadRows
from lmadapt.errors import LmadaptError


class Examples(Sized, Iterable[Any], Protocol):
    """Examples of a file: a list, or (for a task that streams its files) a sized `Reread`
    that reads the file again when iterated."""


class Reread:
    """A re-iterable of examples that holds none: each iteration reads the file again.

    `read(bad)` yields the examples, recording bad rows in `bad`. The first iteration that
    reads the file through counts the examples and hands its bad rows (and rows read) to the
    collector given here, the caller's policy; the other iterations record into collectors
    nobody reads, since that pass reported them. With `limit`, iterations yield the first
    `limit` examples, the first full pass still reading the whole file so that every bad row is
    found."""

    def __init__(
        self,
        read: Callable[[BadRows], Iterable[Any]],
        bad: BadRows,
        count: int | None = None,
        limit: int | None = None,
    ):
        self.read, self.bad, self.count, self.limit = read, bad, count, limit

    def __iter__(self) -> Iterator[Any]:
        first = self.count is None
        into = BadRows(self.bad.file, "skip")
        n = 0
        for example in self.read(into):
            if self.limit is None or n < self.limit:
                n += 1
                yield example
            elif not first:
                return
        if first and self.count is None:  # read through: this pass reports the file
            self.count = n
            self.bad.rows += into.rows
            self.bad.total += into.total

    def __len__(self) -> int:
        if self.count is None:
            raise LmadaptError(f"{self.bad.file}: examples counted before the file was read")
        return self.count


def read_through(examples: Iterable[Any]) -> None:
    """Make sure a `Reread` has had its first full pass (bad rows recorded, examples counted)
    even when what iterated it (e.g. a task's fit) did not need every example."""
    if isinstance(examples, Reread) and examples.count is None:
        for _ in examples:
            pass


def limited(examples: Iterable[Any], n: int | None) -> Iterable[Any]:
    """The first `n` examples (all with None): a list's slice, or a `Reread` that stops there."""
    if n is None:
        return examples
    if isinstance(examples, Reread):
        return Reread(examples.read, examples.bad, None, n)
    return list(examples)[:n]
