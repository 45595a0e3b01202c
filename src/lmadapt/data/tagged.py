"""Tagged sentences: words with one IOB2 tag each, read from CoNLL columns or JSONL.

JSONL gives either pre-tokenised words with their tags, or raw text with character spans, which
is split into words here (cut at every span boundary, so a span always covers whole words). Tags
are converted to IOB2 on reading, so that everything downstream sees one scheme. Which columns and
fields hold what comes in as a `TaggedLayout`, not a task config: the data layer knows no tasks.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from lmadapt.data.conll import TagError, detect_scheme, is_conll, read_conll, to_iob2
from lmadapt.data.readers import Record, read_records
from lmadapt.data.validation import BadRows, collect
from lmadapt.errors import DataError

# Abbreviations (U.S.), words with inner - . & (1996-08-22, AT&T), clitics ('s), single symbols.
_WORD = re.compile(r"(?:[^\W\d_]\.){2,}|\w+(?:[-.&]\w+)*|['’]\w+|[^\w\s]")


@dataclass(frozen=True)
class TaggedLayout:
    """Where tagged sentences keep their words and tags, in CoNLL columns and in JSONL fields."""

    token_column: int
    """CoNLL: column of the token (0-based; negative counts from the end)."""
    tag_column: int
    """CoNLL: column of the tag."""
    tokens_field: str
    """JSONL: list of words (pre-tokenised input) ..."""
    tags_field: str
    """... and its list of tags, one per word."""
    text_field: str
    """JSONL: raw text (split into words on reading) ..."""
    spans_field: str
    """... and its entities as [{start, end, label}] character offsets (end exclusive)."""


@dataclass
class Window:
    """One model input cut from an example: which (token position, word index) it predicts."""

    owned: list[tuple[int, int]]


@dataclass
class Example:
    words: list[str]
    text: str
    """The words' source text: the raw text, or the words joined by single spaces."""
    offsets: list[tuple[int, int]]
    """Character [start, end) of each word in `text`."""
    tags: list[str] | None = None
    """IOB2 tags, one per word; None when unlabelled."""
    file: str = ""
    line: int = 0
    lines: list[int] | None = None
    """CoNLL: the line of each word, for errors that point at one token."""
    windows: list[Window] = field(default_factory=list, repr=False)
    """Set by the task's `encode`: the features this example became, in order."""
    origin: list[int] | None = None
    """A perturbed copy's words: the index of each in the example it was made from (robustness
    compares predictions by source word); None for an example as read."""

    def word_line(self, i: int) -> int:
        return self.lines[i] if self.lines else self.line


def split_words(text: str, cuts: list[int] | None = None) -> list[tuple[int, int]]:
    """Character spans of the words of raw text; a word is also split at every offset in `cuts`.

    Cutting at entity boundaries guarantees that character spans map to whole words.
    """
    cuts = sorted(set(cuts or []))  # adjacent spans share a boundary
    out = []
    for m in _WORD.finditer(text):
        start, end = m.span()
        inner = cuts[bisect.bisect_right(cuts, start) : bisect.bisect_left(cuts, end)]
        out += list(zip([start, *inner], [*inner, end]))
    return out


def read_tagged(
    path: str,
    fmt: str = "auto",
    labelled: bool = True,
    bad: BadRows | None = None,
    *,
    scheme: str,
    layout: TaggedLayout,
) -> list[Example]:
    """CoNLL columns (.conll/.txt), or JSONL with tokens + tags or text + spans.

    `scheme` is the files' tag scheme (iob1, iob2, bioes, or auto to detect it). Bad sentences
    go to `bad` (raised together at the end without one).
    """
    with collect(path, bad) as bad:
        if is_conll(path, fmt):
            records = read_conll(path, layout.token_column, layout.tag_column, labelled, bad)
            raw = bad.keep(
                records,
                lambda r: _from_tokens(r, "tokens", "tags", labelled, r.fields["lines"]),
            )
        else:
            records = read_records(path, fmt, bad)
            raw = bad.keep(records, lambda r: _from_record(r, labelled, layout))
        if not labelled:
            return [ex for ex, _ in raw]
        if scheme == "auto":
            scheme = detect_scheme([ex.tags or [] for ex, converted in raw if not converted])
        return bad.keep(raw, lambda item: _to_iob2(*item, scheme, layout.tags_field))


