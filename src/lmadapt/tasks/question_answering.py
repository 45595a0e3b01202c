"""Extractive question answering (SQuAD v1.1 / v2.0): a start/end head over the context tokens.

The question goes first and the context second; a context longer than `max_length` is cut into
windows overlapping by `doc_stride` tokens, and each window is one model input. Training points
start and end at the answer's tokens in the windows that hold it, at the CLS token in the others
(and for unanswerable questions). Decoding searches the n best starts and ends of every window of
a question (start <= end, at most `max_answer_length` tokens, inside the context) for the span
with the highest start + end logit; under v2 the question is left unanswered when the CLS
("null") score beats that span by more than a threshold tuned on dev after training (`tune`).
Answers are scored with SQuAD's official normalisation, exact match and token F1, the best over
the gold answers. Reading the files lives in `lmadapt.data.squad`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax

from lmadapt.data.batching import Collator
from lmadapt.data.squad import Answer, QAExample, read_qa
from lmadapt.data.validation import BadRows, collect, text_problem
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluate import plots
from lmadapt.evaluate.perturbations import Perturbation
from lmadapt.evaluate.report import cell, markdown_table
from lmadapt.evaluate.robustness import View
from lmadapt.evaluate.text import squad_exact, squad_f1
from lmadapt.inference import Encoded
from lmadapt.tasks.base import Evaluation, LogitsTask, keep_valid
from lmadapt.tasks.configs import QAConfig

QUESTION_TYPES = ("what", "who", "when", "where", "why", "how", "which")
"""Report slices: a question's type is its first wh-word ('In what year...' is a what)."""
WORST = 10
"""Confident wrong answers the report lists."""


@dataclass
class QAWindow:
    """One model input cut from a question's context."""

    offsets: np.ndarray
    """(T, 2): each token's character [start, end) in the context; -1 outside the context."""
    cls: int
    """Position of the token whose start/end scores mean 'no answer here'."""

    @property
    def context(self) -> np.ndarray:
        """Positions of the context's tokens, in order."""
        return np.flatnonzero(self.offsets[:, 0] >= 0)

    def target(self, answer: Answer | None) -> list[int]:
        """[start, end] token positions of `answer`, or CLS twice where this window lacks it."""
        ctx = self.context
        if answer is None or not len(ctx):
            return [self.cls, self.cls]
        starts, ends = self.offsets[ctx, 0], self.offsets[ctx, 1]
        if starts[0] > answer.start or ends[-1] < answer.end:
            return [self.cls, self.cls]
        start = ctx[np.argmax(ends > answer.start)]  # first token ending after the answer starts
        end = ctx[len(ctx) - 1 - np.argmax(starts[::-1] < answer.end)]  # last one starting in it
        return [int(start), int(end)] if start <= end else [self.cls, self.cls]


@dataclass
class Decision:
    """A question's decoded answer: the best span over its windows, and the null score."""

    answer: str
    start: int | None
    end: int | None
    score: float
    """Probability of what was answered (start x end softmax in its window; for no answer,
    the CLS token's)."""
    span_logit: float
    """Best span's start + end logit (-inf when no window has a valid span)."""
    null_logit: float
    """Smallest CLS start + end logit over the windows."""


def question_type(question: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in question.lower()).split()
    return next((w for w in words if w in QUESTION_TYPES), "other")


