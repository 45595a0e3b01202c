"""Token classification (named entities and other spans): one IOB2 tag per word.

Examples are words, not subwords: labels sit on each word's first subword (the rest are ignored
by the loss unless `label_all_subwords`), sentences longer than `max_length` are split into
overlapping windows, and window predictions are merged back so that every word gets exactly one
prediction, from the window where it is furthest from an edge. Metrics are entity-level (seqeval).
Reading tagged sentences lives in `lmadapt.data.tagged`, the metrics in `lmadapt.evaluate.sequence`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax

from lmadapt.data.batching import Collator
from lmadapt.data.conll import is_conll
from lmadapt.data.tagged import Example, TaggedLayout, Window, read_tagged, split_words
from lmadapt.data.validation import BadRows
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluate import calibration, plots
from lmadapt.evaluate.errors import examples_markdown, length_slices, ranked, slices_markdown
from lmadapt.evaluate.explain import Explainable, Target
from lmadapt.evaluate.perturbations import Perturbation
from lmadapt.evaluate.report import markdown_table
from lmadapt.evaluate.robustness import View
from lmadapt.evaluate.sequence import entities, sequence_metrics
from lmadapt.inference import Encoded
from lmadapt.tasks.base import DataProfile, Evaluation, LogitsTask, keep_valid
from lmadapt.tasks.configs import TokenClassificationConfig

IGNORE = -100
"""Label of positions the loss skips (special tokens, non-first subwords, padding)."""


def word_windows(counts: list[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Cut words with `counts` subwords each into [start, end) windows of <= `budget` subwords.

    Windows end on word boundaries and the next one starts up to `stride` subwords back, so every
    word appears whole in some window (a single word longer than the budget gets its own window,
    truncated by the tokenizer: its first subword, which carries the label, survives).
    """
    n, out, start = len(counts), [], 0
    while True:
        end, used = start, 0
        while end < n and (end == start or used + counts[end] <= budget):
            used += counts[end]
            end += 1
        out.append((start, end))
        if end >= n:
            return out
        # Step back while the overlap fits the stride and the next window still reaches `end`.
        nxt, overlap, room = end, 0, min(stride, budget - counts[end])
        while nxt - 1 > start and overlap + counts[nxt - 1] <= room:
            nxt -= 1
            overlap += counts[nxt]
        start = nxt


