"""CoNLL column files and entity tag schemes (IOB1, IOB2, BIOES).

Token classification reads sentences as records whose fields are parallel lists (`tokens`,
`tags`, `lines`), so that a tag error can name the exact line of the offending token even after
the sentence has been grouped. All schemes are converted to IOB2, the one the task trains on.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmadapt.data.readers import Record, read_text
from lmadapt.data.validation import BadRows, collect
from lmadapt.errors import DataError

SCHEMES = ("iob1", "iob2", "bioes")
CONLL_EXTENSIONS = (".conll", ".txt")
DOCSTART = "-DOCSTART-"
_TAG = re.compile(r"^(?:O|([BIES])-(\S+))$")


def is_conll(path: str | Path, fmt: str) -> bool:
    """CoNLL when asked for, or for `.conll`/`.txt` files when the format is left on auto."""
    return fmt == "conll" or (fmt == "auto" and Path(path).suffix.lower() in CONLL_EXTENSIONS)


def read_conll(
    path: str | Path,
    token_column: int = 0,
    tag_column: int = -1,
    labelled: bool = True,
    bad: BadRows | None = None,
) -> list[Record]:
    """One record per sentence: blank lines separate sentences, `-DOCSTART-` lines are skipped.

    Columns are whitespace-separated; every token line must have the same number of columns,
    which catches a stray space inside a token before it silently shifts the tag column. A
    sentence with such a line is a bad row, recorded in `bad` (raised at the end without one).
    """
    file = str(path)
    text = read_text(path)
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    width: int | None = None
    broken = False  # the current sentence has a bad line: drop it whole

    def flush() -> None:
        nonlocal broken
        if tokens and not broken:
            fields = {"tokens": list(tokens), "lines": list(lines)}
            if labelled:
                fields["tags"] = list(tags)
            records.append(Record(file, lines[0], fields))
        tokens.clear()
        tags.clear()
        lines.clear()
        broken = False

    with collect(file, bad) as bad:
        for number, raw in enumerate(text.splitlines(), start=1):
            cols = raw.split()
            if not cols or cols[0] == DOCSTART:
                flush()
                continue
            if broken:
                continue
            if width is None:
                width = len(cols)
                _check_columns(file, number, width, token_column, tag_column, labelled)
            elif len(cols) != width:
                message = f"expected {width} columns like the first token line, found {len(cols)}"
                bad.add(DataError(file, message, number))
                broken = True
                continue
            tokens.append(cols[token_column])
            if labelled:
                tags.append(cols[tag_column])
            lines.append(number)
        flush()
        bad.total = len(records) + len(bad.rows)
        if not records:
            bad.finish()  # every sentence was bad: refused under any policy
            raise DataError(file, "no sentences (only blank or -DOCSTART- lines)")
        return records


def _check_columns(
    file: str, line: int, width: int, token_column: int, tag_column: int, labelled: bool
) -> None:
    if not -width <= token_column < width:
        raise DataError(
            file, f"task.token_column={token_column} but lines have {width} columns", line
        )
    bad_tag = not -width <= tag_column < width or tag_column % width == token_column % width
    if labelled and bad_tag:
        raise DataError(
            file,
            f"task.tag_column={tag_column} does not pick a tag column "
            f"(lines have {width} columns, token_column={token_column})",
            line,
        )


class TagError(ValueError):
    """A bad tag at token `index` of a sentence; readers turn it into a DataError with a line."""

    def __init__(self, index: int, message: str):
        self.index = index
        super().__init__(message)


def parse_tag(tag: str) -> tuple[str, str | None]:
    """('O', None) or (prefix, type); raises ValueError for anything else."""
    m = _TAG.match(tag)
    if not m:
        raise ValueError(f"malformed tag {tag!r} (expected O or B-/I-/E-/S-TYPE)")
    return (m.group(1), m.group(2)) if m.group(1) else ("O", None)


def detect_scheme(sequences: list[list[str]]) -> str:
    """bioes if E-/S- occur; iob1 if some entity starts with I-; else iob2.

    An IOB1 file in which no entity starts with I- tags exactly like IOB2, so the choice is safe.
    Malformed tags are left for `to_iob2` to report with their line.
    """
    prefixes = set()
    starts_with_i = False
    for seq in sequences:
        prev = "O"
        for tag in seq:
            m = _TAG.match(tag)
            if m and m.group(1):
                prefixes.add(m.group(1))
                if m.group(1) == "I" and not _continues(prev, m.group(2)):
                    starts_with_i = True
            prev = tag
    if prefixes & {"E", "S"}:
        return "bioes"
    return "iob1" if starts_with_i else "iob2"


def _continues(prev: str, kind: str) -> bool:
    return prev in (f"B-{kind}", f"I-{kind}")


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """Convert one sentence's tags to IOB2; raises TagError at the first invalid token."""
    out: list[str] = []
    parsed = []
    for i, tag in enumerate(tags):
        try:
            parsed.append(parse_tag(tag))
        except ValueError as e:
            raise TagError(i, str(e)) from None
    for i, (prefix, kind) in enumerate(parsed):
        prev = out[-1] if out else "O"
        if kind is None:  # the tag O: parse_tag gives every other tag a type
            out.append("O")
            continue
        if scheme != "bioes" and prefix in ("E", "S"):
            raise TagError(i, f"tag {tags[i]!r} is not valid in scheme {scheme}")
        if scheme == "iob1":
            # IOB1 opens an entity with I-; B- only separates two adjacent entities of a type.
            new = prefix == "B" or not _continues(prev, kind)
            out.append(f"{'B' if new else 'I'}-{kind}")
            continue
        if prefix in ("I", "E") and not _continues(prev, kind):
            raise TagError(
                i,
                f"{tags[i]!r} after {tags[i - 1] if i else 'sentence start'!r} "
                f"(in {scheme} an entity must start with B-{kind}"
                + (f" or S-{kind})" if scheme == "bioes" else ")"),
            )
        if scheme == "bioes":
            nxt = parsed[i + 1] if i + 1 < len(parsed) else ("O", None)
            open_after = prefix in ("B", "I")
            continues = nxt[0] in ("I", "E") and nxt[1] == kind
            if open_after != continues:
                what = "must be followed by" if open_after else "cannot be followed by"
                raise TagError(
                    i,
                    f"in bioes {tags[i]!r} {what} I-{kind} or E-{kind}"
                    f" (next: {tags[i + 1] if i + 1 < len(tags) else 'sentence end'!r})",
                )
        out.append(f"{'B' if prefix in ('B', 'S') else 'I'}-{kind}")
    return out
