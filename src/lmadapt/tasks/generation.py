"""Generation: instruction tuning and continued pre-training of causal LMs, and prompt ->
response with encoder-decoders (how each lays an example out: `generation_layouts`), scored by
decoding.

Loss: next-token cross-entropy on response tokens only by default; `lm_loss_weight` β also trains
prompt tokens with weight β (per-token weights, see `CausalLayout.loss`); `align_weight` α gives
instruction tuning's L = L_LM + α·L_align instead (two token means, see
GenerationConfig.align_weight).
Evaluation decodes (greedy by default) and scores the text, so this task brings its own
`evaluate_model` / `predict_model` instead of the logits path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmadapt.data.batching import Collator, PackingCollator, Seq2SeqCollator, token_budget_batches
from lmadapt.data.chat import Conversation, read_conversations
from lmadapt.data.tagged import split_words
from lmadapt.data.templates import MarkupTemplate, Segment, build_template
from lmadapt.data.validation import BadRows, collect
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluate import metrics as M
from lmadapt.evaluate import plots
from lmadapt.evaluate.explain import Explainable, Target
from lmadapt.evaluate.report import cell, classification_report_markdown, markdown_table
from lmadapt.evaluate.text import exact_match, overlap_metrics
from lmadapt.inference import (
    Decoded,
    Encoded,
    GenerationSettings,
    eval_mode,
    generate_ids,
    model_inputs,
    on_model_device,
)
from lmadapt.tasks.base import Endpoint, Evaluation, keep_valid
from lmadapt.tasks.capabilities import cannot_explain
from lmadapt.tasks.configs import GenerationConfig
from lmadapt.tasks.generation_layouts import Layout, layout_for, layout_from_state

EVAL_TOKENS_PER_BATCH = 4096
"""Loss evaluation batches hold at most this many tokens: the (B, T, vocab) logits of a 49k-token
vocabulary are 200 KB per token in fp32."""
NO_LABEL = "(none)"


class GenerationTask:
    """Generation with the model's own LM head: chat/instruction tuning or continued
    pre-training of a causal LM, or prompt -> response with an encoder-decoder (T5, BART), whose
    encoder reads the prompt and whose decoder is trained on the response."""

    kind = "generation"
    model_kinds: tuple[str, ...] = ("causal", "seq2seq")
    endpoint: Endpoint = "generate"
    shares_backbone = False  # the LM head is the pretrained one, not a task head
    label_distribution = False
    groups_by_length = True
    head_lr_floor: float | None = None
    train_dropout: float | None = None
    description = "generation"
    default_metric = "loss"

    def __init__(self, cfg: GenerationConfig, state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.labels = list(cfg.labels or [])
        self.template_name: str | None = (state or {}).get("template")
        self.layout: Layout = layout_from_state(state or {}, cfg)
        self.tokenizer: Any = None
        self.pattern = re.compile(cfg.answer_pattern) if cfg.answer_pattern else None
        self.label_patterns = [
            re.compile(rf"(?<!\w){re.escape(label)}(?!\w)", re.IGNORECASE)
            for label in cfg.labels or []
        ]

    # ------------------------------------------------------------------ data
    def read(
        self, path: str, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
    ) -> list[Conversation]:
        """Conversations, already checked against task.labels (which needs no training data),
        so a bad reference is a bad row like any other; bad rows go to `bad`."""
        with collect(path, bad) as bad:
            convs = read_conversations(path, fmt, self.cfg.data_format, labelled, bad)
            return self.check(convs, bad)

    def stream(
        self, path: str, fmt: str, bad: BadRows, labelled: bool = True
    ) -> list[Conversation]:
        """`read`'s list: conversations are held in memory."""
        return self.read(path, fmt, labelled, bad=bad)

    def fit(self, train: Iterable[Conversation]) -> None:
        self.check(list(train))

    def check(self, examples: list[Conversation], bad: BadRows | None = None) -> list[Conversation]:
        """With `labels`, every reference must mention one, or it could not be scored."""
        if not self.cfg.labels:
            return examples
        return keep_valid(examples, self._scorable, bad)

    def _scorable(self, ex: Conversation) -> Conversation:
        if ex.reference is not None and self.label_of(ex.reference) is None:
            raise DataError(
                ex.file,
                f"response {ex.reference[:60]!r} mentions none of task.labels "
                f"({', '.join(self.cfg.labels or [])})",
                ex.line,
                "response",
            )
        return ex

    def state(self) -> dict[str, Any]:
        return {"template": self.template_name, "labels": self.cfg.labels} | self.layout.state()

    @property
    def peft_task_type(self) -> str:
        return self.layout.peft_task_type

    @property
    def seq2seq(self) -> bool:
        """Whether the model is an encoder-decoder (the prompt on its encoder)."""
        return self.layout.kind == "seq2seq"

    @property
    def decoder_start(self) -> int | None:
        """An encoder-decoder's first decoder token; None for a causal LM."""
        return self.layout.decoder_start

    def use_model(self, spec: Any) -> None:
        """The layout of the model's kind: an encoder-decoder takes the prompt on the encoder
        and learns the response on the decoder; what only a causal LM can do (train prompt
        tokens, pack rows, continue raw text) is refused here."""
        self.layout = layout_for(spec, self.cfg)

    def examples_from_texts(self, texts: list[str]) -> list[Conversation]:
        return [
            Conversation([{"role": "user", "content": t}], file="<input>", line=i + 1)
            for i, t in enumerate(texts)
        ]

    def explainables(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        examples: list[Conversation],
        label: str | None,
        batch_size: int,
    ) -> list[Explainable]:
        """With label-aware evaluation (task.labels): the log-probability of the predicted
        label's first token as the answer's first token (the label whose first token the model
        ranks highest), or of `label`'s, over the words of the last user turn."""
        labels = self.cfg.labels
        if not labels:
            raise cannot_explain(self)
        if label is not None and label not in labels:
            raise LmadaptError(f"unknown label {label!r}; the run's labels are {', '.join(labels)}")
        firsts = [tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in labels]
        if len(set(firsts)) < len(firsts):
            raise LmadaptError(
                f"task.labels ({', '.join(labels)}) share a first token: explain attributes "
                "the first token, which would not tell them apart"
            )
        template = self.template(tokenizer)
        bos = self._bos(tokenizer, template)
        forward = on_model_device(model)
        out = []
        for ex in examples:
            if ex.text is not None or ex.reference is not None:
                raise LmadaptError(
                    f"{ex.file} line {ex.line}: explain takes prompts (a last user turn)"
                )
            content = ex.messages[-1]["content"]
            spans = split_words(content)
            segs = self.segments(ex, template)
            where = next((i for i in reversed(range(len(segs))) if content in segs[i].text), -1)
            ids = list(bos)
            word_ids: list[int | None] = [None] * len(bos)
            for i, seg in enumerate(segs):
                enc = tokenizer(seg.text, add_special_tokens=False, return_offsets_mapping=True)
                ids += enc["input_ids"]
                start = seg.text.rfind(content) if i == where else -1
                for a, b in enc["offset_mapping"]:
                    word_ids.append(None if start < 0 else _word_at(spans, a - start, b - start))
            if len(ids) > self.cfg.max_length:
                raise LmadaptError(
                    f"{ex.file} line {ex.line}: the prompt has {len(ids)} tokens, more than "
                    f"task.max_length = {self.cfg.max_length}"
                )
            with torch.no_grad():
                last = forward(input_ids=torch.tensor([ids])).logits[0, -1].float()
            log_probs = F.log_softmax(last, -1)
            k = labels.index(label) if label is not None else int(log_probs[firsts].argmax())
            about = {"label": labels[k], "token": tokenizer.convert_ids_to_tokens(firsts[k])}
            out.append(
                Explainable(
                    text=content,
                    input_ids=ids,
                    words=[{"word": content[a:b], "start": a, "end": b} for a, b in spans],
                    word_ids=word_ids,
                    targets=[
                        Target(
                            about,
                            round(float(log_probs[firsts[k]].exp()), 6),
                            _next_token_log_prob(firsts[k]),
                        )
                    ],
                )
            )
        return out

    def template(self, tokenizer: Any) -> Any:
        """The prompt template; `auto` is resolved once and then kept in the run's state."""
        self.tokenizer = tokenizer
        if self.template_name is None:
            self.template_name = build_template(self.cfg.template, tokenizer).name
        return build_template(self.template_name, tokenizer)

    def _bos(self, tokenizer: Any, template: Any) -> list[int]:
        """BOS for templates that do not write it themselves, if the tokenizer normally adds it."""
        bos = tokenizer.bos_token_id
        if bos is None or not isinstance(template, MarkupTemplate):
            return []
        return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []

    def segments(self, ex: Conversation, template: Any) -> list[Segment]:
        if ex.text is not None:
            return [Segment(ex.text + (self.tokenizer.eos_token or ""), True)]
        return template.segments(ex.messages, add_generation_prompt=ex.reference is None)

    def encode(self, examples: list[Conversation], tokenizer: Any) -> list[dict[str, Any]]:
        """Features as the model's layout wants them (input_ids, labels, and loss_weights for a
        causal LM), from the conversations' tokens and which of them are responses."""
        rows = self.token_rows(examples, tokenizer)
        return [
            self.layout.feature(ex, ids, train, tokenizer)
            for ex, (ids, train) in zip(examples, rows)
        ]

    def token_rows(
        self, examples: list[Conversation], tokenizer: Any
    ) -> list[tuple[list[int], list[bool]]]:
        """Each conversation's tokens through the template, uncut, and which of them train
        (responses). Each segment is tokenized on its own so the response mask is exact."""
        if not examples:
            return []
        template = self.template(tokenizer)
        bos = self._bos(tokenizer, template)
        per_example = [self.segments(ex, template) for ex in examples]
        flat = [s.text for segs in per_example for s in segs]
        ids_flat = tokenizer(flat, add_special_tokens=False)["input_ids"]
        rows, k = [], 0
        for segs in per_example:
            ids, train = list(bos), [False] * len(bos)
            for s in segs:
                ids += ids_flat[k]
                train += [s.train] * len(ids_flat[k])
                k += 1
            rows.append((ids, train))
        return rows

    def feature_counts(self, examples: list[Any]) -> list[int]:
        """One feature per conversation (per pair, for preference)."""
        return [1] * len(examples)

    def collator(self, tokenizer: Any) -> Collator | PackingCollator | Seq2SeqCollator:
        self.tokenizer = tokenizer
        return self.layout.collator(tokenizer)

    # ------------------------------------------------------------------ model
    def build_model(self, spec: Any, trust_remote_code: bool = False) -> torch.nn.Module:
        from lmadapt.models import load_model

        model = load_model(spec, self.layout.auto_model(), trust_remote_code)
        # No KV cache in training forward passes: it is useless there, and transformers only
        # honours packed position_ids without one. generate() turns it back on.
        model.config.use_cache = False
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return []  # the LM head is pretrained

    def forward_kwargs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A causal LM's logits only where the loss reads them (`CausalLayout.forward_kwargs`)."""
        return self.layout.forward_kwargs(model, batch)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted mean cross-entropy on the tokens that train (the layout's `loss`)."""
        return self.layout.loss(logits, batch)

    # ------------------------------------------------------------------ decoding
    def settings(self, **overrides: Any) -> GenerationSettings:
        """The task's decoding settings with `overrides` (None = keep), checked."""
        return self.cfg.settings(**overrides)

    def _stops(self, settings: GenerationSettings) -> tuple[list[int], list[str]]:
        """(end token ids, stop strings): one-token markers stop by id, the rest by text."""
        tok = self.tokenizer
        template = build_template(self.template_name or self.cfg.template, tok)
        strings = [s for s in (*template.stop, *settings.stop) if s]
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        texts = []
        for s in strings:
            enc = tok(s, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] in tok.all_special_ids:
                ids.add(enc[0])
            else:
                texts.append(s)
        return sorted(ids), texts

    def stop_strings(self, settings: GenerationSettings) -> list[str]:
        """The stop strings decoded text is cut at, for callers that cut streamed text alike."""
        return self._stops(settings)[1]

    def prompt_ids(self, feature: dict[str, Any], example: Conversation) -> list[int]:
        """What decoding continues: the encoder's input, or a causal LM's tokens before the
        last response (raw text without its end-of-text token)."""
        return self.layout.prompt_ids(feature, example)

    def decode_ids(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        settings: GenerationSettings,
        streamer: Any = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Decoded:
        """Continue each prompt with the one decoder, stopping at this task's end tokens and
        stop strings (the template's and the settings'), or once `cancelled()`."""
        eos_ids, stop_texts = self._stops(settings)
        return generate_ids(
            model,
            self.tokenizer,
            prompts,
            settings,
            eos_ids,
            stop_texts,
            self.cfg.generate_batch_size,
            streamer,
            cancelled,
        )

    def generate(
        self,
        model: torch.nn.Module,
        conversations: list[Conversation],
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        """Answer each conversation's last user turn (public entry for CLI, chat and serving)."""
        feats = self.encode(conversations, self.tokenizer)
        return self.decode_ids(
            model,
            [self.prompt_ids(f, c) for f, c in zip(feats, conversations)],
            settings or self.settings(),
        ).texts

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def response_loss(self, model: torch.nn.Module, features: list[dict[str, Any]]) -> float:
        """Mean cross-entropy over response tokens (teacher forcing), fp32, token-weighted."""
        collate = self.layout.eval_collator(self.tokenizer)
        forward = on_model_device(model)
        total, count = 0.0, 0
        with eval_mode(model):
            for idx in token_budget_batches(
                [len(f["input_ids"]) for f in features], EVAL_TOKENS_PER_BATCH
            ):
                batch = collate([features[i] for i in idx])
                n = self.layout.response_only(batch)
                if n:
                    inputs = model_inputs(batch) | self.forward_kwargs(model, batch)
                    total += float(self.loss(forward(**inputs).logits, batch)) * n
                    count += int(n)
        return total / count if count else float("nan")

    def evaluate_model(self, model: torch.nn.Module, data: Encoded) -> Evaluation:
        """Response loss and perplexity on every example; metrics of decoded responses on the
        first `eval_generate_max_samples` examples that have a reference. Batches are the
        task's own (by tokens, `EVAL_TOKENS_PER_BATCH`), not `data`'s collator and size."""
        features, examples = data.features, data.examples
        loss = self.response_loss(model, features)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        scored = [i for i, ex in enumerate(examples) if ex.reference is not None]
        limit = self.cfg.eval_generate_max_samples
        scored = scored if limit is None else scored[:limit]
        if not scored:
            return Evaluation(metrics)
        decoded = self.decode_ids(
            model, [self.prompt_ids(features[i], examples[i]) for i in scored], self.settings()
        )
        refs = [examples[i].reference or "" for i in scored]
        ev = self.score(decoded.texts, refs)
        ev.metrics = {
            **metrics,
            **ev.metrics,
            "generated": float(len(scored)),
            "gen_tokens_per_second": decoded.new_tokens / max(decoded.seconds, 1e-9),
        }
        ev.details["samples"] = [
            {"prompt": examples[i].prompt_messages[-1]["content"], "reference": r, "output": o}
            for i, r, o in list(zip(scored, refs, decoded.texts))[: self.cfg.report_samples]
        ]
        return ev

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What `evaluate_model` can report; the decoded-text metrics need dev references."""
        names = ["loss", "perplexity"]
        if self.cfg.eval_generate_max_samples != 0:
            names += ["exact_match", "rougeL", "bleu", "generated", "gen_tokens_per_second"]
            names += ["format_rate"] if self.pattern else []
            names += ["accuracy", "macro_f1", "no_label_rate"] if self.cfg.labels else []
        return tuple(names)

    def extract(self, text: str) -> str | None:
        if self.pattern is None:
            return None
        m = self.pattern.search(text)
        if m is None:
            return None
        return m.group(1) if self.pattern.groups else m.group(0)

    def label_of(self, text: str) -> str | None:
        """The label mentioned first in `text` (case-insensitive, whole words)."""
        hits = [
            (m.start(), label)
            for p, label in zip(self.label_patterns, self.cfg.labels or [])
            if (m := p.search(text))
        ]
        return min(hits)[1] if hits else None

    def score(self, predictions: list[str], references: list[str]) -> Evaluation:
        if self.pattern:  # the answers the pattern extracts, or None where it finds none
            pred, gold = (
                [self.extract(p) for p in predictions],
                [self.extract(r) for r in references],
            )
            extra = {"format_rate": float(np.mean([p is not None for p in pred]))}
        else:
            pred, gold, extra = list(predictions), list(references), {}
        metrics = {
            "exact_match": exact_match(pred, gold),
            **extra,
            **overlap_metrics(predictions, references),
        }
        if not self.cfg.labels:
            return Evaluation(metrics)
        names = [*self.cfg.labels, NO_LABEL]
        index = {n: i for i, n in enumerate(names)}
        pred_ids = np.array([index[self.label_of(p) or NO_LABEL] for p in predictions])
        gold_ids = np.array([index[self.label_of(r) or NO_LABEL] for r in references])
        ev = M.single_label_metrics(pred_ids, gold_ids, names)
        per_class = ev.details["per_class"]
        metrics["accuracy"] = ev.metrics["accuracy"]
        # macro F1 over the configured labels; "(none)" (no label mentioned) is never gold
        metrics["macro_f1"] = float(np.mean([per_class[n]["f1"] for n in self.cfg.labels]))
        metrics["no_label_rate"] = float(np.mean(pred_ids == index[NO_LABEL]))
        return Evaluation(metrics, ev.details)

    def predict_model(self, model: torch.nn.Module, data: Encoded) -> list[dict[str, Any]]:
        examples: list[Conversation] = data.examples
        decoded = self.decode_ids(
            model,
            [self.prompt_ids(f, ex) for f, ex in zip(data.features, examples)],
            self.settings(),
        )
        rows = []
        for ex, out in zip(examples, decoded.texts):
            prompt = ex.text if ex.text is not None else ex.prompt_messages[-1]["content"]
            row: dict[str, Any] = {"prompt": prompt, "output": out}
            if ex.reference is not None:
                row["reference"] = ex.reference
            if self.cfg.labels:
                row["label"] = self.label_of(out)
            rows.append(row)
        return rows

    def logits(self, output: Any) -> torch.Tensor:
        return output.logits

    # ------------------------------------------------------------------ report
    def report(self, evaluation: Evaluation) -> str:
        parts = []
        samples = evaluation.details.get("samples")
        if samples:
            rows = [
                [cell(s["prompt"], 160), cell(s["reference"], 160), cell(s["output"], 160)]
                for s in samples
            ]
            parts.append(
                "### Sample generations\n\n"
                + markdown_table(["prompt", "reference", "output"], rows)
            )
        labels = classification_report_markdown(evaluation)
        if labels:
            parts.append(labels)
        return "\n\n".join(parts)

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]:
        cm = evaluation.details.get("confusion_matrix")
        if cm is None:
            return []
        path = out_dir / f"{prefix}confusion_matrix.png"
        names = evaluation.details["labels"]
        plots.confusion_matrix(np.array(cm), names, path, title=f"{prefix}confusion matrix")
        return [path]


def _next_token_log_prob(token: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, T, V) logits -> (B,): the log-probability of `token` as the next token."""
    return lambda z: F.log_softmax(z[:, -1], -1)[:, token]


def _word_at(spans: list[tuple[int, int]], start: int, end: int) -> int | None:
    """The first word whose [start, end) overlaps a token's, None for a token outside them."""
    return next((k for k, (a, b) in enumerate(spans) if a < end and start < b), None)
