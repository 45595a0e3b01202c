"""Extractive question answering data: SQuAD v1.1/v2.0 JSON and a flat JSONL form.

SQuAD JSON nests questions under paragraphs under articles
(`data[i].paragraphs[j].qas[k]`, answers `[{text, answer_start}]`, v2.0 adds `is_impossible`
and `plausible_answers`); JSON has no line numbers, so a bad question is named by its id and
that position. Flat JSONL has one question a line: `{id?, context, question, answers}` with
answers as `{text: [...], answer_start: [...]}` (the Hugging Face datasets form) or a list of
`{text, answer_start}`. A question with no answers is unanswerable (SQuAD v2.0); whether the task
accepts those is its decision, not the reader's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmadapt.data.readers import Record, _loads, detect_format, read_records, read_text
from lmadapt.data.validation import BadRows, collect, text_problem
from lmadapt.errors import DataError


@dataclass(frozen=True)
class Answer:
    text: str
    start: int
    """Character offset of `text` in the context."""

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass
class QAExample:
    question: str
    context: str
    answers: list[Answer] | None = None
    """Gold answers (any of them counts); [] for an unanswerable question, None unlabelled."""
    id: str = ""
    file: str = ""
    line: int | None = None
    """JSONL line; None in SQuAD JSON, where `where` names the question."""
    where: str = ""
    """Position in SQuAD JSON, e.g. data[0].paragraphs[3].qas[1]; empty for JSONL."""
    windows: list[Any] = field(default_factory=list)
    """Set by the task's encoding: one entry per model input cut from the context."""

    def error(self, message: str, field: str | None = None) -> DataError:
        """A DataError naming the file and the record (line, or id and JSON position)."""
        if self.where:
            field = f"{self.where}.{field}" if field else self.where
            message = f"question {self.id!r}: {message}"
        return DataError(self.file, message, self.line, field)


def read_qa(
    path: str, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
) -> list[QAExample]:
    """Questions of a SQuAD JSON file (an object with `data`) or of flat JSONL / a JSON list.

    Bad questions go to `bad` (raised together at the end without one); an unlabelled read
    ignores answers.
    """
    fmt = detect_format(path, fmt)
    with collect(path, bad) as bad:
        if fmt == "json":
            data = _loads(path, read_text(path), None)
            if isinstance(data, dict):
                return _read_squad(path, data, labelled, bad)
        if fmt not in ("json", "jsonl"):
            raise DataError(path, f"question answering reads SQuAD JSON or JSONL, not {fmt}")
        return bad.keep(read_records(path, fmt, bad), lambda r: _record(r, labelled))


def _record(record: Record, labelled: bool) -> QAExample:
    """One question of flat JSONL (or a JSON list); its id defaults to its line number."""
    ex = QAExample("", "", id=str(record.fields.get("id", record.line)), file=record.file)
    ex.line = record.line  # a JSONL line, or the 1-based item of a JSON list
    return _example(record.fields, ex, labelled)


def _read_squad(path: str, data: dict[str, Any], labelled: bool, bad: BadRows) -> list[QAExample]:
    articles = data.get("data")
    if not isinstance(articles, list):
        raise DataError(path, "SQuAD JSON needs a 'data' list of articles", field="data")
    out: list[QAExample] = []
    for i, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            bad.add(
                DataError(path, "expected an object with a 'paragraphs' list", None, f"data[{i}]")
            )
            continue
        for j, para in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                bad.add(DataError(path, "expected an object with a 'qas' list", None, where))
                continue
            for k, qa in enumerate(qas):
                bad.total += 1
                with bad.row():
                    if not isinstance(qa, dict):
                        raise DataError(
                            path,
                            f"expected an object, got {type(qa).__name__}",
                            None,
                            f"{where}.qas[{k}]",
                        )
                    ex = QAExample(
                        "",
                        "",
                        id=str(qa.get("id", f"{where}.qas[{k}]")),
                        file=path,
                        where=f"{where}.qas[{k}]",
                    )
                    fields = {**qa, "context": para.get("context")}
                    out.append(_example(fields, ex, labelled, context_where=f"{where}.context"))
    if not out and not bad.rows:
        raise DataError(path, "no questions in the SQuAD JSON")
    return out


def _text(fields: dict[str, Any], name: str, ex: QAExample, where: str | None = None) -> str:
    """A required, non-empty text field; `where` names a SQuAD paragraph's field (the context)."""
    value = fields.get(name)
    problem = "missing field" if value is None else text_problem(value)
    if problem is None:
        assert isinstance(value, str)  # text_problem passes nothing else
        return value
    raise _at(ex, where, problem) if where else ex.error(problem, name)


def _at(ex: QAExample, where: str, message: str) -> DataError:
    """An error about a paragraph-level field (the context) of a SQuAD JSON question."""
    return DataError(ex.file, f"question {ex.id!r}: {message}", ex.line, where)


def _example(
    fields: dict[str, Any], ex: QAExample, labelled: bool, context_where: str | None = None
) -> QAExample:
    """Fill `ex` from one question's fields, checking every answer against the context."""
    ex.context = _text(fields, "context", ex, context_where)
    ex.question = _text(fields, "question", ex).strip()
    if not labelled:
        return ex
    if "answers" not in fields:
        raise ex.error("missing field (give [] for an unanswerable question)", "answers")
    ex.answers = [_answer(a, i, ex) for i, a in enumerate(_answer_items(fields["answers"], ex))]
    if fields.get("is_impossible") is True and ex.answers:
        raise ex.error("is_impossible is true but the question has answers", "answers")
    return ex


def _answer_items(value: Any, ex: QAExample) -> list[Any]:
    """Answers as a list of {text, answer_start}, from either accepted shape."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and set(value) >= {"text", "answer_start"}:
        texts, starts = value["text"], value["answer_start"]
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise ex.error("'text' and 'answer_start' must be lists of equal length", "answers")
        return [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    raise ex.error(
        "expected a list of {text, answer_start} or {text: [...], answer_start: [...]}", "answers"
    )


def _answer(item: Any, i: int, ex: QAExample) -> Answer:
    name = f"answers[{i}]"
    if not isinstance(item, dict):
        raise ex.error(f"expected an object, got {type(item).__name__}", name)
    text, start = item.get("text"), item.get("answer_start")
    if not isinstance(text, str) or not text:
        raise ex.error(f"expected non-empty answer text, got {text!r}", f"{name}.text")
    if isinstance(start, bool) or not isinstance(start, int):
        raise ex.error(f"expected a character offset, got {start!r}", f"{name}.answer_start")
    n = len(ex.context)
    if start < 0 or start + len(text) > n:
        raise ex.error(
            f"answer {text!r} at {start}..{start + len(text)} lies outside the context "
            f"({n} characters)",
            f"{name}.answer_start",
        )
    found = ex.context[start : start + len(text)]
    if found != text:
        raise ex.error(
            f"answer text {text!r} not found at answer_start {start} (the context there reads "
            f"{found!r})",
            f"{name}.answer_start",
        )
    return Answer(text, start)
