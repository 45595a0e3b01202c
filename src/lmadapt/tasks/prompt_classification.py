"""Prompt-based fine-tuning (Schick & Schütze 2021, PET, arXiv:2001.07676; Gao et al. 2021, LM-BFF,
arXiv:2012.15723): classification trained through the LM head, with the same template and
verbalizer as zero-shot prompting. No new head: the loss is cross-entropy over the label scores
log p(verbalizer | prompt), so training starts from the zero-shot classifier instead of a random
head, which is what makes it strong with few examples. Any registered method (lora, prompt tuning,
full, ...) trains it through the one training loop.

It is also the one prompt-classification stack: the `prompt` command (zero/few-shot, no
training) reads, renders, scores and evaluates through this task, adding only what needs no
training (demonstrations, calibration, template ensembles, KV-prefix reuse).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax

from lmadapt.data.validation import BadRows, collect
from lmadapt.evaluate import metrics as M
from lmadapt.evaluate import plots
from lmadapt.evaluate.perturbations import Perturbation
from lmadapt.evaluate.report import classification_report_markdown
from lmadapt.evaluate.robustness import View
from lmadapt.prompting.templates import Demo, Renderer, load_template, template_verbalizer
from lmadapt.prompting.verbalizers import Continuations, Verbalizer
from lmadapt.tasks.base import Evaluation, LogitsTask
from lmadapt.tasks.classification import ClassificationTask, Example
from lmadapt.tasks.classification_problems import known_labels
from lmadapt.tasks.configs import ClassificationConfig, PromptClassificationConfig


def _label_names(label: Any) -> list[str]:
    """A single label as a list of names: none for an unlabelled example."""
    return [] if label is None else [label]


class PromptCollator:
    """Left-padded prompt rows; one row per verbalizer when some verbalizer has several tokens.

    Left padding puts every scored position at the end, so `logits_to_keep` (negative indices)
    asks the model for those logits only, also when a method prepends virtual tokens.
    """

    def __init__(self, pad_id: int, conts: Continuations):
        self.pad_id, self.conts = pad_id, conts

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.conts.single_token:
            rows = [f["input_ids"] for f in features]
            keep = 1
        else:
            rows = [f["input_ids"] + c[:-1] for f in features for c in self.conts.ids]
            keep = max(len(c) for c in self.conts.ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": torch.arange(-keep, 0)}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch


class PromptClassificationTask(LogitsTask):
    """Classification through the LM head: CE over verbalizer log-probabilities (PET / LM-BFF)."""

    kind = "prompt_classification"
    peft_task_type = "CAUSAL_LM"
    model_kinds = ("causal",)
    endpoint = "classify"  # its predictions are labels with probabilities, like a head's
    shares_backbone = False  # it scores through the pretrained LM head
    label_distribution = True
    description = "prompt_classification"
    default_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1", "loss")

    def __init__(self, cfg: PromptClassificationConfig, state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.template = load_template(cfg.template)
        raw = cfg.verbalizer or template_verbalizer(cfg.template)
        assert raw is not None  # PromptClassificationConfig refuses a config without one
        self.verbalizer = Verbalizer.from_config(raw, "task.verbalizer")
        self.labels = self.verbalizer.labels
        self.reader = ClassificationTask(
            ClassificationConfig(
                text_column=(state or {}).get("text_column", cfg.text_column),
                text_pair_column=(state or {}).get("text_pair_column", cfg.text_pair_column),
                label_column=cfg.label_column,
            )
        )
        self.conts: Continuations | None = None

    # ------------------------------------------------------------------ data
    def read(
        self, path: str, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
    ) -> list[Example]:
        """Examples, already checked against the verbalizer (which needs no training data), so
        a label without an entry is a bad row like any other; bad rows go to `bad`."""
        with collect(path, bad) as bad:
            return self.check(self.reader.read(path, fmt, labelled, bad), bad)

    def fit(self, train: list[Example]) -> None:
        self.check(train)

    def check(self, examples: list[Example], bad: BadRows | None = None) -> list[Example]:
        """The examples whose label has a verbalizer entry; the others are bad rows (all of them
        listed in one error when there is no collector)."""
        return known_labels(
            examples,
            self.labels,
            _label_names,
            self.cfg.label_column,
            bad,
            unknown="has no verbalizer entry",
        )

    def state(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "text_column": self.reader.cfg.text_column,
            "text_pair_column": self.reader.cfg.text_pair_column,
        }

    def examples_from_texts(self, texts: list[str]) -> list[Example]:
        return self.reader.examples_from_texts(texts)

    @property
    def continuations(self) -> Continuations:
        """The verbalizer's token ids, known once `encode` or `collator` has seen the tokenizer."""
        if self.conts is None:
            raise RuntimeError("prompt_classification scores labels only after encode or collator")
        return self.conts

    def renderer(self, tokenizer: Any) -> Renderer:
        """The template's renderer for `tokenizer`; the verbalizer's token ids are known after."""
        if self.conts is None:
            self.conts = self.verbalizer.tokenize(tokenizer, self.template.answer)
        return Renderer(self.template, tokenizer)

    def _cut(self, text: str | None, tokenizer: Any) -> str | None:
        if text is None or self.cfg.max_length is None:
            return text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.cfg.max_length:
            return text
        return tokenizer.decode(ids[: self.cfg.max_length])

    def fields(self, example: Example, tokenizer: Any) -> dict[str, str | None]:
        """The template's slots for one example, each text cut to `max_length` tokens."""
        return {
            "text": self._cut(example.text, tokenizer),
            "text_pair": self._cut(example.text_pair, tokenizer),
        }

    def demo(self, renderer: Renderer, example: Example) -> Demo:
        """A labelled example as a demonstration, answered with its label's first word."""
        word = self.verbalizer.words[example.label][0]
        return renderer.demo(self.fields(example, renderer.tokenizer), word)

    def prompt_ids(
        self, renderer: Renderer, fields: dict[str, str | None], demos: Sequence[Demo] = ()
    ) -> tuple[list[int], list[int]]:
        """(prefix, suffix) token ids of one query: the prefix (instruction, demonstrations)
        does not depend on the query, so a scorer may encode it once and reuse its KV cache."""
        prefix, suffix = renderer.render(list(demos), fields)
        tok = renderer.tokenizer
        return (
            tok(prefix, add_special_tokens=not renderer.chat)["input_ids"],
            tok(suffix, add_special_tokens=False)["input_ids"],
        )

    def encode(self, examples: list[Example], tokenizer: Any) -> list[dict[str, Any]]:
        renderer = self.renderer(tokenizer)
        index = {n: i for i, n in enumerate(self.labels)}
        feats = []
        for ex in examples:
            prefix, suffix = self.prompt_ids(renderer, self.fields(ex, tokenizer))
            f: dict[str, Any] = {"input_ids": prefix + suffix}
            if ex.label is not None:
                f["labels"] = index[ex.label]
            feats.append(f)
        return feats

    def collator(self, tokenizer: Any) -> PromptCollator:
        self.renderer(tokenizer)
        return PromptCollator(tokenizer.pad_token_id, self.continuations)

    # ------------------------------------------------------------------ model
    def build_model(self, spec: Any, trust_remote_code: bool = False) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from lmadapt.models import load_model

        model = load_model(spec, AutoModelForCausalLM, trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
        return model

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """None: the LM head is the classifier, so nothing is freshly initialised."""
        return []

    def label_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, kept positions, vocab) LM logits -> (B, C) label log-scores."""
        conts = self.continuations
        lp = logits.float().log_softmax(-1)
        if conts.single_token:
            per_cont = lp[:, -1, [c[0] for c in conts.ids]]
        else:
            width = lp.shape[1]
            lp = lp.view(-1, len(conts.ids), width, lp.shape[-1])
            per_cont = torch.stack(
                [
                    lp[:, j, torch.arange(width - len(c), width), torch.tensor(c)].sum(-1)
                    for j, c in enumerate(conts.ids)
                ],
                dim=1,
            )
        return self.continuation_scores(per_cont)

    def continuation_scores(self, per_cont: torch.Tensor) -> torch.Tensor:
        """(B, J) summed log-probs of each verbalizer continuation -> (B, C) label log-scores."""
        return self.continuations.label_scores(per_cont, self.cfg.length_normalize)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.outputs_loss(self.label_scores(logits), batch)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.label_scores(logits)  # (B, C): evaluation keeps label scores, not the vocab

    def outputs_loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs, batch["labels"])

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _probs(scores: list[np.ndarray]) -> np.ndarray:
        return softmax(np.stack(scores), axis=-1)

    def evaluate(self, logits: list[np.ndarray], examples: list[Example]) -> Evaluation:
        """Metrics of per-example label scores (log-scores or probabilities: only the argmax
        counts)."""
        index = {n: i for i, n in enumerate(self.labels)}
        gold = np.array([index[ex.label] for ex in examples])
        return M.single_label_metrics(self._probs(logits).argmax(-1), gold, self.labels)

    def decode(self, logits: list[np.ndarray], examples: list[Example]) -> list[dict[str, Any]]:
        out = []
        for ex, p in zip(examples, self._probs(logits)):
            row = {
                "text": ex.text,
                "label": self.labels[int(p.argmax())],
                "probabilities": {n: round(float(v), 6) for n, v in zip(self.labels, p)},
            }
            if ex.text_pair:
                row["text_pair"] = ex.text_pair
            out.append(row)
        return out

    def perturbed(self, examples: list[Example], p: Perturbation, seed: int) -> list[Example]:
        """As a classification task does: the texts, never the labels."""
        return self.reader.perturbed(examples, p, seed)

    def robustness_view(self, example: Example, prediction: dict[str, Any]) -> View:
        return self.reader.robustness_view(example, prediction)

    def report(self, evaluation: Evaluation) -> str:
        return classification_report_markdown(evaluation)

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]:
        path = out_dir / f"{prefix}confusion_matrix.png"
        cm = np.array(evaluation.details["confusion_matrix"])
        plots.confusion_matrix(cm, self.labels, path, title=f"{prefix}confusion matrix")
        return [path]