class TokenClassificationTask(LogitsTask):
    """Per-word tagging (NER) with a linear head on every token; entity-level F1."""

    kind = "token_classification"
    peft_task_type = "TOKEN_CLS"
    model_kinds = ("encoder",)
    endpoint = "ner"
    windowed = True
    description = "token_classification"
    per_token = True
    groups_by_length = False
    """Batches of similar-length sentences (CoNLL's short ones are headlines, datelines and
    score lines) learned slower: 0.562 dev F1 after one epoch against 0.610 with random batches
    (3,400 CoNLL sentences at HF Trainer's settings, bench/ner_side_by_side.py)."""
    head_lr_floor = 1e-3
    """A new per-token head at the backbone's 5e-5 barely moves in an epoch; at 1e-3 (LoRA's
    rate in the shipped recipes) dev F1 after epochs 1/2/3 went from 0.580/0.748/- to
    0.731/0.812/0.825, HF Trainer 0.627/0.780/0.799 (bench/ner_side_by_side.py)."""
    default_metric = "f1"
    metric_names = ("f1", "precision", "recall", "macro_f1", "accuracy", "ece", "loss")

    def __init__(self, cfg: TokenClassificationConfig, state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.labels: list[str] = list(state["labels"]) if state else []
        self.temperature: float | None = state.get("temperature") if state else None
        """The temperature fitted on the dev words after training (None before)."""

    @property
    def types(self) -> list[str]:
        return sorted({t[2:] for t in self.labels if t != "O"})

    # ------------------------------------------------------------------ data
    def read(
        self, path: str, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
    ) -> list[Example]:
        """CoNLL columns (.conll/.txt), or JSONL with tokens + tags or text + spans.

        Bad sentences go to `bad` (raised together at the end without one).
        """
        cfg = self.cfg
        layout = TaggedLayout(
            token_column=cfg.token_column,
            tag_column=cfg.tag_column,
            tokens_field=cfg.tokens_field,
            tags_field=cfg.tags_field,
            text_field=cfg.text_field,
            spans_field=cfg.spans_field,
        )
        return read_tagged(path, fmt, labelled, bad, scheme=cfg.scheme, layout=layout)

    def fit(self, train: list[Example]) -> None:
        """Tag set = O plus B-/I- of every entity type in the training data."""
        kinds = {t[2:] for ex in train for t in ex.tags or [] if t != "O"}
        if not kinds:
            raise DataError(train[0].file, "no entities in the training data (every tag is O)")
        self.labels = ["O"] + [f"{p}-{k}" for k in sorted(kinds) for p in "BI"]

    def recognises(self, path: str, fmt: str) -> bool:
        """A CoNLL file is tagged sentences: no table (`lmadapt auto`)."""
        return is_conll(path, fmt)

    def profile(self, examples: list[Example]) -> DataProfile:
        """Entity mentions per type; a sentence's stratum is its most frequent entity type (O
        without entities), so a carved dev set keeps each type's share of sentences."""
        counts: Counter[str] = Counter()
        strata = []
        for ex in examples:
            mentions = Counter(t[2:] for t in ex.tags or [] if t.startswith("B-"))
            counts.update(mentions)
            strata.append(mentions.most_common(1)[0][0] if mentions else "O")
        words = [len(ex.words) for ex in examples]
        return DataProfile(
            examples=len(examples),
            label_counts=dict(sorted(counts.items())),
            strata=strata,
            source_lines=[list(ex.lines) if ex.lines else [ex.line] for ex in examples],
            mean_words=float(np.mean(words)) if words else 0.0,
            max_words=max(words, default=0),
        )

    def check(self, examples: list[Example], bad: BadRows | None = None) -> list[Example]:
        """The sentences whose entity types occur in the training data; the others are bad."""
        known = set(self.types)
        return keep_valid(examples, lambda ex: self._known(ex, known), bad)

    def _known(self, ex: Example, known: set[str]) -> Example:
        for i, tag in enumerate(ex.tags or []):
            if tag != "O" and tag[2:] not in known:
                raise DataError(
                    ex.file,
                    f"entity type {tag[2:]!r} does not occur in the training data "
                    f"(known: {', '.join(self.types)})",
                    ex.word_line(i),
                )
        return ex

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels, "temperature": self.temperature}

    def examples_from_texts(self, texts: list[str]) -> list[Example]:
        out = []
        for i, text in enumerate(texts, start=1):
            offsets = split_words(text)
            if not offsets:
                raise DataError("<input>", f"text {i} has no words: {text!r}", i)
            out.append(Example([text[s:e] for s, e in offsets], text, offsets, None, "<input>", i))
        return out

    # ------------------------------------------------------------------ features
    def encode(self, examples: list[Example], tokenizer: Any) -> list[dict[str, Any]]:
        """One feature per window; also records each example's windows for merging."""
        if not examples:
            return []
        cfg = self.cfg
        enc = tokenizer([ex.words for ex in examples], is_split_into_words=True)
        budget = cfg.max_length - tokenizer.num_special_tokens_to_add(pair=False)
        per_example: list[list[dict[str, Any]]] = [[] for _ in examples]
        long_windows = []  # (example index, start, end, own_start, own_end)
        for i, ex in enumerate(examples):
            ex.windows = []
            if len(enc["input_ids"][i]) <= cfg.max_length:
                per_example[i].append(self._feature(ex, enc, i, 0, 0, len(ex.words)))
                continue
            counts = [0] * len(ex.words)
            for w in enc.word_ids(i):
                if w is not None:
                    counts[w] += 1
            spans = word_windows(counts, budget, cfg.stride)
            # Overlapping words belong to the window where they are furthest from an edge.
            bounds = [0] + [(a + e + 1) // 2 for (_, e), (a, _) in zip(spans, spans[1:])]
            bounds.append(len(ex.words))
            long_windows += [(i, a, e, bounds[k], bounds[k + 1]) for k, (a, e) in enumerate(spans)]
        if long_windows:
            wenc = tokenizer(
                [examples[i].words[a:e] for i, a, e, _, _ in long_windows],
                is_split_into_words=True,
                truncation=True,
                max_length=cfg.max_length,
            )
            for j, (i, a, _, own_start, own_end) in enumerate(long_windows):
                per_example[i].append(self._feature(examples[i], wenc, j, a, own_start, own_end))
        return [f for feats in per_example for f in feats]

    def _feature(
        self, ex: Example, enc: Any, row: int, offset: int, own_start: int, own_end: int
    ) -> dict[str, Any]:
        """Feature for row `row` of `enc`, whose word 0 is word `offset` of the example."""
        index = {t: k for k, t in enumerate(self.labels)}
        word_ids = enc.word_ids(row)
        labels, owned = [], []
        for pos, w in enumerate(word_ids):
            first = w is not None and (pos == 0 or word_ids[pos - 1] != w)
            if first and own_start <= w + offset < own_end:
                owned.append((pos, w + offset))
            label = IGNORE
            if ex.tags is not None and w is not None:
                tag = ex.tags[w + offset]
                if first:
                    label = index[tag]
                elif self.cfg.label_all_subwords:
                    label = index["I" + tag[1:] if tag.startswith("B-") else tag]
            labels.append(label)
        ex.windows.append(Window(owned))
        feat: dict[str, Any] = {"input_ids": enc["input_ids"][row]}
        if "token_type_ids" in enc:
            feat["token_type_ids"] = enc["token_type_ids"][row]
        if ex.tags is not None:
            feat["labels"] = labels
        return feat

    def collator(self, tokenizer: Any) -> Collator:
        return Collator(tokenizer.pad_token_id, {"labels": IGNORE})

    # ------------------------------------------------------------------ model
    def build_model(self, spec: Any, trust_remote_code: bool = False) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        from lmadapt.models import load_model

        return load_model(
            spec,
            AutoModelForTokenClassification,
            trust_remote_code,
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={n: i for i, n in enumerate(self.labels)},
        )

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """The per-token linear classifier (`classifier` in BERT-likes, `score` in some LMs)."""
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        return [h for h in ("classifier", "score") if h in names]

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        # Prompt/p-tuning prepend virtual tokens, which have no labels.
        logits = logits[:, logits.shape[1] - labels.shape[1] :]
        labels = labels.reshape(-1)
        flat = logits.float().reshape(-1, logits.shape[-1])
        if not bool((labels != IGNORE).any()):  # cross_entropy would return NaN
            return flat.sum() * 0.0
        return F.cross_entropy(flat, labels, ignore_index=IGNORE)

    # ------------------------------------------------------------------ outputs
    def word_logits(self, logits: list[np.ndarray], examples: list[Example]) -> list[np.ndarray]:
        """(n_words, C) per example from the (T, C) window logits, in example order.

        Words without any subword (e.g. a lone zero-width character) get a certain O.
        """
        if sum(len(ex.windows) for ex in examples) != len(logits):
            raise ValueError(
                f"{len(logits)} logit arrays for {sum(len(ex.windows) for ex in examples)} "
                "windows: the examples were not encoded by this task"
            )
        out, k = [], 0
        for ex in examples:
            rows = np.full((len(ex.words), len(self.labels)), -np.inf, dtype=np.float32)
            rows[:, 0] = 0.0  # label 0 is O
            for window in ex.windows:
                for pos, w in window.owned:
                    rows[w] = logits[k][pos]
                k += 1
            out.append(rows)
        return out

    def predicted_tags(self, logits: list[np.ndarray], examples: list[Example]) -> list[list[str]]:
        return self._tags(self.word_logits(logits, examples))

    def _tags(self, word_logits: list[np.ndarray]) -> list[list[str]]:
        return [[self.labels[i] for i in w.argmax(-1)] for w in word_logits]

    def evaluate(self, logits: list[np.ndarray], examples: list[Example]) -> Evaluation:
        words = self.word_logits(logits, examples)
        pred = self._tags(words)
        gold = [ex.tags or [] for ex in examples]
        ev = sequence_metrics(gold, pred, self.labels, self.cfg.strict)
        ev.details |= self._error_analysis(gold, pred, examples)
        if words:  # calibration of the per-word tag distribution
            index = {t: i for i, t in enumerate(self.labels)}
            flat = np.concatenate(words)  # (total words, C)
            tags = np.array([index[t] for seq in gold for t in seq])
            scored = np.isfinite(flat).all(-1)  # words without a subword have no distribution
            calibration.add_calibration(ev, flat[scored], tags[scored], self.temperature)
        return ev

    def fit_calibration(self, evaluations: dict[str, Evaluation]) -> dict[str, float]:
        """Temperature scaling fitted on the dev words' logits (kept in `state`), with each
        evaluation's calibrated ECE added; nothing without a dev set."""
        self.temperature = calibration.fit_on_dev(evaluations)
        return {} if self.temperature is None else {"temperature": self.temperature}

    def _error_analysis(
        self, gold: list[list[str]], pred: list[list[str]], examples: list[Example]
    ) -> dict[str, Any]:
        """Details for report.md: the sentences with the most entity errors (gold entities
        missed plus predicted ones not in gold, matched exactly as seqeval does) and entity F1
        per sentence-length slice."""
        strict = self.cfg.strict
        found = [(set(entities(g, strict)), set(entities(p, strict))) for g, p in zip(gold, pred)]
        errors = [len(g ^ p) for g, p in found]

        def shown(ex: Example, spans: set[tuple[str, int, int]]) -> str:
            return "; ".join(
                f"{k}: {' '.join(ex.words[s:e])}" for k, s, e in sorted(spans, key=lambda x: x[1])
            )

        def row(i: int) -> dict[str, Any]:
            ex, (g, p) = examples[i], found[i]
            return {
                "sentence": " ".join(ex.words),
                "errors": errors[i],
                "gold": shown(ex, g) or "–",
                "predicted": shown(ex, p) or "–",
            }

        def f1(idx: np.ndarray) -> float:
            part = sequence_metrics(
                [gold[i] for i in idx], [pred[i] for i in idx], self.labels, strict
            )
            return part.metrics["f1"]

        return {
            "worst_sentences": [row(i) for i in ranked(errors, [e > 0 for e in errors])],
            "length_slices": length_slices([len(ex.words) for ex in examples], f1),
        }

    def decode(self, logits: list[np.ndarray], examples: list[Example]) -> list[dict[str, Any]]:
        """Entities with type, text, character offsets into `text`, and a confidence score.

        The score is the mean over the entity's words of the top softmax probability
        (temperature-scaled under `task.calibrate`).
        """
        t = calibration.require_fitted(self.temperature) if self.cfg.calibrate else 1.0
        out = []
        for ex, rows in zip(examples, self.word_logits(logits, examples)):
            tags, found = self._entities(ex, rows, t)
            out.append(
                {
                    "text": ex.text,
                    "entities": [entity for entity, _, _ in found],
                    "tokens": ex.words,
                    "tags": tags,
                }
            )
        return out

    def _entities(
        self, ex: Example, rows: np.ndarray, temperature: float = 1.0
    ) -> tuple[list[str], list[tuple[dict[str, Any], int, int]]]:
        """The predicted tag of each word, and each entity with its [start, end) words; the
        temperature rescales the entity scores, not the tags."""
        probs = softmax(rows / temperature, axis=-1)  # (n_words, C)
        tags = [self.labels[i] for i in probs.argmax(-1)]
        top = probs.max(-1)
        found = []
        for kind, s, e in entities(tags, self.cfg.strict):
            start, end = ex.offsets[s][0], ex.offsets[e - 1][1]
            entity = {
                "type": kind,
                "text": ex.text[start:end],
                "start": start,
                "end": end,
                "score": round(float(top[s:e].mean()), 6),
            }
            found.append((entity, s, e))
        return tags, found

    def explainables(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        examples: list[Example],
        label: str | None,
        batch_size: int,
    ) -> list[Explainable]:
        """One target per predicted entity (of type `label` when given): the sum of its words'
        logits for their predicted tags, at each word's first piece.

        Each sentence is one input, not cut into task.max_length windows (attributions need one
        forward pass over the whole sentence), up to the tokenizer's model_max_length; so a
        sentence longer than task.max_length may be tagged slightly otherwise than by predict.
        """
        if label is not None and label not in self.types:
            raise LmadaptError(
                f"unknown entity type {label!r}; the run's types are {', '.join(self.types)}"
            )
        if not examples:
            return []
        enc = tokenizer([ex.words for ex in examples], is_split_into_words=True)
        feats = []
        for i, ex in enumerate(examples):
            if len(enc["input_ids"][i]) > tokenizer.model_max_length:
                raise LmadaptError(
                    f"{ex.file} line {ex.line}: {len(enc['input_ids'][i])} tokens, more than "
                    f"the model takes in one input ({tokenizer.model_max_length})"
                )
            ex.windows = []
            feats.append(self._feature(ex, enc, i, 0, 0, len(ex.words)))  # one whole window
        logits, _ = self.batch_outputs(
            model, Encoded(feats, examples, self.collator(tokenizer), batch_size)
        )
        out, word_rows = [], self.word_logits(logits, examples)
        for i, (ex, feat, rows) in enumerate(zip(examples, feats, word_rows)):
            word_ids = enc.word_ids(i)
            first = {w: pos for pos, w in reversed(list(enumerate(word_ids))) if w is not None}
            tags, found = self._entities(ex, rows)
            targets = []
            for entity, s, e in found:
                if label is not None and entity["type"] != label:
                    continue
                cells = [(first[w], self.labels.index(tags[w])) for w in range(s, e) if w in first]
                pos = torch.tensor([p for p, _ in cells])
                tag = torch.tensor([t for _, t in cells])
                n = len(word_ids)

                def score(
                    z: torch.Tensor, pos: torch.Tensor = pos, tag: torch.Tensor = tag, n: int = n
                ) -> torch.Tensor:
                    # (B, T', C) -> (B,); prompt methods prepend T' - T virtual tokens
                    return z[:, z.shape[1] - n + pos, tag].sum(-1)

                about = {k: v for k, v in entity.items() if k != "score"}
                targets.append(Target({"entity": about}, entity["score"], score))
            words = [{"word": w, "start": a, "end": b} for w, (a, b) in zip(ex.words, ex.offsets)]
            out.append(
                Explainable(
                    text=ex.text,
                    input_ids=feat["input_ids"],
                    words=words,
                    word_ids=word_ids,
                    targets=targets,
                    extra_inputs={k: v for k, v in feat.items() if k == "token_type_ids"},
                )
            )
        return out

    # ------------------------------------------------------------------ robustness
    def perturbed(
        self, examples: list[Example], p: Perturbation, seed: int
    ) -> list[Example] | None:
        """Entity-preserving copies: only words tagged O change or go, each dropped word with
        its tag, so words and tags stay aligned. None for a perturbation of the spacing alone:
        words reach the model already split, so it would change nothing."""
        if p.spacing:
            return None
        out = []
        for i, ex in enumerate(examples):
            tags = ex.tags or ["O"] * len(ex.words)
            w = p.on_words(ex.words, [t != "O" for t in tags], seed, i)
            text = " ".join(w.words)
            starts = np.cumsum([0] + [len(word) + 1 for word in w.words[:-1]]).tolist()
            out.append(
                Example(
                    w.words,
                    text,
                    [(s, s + len(word)) for s, word in zip(starts, w.words)],
                    [ex.tags[k] for k in w.origin] if ex.tags is not None else None,
                    ex.file,
                    ex.line,
                    [ex.word_line(k) for k in w.origin] if ex.lines else None,
                    origin=[ex.origin[k] for k in w.origin] if ex.origin else w.origin,
                )
            )
        return out

    def robustness_view(self, example: Example, prediction: dict[str, Any]) -> View:
        """Entities shown as `TYPE: words`, compared by type and source words: a perturbation
        that changes the words of a predicted entity but not the entity is no flip."""
        source = example.origin or list(range(len(example.words)))
        found = entities(prediction["tags"], self.cfg.strict)
        return View(
            " ".join(example.words),
            self._entity_list(example.words, example.tags or []),
            self._entity_list(example.words, prediction["tags"]),
            tuple((k, source[s], source[e - 1]) for k, s, e in found),
        )

    def _entity_list(self, words: list[str], tags: list[str]) -> str:
        found = [f"{k}: {' '.join(words[s:e])}" for k, s, e in entities(tags, self.cfg.strict)]
        return "; ".join(found) or "(none)"

    def report(self, evaluation: Evaluation) -> str:
        d = evaluation.details
        mode = "strict IOB2" if self.cfg.strict else "conlleval (lenient)"
        rows = [
            [k, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", v["support"]]
            for k, v in d["per_type"].items()
        ]
        m = evaluation.metrics
        rows.append(
            [
                "**micro**",
                f"{m['precision']:.4f}",
                f"{m['recall']:.4f}",
                f"{m['f1']:.4f}",
                sum(v["support"] for v in d["per_type"].values()),
            ]
        )
        rows.append(["**macro**", "", "", f"{m['macro_f1']:.4f}", ""])
        parts = [
            f"### Entities per type (seqeval, {mode} mode)\n\n"
            + markdown_table(["type", "precision", "recall", "f1", "support"], rows),
            "### Tag confusion matrix, per word (rows: gold, columns: predicted)\n\n"
            + markdown_table(
                ["gold \\ pred", *d["labels"]],
                [[f"**{g}**", *row] for g, row in zip(d["labels"], d["confusion_matrix"])],
            ),
        ]
        if "reliability" in d:
            parts.append(calibration.calibration_markdown(evaluation, "word"))
        parts += [
            "### Sentences with the most entity errors (missed + spurious entities)\n\n"
            + examples_markdown(d["worst_sentences"], ["sentence", "errors", "gold", "predicted"]),
            f"### Entity F1 by sentence length ({mode} mode)\n\n"
            + slices_markdown(d["length_slices"], "words", "entity f1"),
        ]
        return "\n\n".join(parts)

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]:
        d = evaluation.details
        f1_path = out_dir / f"{prefix}entity_f1.png"
        plots.bars(
            list(d["per_type"]),
            [v["f1"] for v in d["per_type"].values()],
            f1_path,
            title=f"{prefix}entity F1 per type",
            ylabel="F1",
        )
        cm_path = out_dir / f"{prefix}tag_confusion_matrix.png"
        plots.confusion_matrix(
            np.array(d["confusion_matrix"]),
            d["labels"],
            cm_path,
            title=f"{prefix}tag confusion matrix",
        )
        return [f1_path, cm_path, *calibration.reliability_plot(evaluation, out_dir, prefix)]