def _to_iob2(ex: Example, converted: bool, scheme: str, tags_field: str) -> Example:
    """Tags given per token are in the file's scheme; tags from spans are IOB2 already."""
    if converted:
        return ex
    try:
        ex.tags = to_iob2(ex.tags or [], scheme)
    except TagError as e:
        where = "" if ex.lines else f"token {e.index} ({ex.words[e.index]!r}): "
        raise DataError(
            ex.file,
            f"{where}{e} [scheme {scheme}]",
            ex.word_line(e.index),
            None if ex.lines else tags_field,
        ) from None
    return ex


def _from_record(r: Record, labelled: bool, layout: TaggedLayout) -> tuple[Example, bool]:
    """A JSONL record as an example, and whether its tags are IOB2 already (made from spans)."""
    if layout.tokens_field in r.fields:
        return _from_tokens(r, layout.tokens_field, layout.tags_field, labelled)
    if layout.text_field in r.fields:
        return _from_text(r, labelled, layout.text_field, layout.spans_field), True
    raise r.error(
        f"needs '{layout.tokens_field}' (with '{layout.tags_field}') or '{layout.text_field}' "
        f"(with '{layout.spans_field}'); fields present: {', '.join(map(str, r.fields))}"
    )


def _from_tokens(
    r: Record,
    tokens_key: str,
    tags_key: str,
    labelled: bool,
    lines: list[int] | None = None,
) -> tuple[Example, bool]:
    words = r.fields[tokens_key]
    if not isinstance(words, list) or not words:
        raise r.error(f"expected a non-empty list of words, got {words!r}", tokens_key)
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w.strip():
            raise r.error(f"word {i} is {w!r}; expected non-blank text", tokens_key)
    tags = None
    if labelled:
        if tags_key not in r.fields:
            raise r.error(f"missing; fields present: {', '.join(map(str, r.fields))}", tags_key)
        tags = r.fields[tags_key]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise r.error(f"expected a list of tag strings, got {tags!r}", tags_key)
        if len(tags) != len(words):
            raise r.error(f"{len(tags)} tags for {len(words)} words", tags_key)
    offsets, pos = [], 0
    for w in words:
        offsets.append((pos, pos + len(w)))
        pos += len(w) + 1
    return Example(list(words), " ".join(words), offsets, tags, r.file, r.line, lines), False


def _from_text(r: Record, labelled: bool, key: str, spans_key: str) -> Example:
    text = r.fields[key]
    if not isinstance(text, str) or not text.strip():
        raise r.error(f"expected non-blank text, got {text!r}", key)
    spans = _spans(r, text, spans_key) if labelled else []
    offsets = split_words(text, [c for s, e, _ in spans for c in (s, e)])
    tags = ["O"] * len(offsets)
    starts = [s for s, _ in offsets]
    for start, end, label in spans:
        first = i = bisect.bisect_left(starts, start)
        while i < len(offsets) and offsets[i][1] <= end:  # words never cross a boundary
            tags[i] = f"{'B' if i == first else 'I'}-{label}"
            i += 1
    words = [text[s:e] for s, e in offsets]
    return Example(words, text, offsets, tags if labelled else None, r.file, r.line)


def _spans(r: Record, text: str, key: str) -> list[tuple[int, int, str]]:
    if key not in r.fields:
        raise r.error(f"missing; fields present: {', '.join(map(str, r.fields))}", key)
    raw = r.fields[key]
    if not isinstance(raw, list):
        raise r.error(f"expected a list of {{start, end, label}}, got {raw!r}", key)
    spans = []
    for i, s in enumerate(raw):
        if not (isinstance(s, dict) and {"start", "end", "label"} <= set(s)) or not all(
            isinstance(s[k], int) and not isinstance(s[k], bool) for k in ("start", "end")
        ):
            raise r.error(f"span {i}: expected {{start: int, end: int, label}}, got {s!r}", key)
        start, end, label = s["start"], s["end"], s["label"]
        if not 0 <= start < end <= len(text) or not text[start:end].strip():
            raise r.error(
                f"span {i}: [{start}, {end}) is empty, blank or outside the text "
                f"({len(text)} characters)",
                key,
            )
        if not isinstance(label, str) or not re.fullmatch(r"\S+", label):
            raise r.error(f"span {i}: label must be a non-blank word, got {label!r}", key)
        spans.append((start, end, label))
    spans.sort()
    for (s1, e1, _), (s2, e2, _) in zip(spans, spans[1:]):
        if s2 < e1:
            raise r.error(f"spans [{s1}, {e1}) and [{s2}, {e2}) overlap", key)
    return spans