class QuestionAnsweringTask(LogitsTask):
    """Extractive QA: start/end logits per token; answers are context spans (SQuAD EM/F1)."""

    kind = "question_answering"
    peft_task_type = "QUESTION_ANS"
    model_kinds = ("encoder",)
    endpoint = "qa"
    windowed = True
    per_token = True
    shares_backbone = False
    default_metric = "f1"

    def __init__(self, cfg: QAConfig, state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.labels: list[str] = []  # answers are spans of the context, not labels
        self.version: str | None = None if cfg.version == "auto" else cfg.version
        self.threshold = cfg.null_score_diff_threshold
        if state:
            self.version = state["version"]
            self.threshold = state["null_score_diff_threshold"]

    @property
    def v2(self) -> bool:
        return self.version == "v2"

    @property
    def description(self) -> str:
        return f"question_answering (SQuAD {self.version or 'auto'})"

    @property
    def metric_names(self) -> tuple[str, ...]:
        extra = ("has_ans_exact_match", "has_ans_f1", "no_ans_exact_match", "no_ans_f1")
        return ("exact_match", "f1", *(extra if self.version != "v1" else ()), "loss")

    # ------------------------------------------------------------------ data
    def read(
        self, path: str, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
    ) -> list[QAExample]:
        """SQuAD JSON or flat JSONL (see lmadapt.data.squad); bad questions go to `bad`."""
        with collect(path, bad) as bad:
            examples = read_qa(path, fmt, labelled, bad)
            return self.check(examples, bad) if labelled and self.version else examples

    def fit(self, train: list[QAExample]) -> None:
        """With version auto: v2 when some training question is unanswerable."""
        answered = [ex for ex in train if ex.answers]
        if not answered:
            raise DataError(train[0].file, "no answered question in the training data")
        if self.version is None:
            self.version = "v2" if len(answered) < len(train) else "v1"

    def check(self, examples: list[QAExample], bad: BadRows | None = None) -> list[QAExample]:
        """Under v1, unanswerable questions are bad rows."""
        if self.v2:
            return examples
        return keep_valid(examples, self._answerable, bad)

    def _answerable(self, ex: QAExample) -> QAExample:
        if ex.answers == []:
            raise ex.error(
                "no answers, but the task is SQuAD v1 (set task.version: v2, or auto with "
                "unanswerable questions in the training data)",
                "answers",
            )
        return ex

    def state(self) -> dict[str, Any]:
        return {"version": self.version, "null_score_diff_threshold": self.threshold}

    def probe_examples(self, sentences: list[str]) -> list[QAExample]:
        """Each sentence as the context of one question about it."""
        pairs = [{"question": "What is this about?", "context": s} for s in sentences]
        return self.examples_from_texts(pairs)

    def examples_from_texts(self, texts: Sequence[str | dict[str, Any]]) -> list[QAExample]:
        """Question/context pairs, as objects or JSON text `{"question": ..., "context": ...}`."""
        out = []
        for i, text in enumerate(texts, start=1):
            item: object = text
            if isinstance(text, str):
                try:
                    item = json.loads(text)
                except json.JSONDecodeError:
                    item = None
            if not isinstance(item, dict):
                raise DataError(
                    "<input>",
                    'expected a JSON object {"question": ..., "context": ...}, got '
                    f"{cell(text, 60)!r}",
                    i,
                )
            # no id unless given: served requests are batched together, positions mean nothing
            ex = QAExample("", "", file="<input>", line=i)
            raw_id = item.get("id")
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, type(None))):
                raise ex.error(f"expected a string or an integer, got {cell(raw_id, 60)}", "id")
            ex.id = "" if raw_id is None else str(raw_id)  # echoed as given, never a repr
            for name in ("question", "context"):
                problem = text_problem(item.get(name))
                if problem is not None:
                    raise ex.error(problem, name)
            ex.question, ex.context = item["question"].strip(), item["context"]
            out.append(ex)
        return out

    # ------------------------------------------------------------------ features
    def _questions(self, examples: list[QAExample], tokenizer: Any) -> list[str]:
        """Questions cut to max_question_length tokens (the tokenizer would refuse to truncate
        only the context when the question alone fills the window)."""
        n = self.cfg.max_question_length
        enc = tokenizer(
            [ex.question for ex in examples], add_special_tokens=False, return_offsets_mapping=True
        )
        return [
            ex.question if len(offs) <= n else ex.question[: offs[n - 1][1]]
            for ex, offs in zip(examples, enc["offset_mapping"])
        ]

    def encode(self, examples: list[QAExample], tokenizer: Any) -> list[dict[str, Any]]:
        """One feature per window, in example order; each example keeps its windows."""
        if not examples:
            return []
        if not tokenizer.is_fast:
            raise LmadaptError(
                "question answering needs a fast tokenizer (character offsets of tokens); "
                f"{type(tokenizer).__name__} is not one"
            )
        cfg = self.cfg
        enc = tokenizer(
            self._questions(examples, tokenizer),
            [ex.context for ex in examples],
            truncation="only_second",
            max_length=cfg.max_length,
            stride=cfg.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        for ex in examples:
            ex.windows = []
        feats = []
        for k, i in enumerate(enc["overflow_to_sample_mapping"]):
            ex, ids = examples[i], enc["input_ids"][k]
            offsets = np.array(enc["offset_mapping"][k], dtype=np.int32).reshape(-1, 2)
            offsets[[s != 1 for s in enc.sequence_ids(k)]] = -1
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            window = QAWindow(offsets, cls)
            ex.windows.append(window)
            # No token_type_ids, for any method: peft 0.21's PeftModelForQuestionAnswering drops
            # them for LoRA, IA3 and AdaLoRA, so a PEFT run would train without segments while
            # its merged export (plain transformers) used them. The model reads every window
            # as segment 0, in training, evaluation, serving and export alike.
            feat: dict[str, Any] = {"input_ids": ids}
            if ex.answers is not None:  # the first gold answer trains (SQuAD train has one)
                feat["labels"] = window.target(ex.answers[0] if ex.answers else None)
            feats.append(feat)
        return feats

    def collator(self, tokenizer: Any) -> Collator:
        return Collator(tokenizer.pad_token_id)

    # ------------------------------------------------------------------ model
    def build_model(self, spec: Any, trust_remote_code: bool = False) -> torch.nn.Module:
        from transformers import AutoModelForQuestionAnswering

        from lmadapt.models import load_model

        return load_model(spec, AutoModelForQuestionAnswering, trust_remote_code)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """The start/end linear layer (`qa_outputs` in transformers' QA models)."""
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        return [h for h in ("qa_outputs",) if h in names]

    def logits(self, output: Any) -> torch.Tensor:
        """Start and end logits stacked, (B, T, 2): QA models answer with the two apart."""
        return torch.stack((output.start_logits, output.end_logits), dim=-1)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the start and end cross-entropies over each window's tokens."""
        labels = batch["labels"]  # (B, 2)
        # Prompt/p-tuning prepend virtual tokens, which are never an answer.
        logits = logits[:, logits.shape[1] - batch["input_ids"].shape[1] :].float()  # (B, T, 2)
        pad = ~batch["attention_mask"].bool()[..., None]
        logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        start = F.cross_entropy(logits[..., 0], labels[:, 0])
        return (start + F.cross_entropy(logits[..., 1], labels[:, 1])) / 2

    # ------------------------------------------------------------------ decoding
    def _windows(self, logits: list[np.ndarray], examples: list[QAExample]) -> list[list]:
        if sum(len(ex.windows) for ex in examples) != len(logits):
            raise ValueError(
                f"{len(logits)} logit arrays for {sum(len(ex.windows) for ex in examples)} "
                "windows: the examples were not encoded by this task"
            )
        out, k = [], 0
        for ex in examples:
            out.append(logits[k : k + len(ex.windows)])
            k += len(ex.windows)
        return out

    def decide(self, rows: list[np.ndarray], ex: QAExample) -> Decision:
        """The best span over the windows of `ex` (each row (T, 2): start, end logits), or no
        answer under v2 when the null score beats it by more than the threshold."""
        cfg = self.cfg
        best: tuple[float, int, int, float] | None = None  # span logit, char start, end, prob
        null, null_prob = np.inf, 0.0
        for window, row in zip(ex.windows, rows):
            start, end = row[:, 0], row[:, 1]  # (T,)
            ctx = window.context
            if not len(ctx):
                continue
            keep = np.append(ctx, window.cls)  # positions the probabilities are over
            p_start, p_end = softmax(start[keep]), softmax(end[keep])
            if start[window.cls] + end[window.cls] < null:
                null = float(start[window.cls] + end[window.cls])
                null_prob = float(p_start[-1] * p_end[-1])
            k = min(cfg.n_best, len(ctx))
            top_s = np.argsort(-start[ctx], kind="stable")[:k]  # indices into ctx
            top_e = np.argsort(-end[ctx], kind="stable")[:k]
            s_idx, e_idx = np.meshgrid(top_s, top_e, indexing="ij")  # (k, k)
            s_pos, e_pos = ctx[s_idx], ctx[e_idx]
            valid = (e_pos >= s_pos) & (e_pos - s_pos < cfg.max_answer_length)
            if not valid.any():
                continue
            scores = np.where(valid, start[s_pos] + end[e_pos], -np.inf)
            a, b = np.unravel_index(int(scores.argmax()), scores.shape)
            if best is None or scores[a, b] > best[0]:
                s, e = int(s_idx[a, b]), int(e_idx[a, b])
                chars = int(window.offsets[ctx[s], 0]), int(window.offsets[ctx[e], 1])
                best = (float(scores[a, b]), *chars, float(p_start[s] * p_end[e]))
        if best is None or (self.v2 and null - best[0] > self.threshold):
            span_logit = best[0] if best else -np.inf
            return Decision("", None, None, null_prob, span_logit, null)
        logit, s, e, prob = best
        return Decision(ex.context[s:e], s, e, prob, logit, null)

    def decisions(self, logits: list[np.ndarray], examples: list[QAExample]) -> list[Decision]:
        return [
            self.decide(rows, ex) for rows, ex in zip(self._windows(logits, examples), examples)
        ]

    def evaluate(self, logits: list[np.ndarray], examples: list[QAExample]) -> Evaluation:
        rows: list[dict[str, Any]] = []
        for ex, d in zip(examples, self.decisions(logits, examples)):
            golds = [a.text for a in ex.answers or []] or [""]  # official v2: no answer is ""
            rows.append(
                {
                    "question": ex.question,
                    "type": question_type(ex.question),
                    "gold": golds[0],
                    "predicted": d.answer,
                    "score": d.score,
                    "has_answer": bool(ex.answers),
                    "exact_match": max(squad_exact(d.answer, g) for g in golds),
                    "f1": max(squad_f1(d.answer, g) for g in golds),
                }
            )
        metrics = _means(rows)
        if self.v2:
            for prefix, has in (("has_ans", True), ("no_ans", False)):
                group = [r for r in rows if r["has_answer"] == has]
                if group:
                    metrics.update({f"{prefix}_{k}": v for k, v in _means(group).items()})
        by_type = defaultdict(list)
        for r in rows:
            by_type[r["type"]].append(r)
        slices = {
            t: {"count": len(by_type[t]), **_means(by_type[t])}
            for t in (*QUESTION_TYPES, "other")
            if by_type[t]
        }
        wrong = sorted((r for r in rows if r["f1"] == 0), key=lambda r: -r["score"])
        details: dict[str, Any] = {"by_question_type": slices, "worst": wrong[:WORST]}
        if self.v2:
            details["null_score_diff_threshold"] = self.threshold
        return Evaluation(metrics, details)

    def decode(self, logits: list[np.ndarray], examples: list[QAExample]) -> list[dict[str, Any]]:
        """Per question: its id (where the input has one), the answer text, its character span in
        the context, and its score (start/end probability; under v2 an empty answer with null
        start/end is 'no answer')."""
        return [
            {
                **({"id": ex.id} if ex.id else {}),
                "question": ex.question,
                "answer": d.answer,
                "start": d.start,
                "end": d.end,
                "score": round(d.score, 6),
            }
            for ex, d in zip(examples, self.decisions(logits, examples))
        ]

    def tune(self, model: torch.nn.Module, data: Encoded) -> None:
        """v2: the null-score threshold that maximises F1 on these (dev) questions, as in the
        official SQuAD 2.0 evaluation's best_f1_thresh."""
        examples: list[QAExample] = data.examples
        if not self.v2 or not examples:
            return
        logits, _ = self.batch_outputs(model, data)
        saved, self.threshold = self.threshold, np.inf  # decide() then always answers a span
        try:
            decided = self.decisions(logits, examples)
        finally:
            self.threshold = saved
        diff = np.array([d.null_logit - d.span_logit for d in decided])
        f1_span = np.array(
            [
                max(squad_f1(d.answer, a.text) for a in ex.answers) if ex.answers else 0.0
                for d, ex in zip(decided, examples)
            ]
        )
        f1_null = np.array([0.0 if ex.answers else 1.0 for ex in examples])
        self.threshold = best_threshold(diff, f1_span, f1_null, saved)

    # ------------------------------------------------------------------ robustness
    def perturbed(self, examples: list[QAExample], p: Perturbation, seed: int) -> list[QAExample]:
        """Copies with the question perturbed; the context stays as it is, since the gold
        answers are character spans of it."""
        return [
            replace(ex, question=p.on_text(ex.question, seed, i, 0), windows=[])
            for i, ex in enumerate(examples)
        ]

    def robustness_view(self, example: QAExample, prediction: dict[str, Any]) -> View:
        gold = example.answers[0].text if example.answers else ""
        return View(example.question, gold, prediction["answer"], prediction["answer"])

    def report(self, evaluation: Evaluation) -> str:
        d = evaluation.details
        parts = []
        if "null_score_diff_threshold" in d:
            parts.append(
                "No answer when the null score exceeds the best span's by more than "
                f"{d['null_score_diff_threshold']:.4f} (tuned on dev)."
            )
        rows = [
            [t, v["count"], f"{v['exact_match']:.4f}", f"{v['f1']:.4f}"]
            for t, v in d["by_question_type"].items()
        ]
        parts.append(
            "### By question type (first wh-word)\n\n"
            + markdown_table(["type", "count", "exact_match", "f1"], rows)
        )
        worst = [
            [
                cell(r["question"], 120),
                cell(r["gold"], 60),
                cell(r["predicted"], 60),
                f"{r['score']:.4f}",
            ]
            for r in d["worst"]
        ]
        if worst:
            parts.append(
                "### Most confident wrong answers (F1 = 0)\n\n"
                + markdown_table(["question", "gold", "predicted", "score"], worst)
            )
        return "\n\n".join(parts)

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]:
        slices = evaluation.details["by_question_type"]
        path = out_dir / f"{prefix}f1_by_question_type.png"
        plots.bars(
            list(slices),
            [v["f1"] for v in slices.values()],
            path,
            title=f"{prefix}F1 by question type",
            ylabel="F1",
        )
        return [path]


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("exact_match", "f1")}


def best_threshold(
    diff: np.ndarray, f1_span: np.ndarray, f1_null: np.ndarray, default: float
) -> float:
    """The threshold t (answer when null - span logit <= t) with the highest total F1.

    `diff` is each question's null minus best-span logit, `f1_span` its F1 when it answers with
    the span and `f1_null` when it answers nothing. Sorted by diff, answering the first k questions
    scores f1_null.sum() plus the cumulative gain; the threshold goes midway to the next value.
    """
    finite = np.isfinite(diff)  # no valid span anywhere: never answers, whatever t is
    if not finite.any():
        return default
    order = np.argsort(diff[finite], kind="stable")
    d = diff[finite][order]
    gain = (f1_span[finite] - f1_null[finite])[order]
    totals = np.cumsum(gain)  # totals[k]: gain of answering the k + 1 smallest diffs
    last_of_tie = np.append(d[1:] != d[:-1], True)  # a threshold takes every equal diff
    candidates = np.where(last_of_tie)[0]
    k = candidates[int(np.argmax(totals[candidates]))]
    if totals[k] <= 0:  # answering nothing is at least as good
        return float(d[0] - 1.0)
    return float((d[k] + d[k + 1]) / 2 if k + 1 < len(d) else d[k] + 1.0)
