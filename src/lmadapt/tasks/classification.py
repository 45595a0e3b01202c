"""Sequence classification: single-label (softmax + CE), multi-label (sigmoid + BCE), regression."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmadapt.data.batching import Collator
from lmadapt.data.readers import Record, get_text, iter_records, read_records
from lmadapt.data.streams import Reread
from lmadapt.data.validation import BadRows, collect
from lmadapt.errors import LmadaptError
from lmadapt.evaluate.explain import Explainable, Target
from lmadapt.evaluate.perturbations import Perturbation
from lmadapt.evaluate.report import classification_report_markdown
from lmadapt.evaluate.robustness import View
from lmadapt.inference import Encoded
from lmadapt.tasks.base import DataProfile, Evaluation, LogitsTask
from lmadapt.tasks.classification_problems import PROBLEMS, Problem
from lmadapt.tasks.configs import ClassificationConfig

TEXT_DEFAULTS = ("text", "sentence", "sentence1", "question")
PAIR_DEFAULTS = {"sentence1": "sentence2", "question": "passage", "premise": "hypothesis"}


@dataclass
class Example:
    text: str
    text_pair: str | None = None
    label: Any = None
    """Raw label: str (single), list[str] (multi), float (regression); None when unlabelled."""
    file: str = ""
    line: int = 0


class ClassificationTask(LogitsTask):
    """Sequence classification with a linear head on the pooled representation; what differs
    between single-label, multi-label and regression is its `problem`'s (see
    `classification_problems`)."""

    kind = "classification"
    peft_task_type = "SEQ_CLS"
    model_kinds = ("encoder", "causal")
    endpoint = "classify"

    def __init__(self, cfg: ClassificationConfig, state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.labels: list[str] = list(state["labels"]) if state else []
        if state:
            cfg.text_column = state.get("text_column", cfg.text_column)
            cfg.text_pair_column = state.get("text_pair_column", cfg.text_pair_column)
        self.problem: Problem = PROBLEMS[cfg.problem](cfg, state or {})
        self.label_distribution = self.problem.label_distribution
        self.description = f"classification ({cfg.problem})"
        self.default_metric = self.problem.default_metric
        self.metric_names: tuple[str, ...] = self.problem.metric_names

    @property
    def temperature(self) -> float | None:
        """Single-label: the temperature fitted on dev after training (None before)."""
        return self.problem.temperature

    @temperature.setter
    def temperature(self, value: float | None) -> None:
        self.problem.temperature = value

    # ------------------------------------------------------------------ data
    def _columns(self, record: Record) -> tuple[str, str | None]:
        text_col = self.cfg.text_column or next(
            (c for c in TEXT_DEFAULTS if c in record.fields), TEXT_DEFAULTS[0]
        )
        pair_col = self.cfg.text_pair_column
        if pair_col is None and self.cfg.text_column is None and text_col in PAIR_DEFAULTS:
            cand = PAIR_DEFAULTS[text_col]
            pair_col = cand if cand in record.fields else None
        self.cfg.text_column, self.cfg.text_pair_column = text_col, pair_col
        return text_col, pair_col

    def _label(self, record: Record) -> Any:
        col = self.cfg.label_column
        if col not in record.fields:
            raise record.missing(col)
        return self.problem.label(record.fields[col], record, col)

    def read(
        self, path: str, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
    ) -> list[Example]:
        """Examples of the rows that pass; bad rows go to `bad` (raised at the end without one)."""
        with collect(path, bad) as bad:
            return list(self._examples(read_records(path, fmt, bad), labelled, bad))

    def stream(self, path: str, fmt: str, bad: BadRows, labelled: bool = True) -> Reread:
        """The file's examples read lazily, each pass reading the file again."""
        return Reread(
            lambda into: self._examples(iter_records(path, fmt, into), labelled, into), bad
        )

    def _examples(
        self, records: Iterable[Record], labelled: bool, bad: BadRows
    ) -> Iterator[Example]:
        """An example of each record that passes; the others are bad rows in `bad`."""
        columns = None
        for r in records:
            if columns is None:
                columns = self._columns(r)
            text_col, pair_col = columns
            example = None
            with bad.row():
                example = Example(
                    text=get_text(r, text_col),
                    text_pair=get_text(r, pair_col) if pair_col else None,
                    label=self._label(r) if labelled else None,
                    file=r.file,
                    line=r.line,
                )
            if example is not None:
                yield example

    def fit(self, train: Iterable[Example]) -> None:
        self.labels = self.problem.label_set(train, self.cfg.label_column)

    def recognises(self, path: str, fmt: str) -> bool:
        """Nothing in a table's form says it holds labelled text: whether this task takes a
        file is its reader's to say (`lmadapt auto`)."""
        return False

    def profile(self, examples: list[Example]) -> DataProfile:
        """Examples per label (each label of a multi-label row counts), stratified by the label
        (multi-label: the row's label set; regression: its quartile)."""
        strata, counts = self.problem.strata_counts(examples)
        words = [len(ex.text.split()) + len((ex.text_pair or "").split()) for ex in examples]
        return DataProfile(
            examples=len(examples),
            label_counts=counts,
            strata=strata,
            source_lines=[[ex.line] for ex in examples],
            mean_words=float(np.mean(words)) if words else 0.0,
            max_words=max(words, default=0),
        )

    def check(self, examples: list[Example], bad: BadRows | None = None) -> list[Example]:
        """The examples whose labels occur in the training data; the others are bad rows."""
        return self.problem.check(examples, self.labels, self.cfg.label_column, bad)

    def state(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "problem": self.cfg.problem,
            "text_column": self.cfg.text_column,
            "text_pair_column": self.cfg.text_pair_column,
            **self.problem.state(),
        }

    def examples_from_texts(self, texts: list[str]) -> list[Example]:
        return [Example(text=t, file="<input>", line=i + 1) for i, t in enumerate(texts)]

    def _tokenize(self, examples: list[Example], tokenizer: Any, **extra: Any) -> Any:
        texts = [ex.text for ex in examples]
        pairs = [ex.text_pair for ex in examples] if examples and examples[0].text_pair else None
        return tokenizer(
            texts, pairs, truncation=True, max_length=self.cfg.max_length, padding=False, **extra
        )

    def encode(self, examples: list[Example], tokenizer: Any) -> list[dict[str, Any]]:
        if not examples:
            return []
        return self._features(examples, self._tokenize(examples, tokenizer))

    def _features(self, examples: list[Example], enc: Any) -> list[dict[str, Any]]:
        feats = []
        for i, ex in enumerate(examples):
            f = {"input_ids": enc["input_ids"][i]}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][i]
            if ex.label is not None:
                f["labels"] = self.problem.target(ex.label, self.labels)
            feats.append(f)
        return feats

    def collator(self, tokenizer: Any) -> Collator:
        return Collator(tokenizer.pad_token_id)

    def explainables(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        examples: list[Example],
        label: str | None,
        batch_size: int,
    ) -> list[Explainable]:
        """The predicted label (multi-label: each predicted one), or `label`: its log-probability
        (a regression run: its score), over the words of the text (and of its pair)."""
        if label is not None and label not in self.labels:
            raise LmadaptError(
                f"unknown label {label!r}; the run's labels are {', '.join(self.labels)}"
            )
        if not examples:
            return []
        enc = self._tokenize(examples, tokenizer, return_offsets_mapping=True)
        feats = self._features(examples, enc)
        logits, _ = self.batch_outputs(
            model, Encoded(feats, examples, self.collator(tokenizer), batch_size)
        )
        out = []
        for i, (ex, feat, z) in enumerate(zip(examples, feats, logits)):
            spans: dict[tuple[int, int], list[int]] = {}  # (sequence, word) -> [start, end]
            word_ids: list[int | None] = []
            for seq, w, (start, end) in zip(
                enc.sequence_ids(i), enc.word_ids(i), enc["offset_mapping"][i]
            ):
                if w is None or seq is None:  # a special token
                    word_ids.append(None)
                    continue
                spans.setdefault((seq, w), [start, end])[1] = end
                word_ids.append(len(spans) - 1)  # a word's pieces are consecutive
            words = [
                {"word": _sequence_text(ex, seq)[a:b], "start": a, "end": b}
                | ({"in": "text_pair"} if seq else {})
                for (seq, _), (a, b) in spans.items()
            ]
            out.append(
                Explainable(
                    text=ex.text,
                    input_ids=feat["input_ids"],
                    words=words,
                    word_ids=word_ids,
                    targets=self._targets(z, label),
                    extra_inputs={k: v for k, v in feat.items() if k == "token_type_ids"},
                    fields={"text_pair": ex.text_pair} if ex.text_pair else {},
                )
            )
        return out

    def _targets(self, logits: np.ndarray, label: str | None) -> list[Target]:
        return self.problem.explain_targets(logits, self.labels, label)

    # ------------------------------------------------------------------ model
    def build_model(self, spec: Any, trust_remote_code: bool = False) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        from lmadapt.models import load_model

        model = load_model(
            spec,
            AutoModelForSequenceClassification,
            trust_remote_code,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={n: i for i, n in enumerate(self.labels)},
            problem_type=self.problem.hf_problem_type,
        )
        if model.config.pad_token_id is None:  # causal LMs pool on the last non-pad token
            model.config.pad_token_id = model.config.eos_token_id
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """The classifier (and BERT's pooler, which sits between encoder and classifier)."""
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        return [h for h in ("pooler", "classifier", "score") if h in names]

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.problem.loss(logits.float(), batch["labels"])

    # ------------------------------------------------------------------ outputs
    def evaluate(self, logits: list[np.ndarray], examples: list[Example]) -> Evaluation:
        return self.problem.evaluate(np.stack(logits), examples, self.labels)  # (N, C)

    def fit_calibration(self, evaluations: dict[str, Evaluation]) -> dict[str, float]:
        """Single-label: temperature scaling fitted on the dev logits (kept in `state`), with
        each evaluation's calibrated ECE added; nothing for other problems or without dev."""
        return self.problem.fit_calibration(evaluations)

    def decode(self, logits: list[np.ndarray], examples: list[Example]) -> list[dict[str, Any]]:
        return self.problem.decode(np.stack(logits), examples, self.labels)  # (N, C)

    # ------------------------------------------------------------------ robustness
    def perturbed(self, examples: list[Example], p: Perturbation, seed: int) -> list[Example]:
        """Copies with the text and text_pair perturbed (each with a seed of its own); the
        labels stay as they are."""
        return [
            replace(
                ex,
                text=p.on_text(ex.text, seed, i, 0),
                text_pair=p.on_text(ex.text_pair, seed, i, 1) if ex.text_pair else ex.text_pair,
            )
            for i, ex in enumerate(examples)
        ]

    def robustness_view(self, example: Example, prediction: dict[str, Any]) -> View:
        """Label names (joined for multi-label); a regression score has no value that flips."""
        text = example.text + (f" || {example.text_pair}" if example.text_pair else "")
        return self.problem.view(text, example, prediction)

    def report(self, evaluation: Evaluation) -> str:
        parts = [classification_report_markdown(evaluation), *self.problem.report(evaluation)]
        return "\n\n".join(p for p in parts if p)

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]:
        return self.problem.plots(evaluation, self.labels, out_dir, prefix)


def _sequence_text(ex: Example, seq: int) -> str:
    """The text that tokens of sequence `seq` (0 or 1) were cut from: the pair's for 1, which
    `_tokenize` passes only for examples with a text_pair."""
    text = ex.text_pair if seq else ex.text
    assert text is not None, f"{ex.file} line {ex.line}: a second sequence without text_pair"
    return text
