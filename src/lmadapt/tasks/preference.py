"""Preference alignment of a causal LM on pairs of a preferred and a rejected reply.

Losses (`task.loss`), each over a pair's reply log-probabilities (the sum, or the mean per token,
of log p(reply token) under the chat template, prompt tokens excluded):

- `dpo` (Rafailov et al. 2023, arXiv:2305.18290): -log σ(β[(log π(y_w) - log π_ref(y_w)) -
  (log π(y_l) - log π_ref(y_l))]), with optional label smoothing ε (conservative DPO). The
  reference π_ref is the model before training: a PEFT model with its adapters disabled (no
  second model in memory), any other a frozen copy of the base loaded once (its weights again).
- `simpo` (Meng et al. 2024, arXiv:2405.14734), reference-free: -log σ(β(mean log π(y_w) -
  mean log π(y_l)) - γ).
- `orpo` (Hong et al. 2024, arXiv:2403.07691), reference-free: the chosen reply's token-mean NLL
  minus β·log σ(log odds(y_w) - log odds(y_l)), odds from the mean token probability.

A pair trains as two rows of one batch (chosen rows first); the reference's log-probabilities are
added to each training batch before the forward (`prepare_batch`, asked by the loop), without
gradients and in eval mode. Everything else a chat model does (generate, predict, serve) is the
generation task's, which this one extends.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmadapt.data.batching import Collator, token_budget_batches
from lmadapt.data.preference import PreferencePair, looks_like_pairs, read_pairs
from lmadapt.data.readers import iter_records
from lmadapt.data.validation import BadRows
from lmadapt.errors import DataError
from lmadapt.evaluate import plots
from lmadapt.evaluate.report import cell, markdown_table
from lmadapt.inference import Encoded, eval_mode, model_inputs, on_model_device
from lmadapt.models import ModelSpec
from lmadapt.tasks.base import DataProfile, Evaluation
from lmadapt.tasks.configs import PreferenceConfig
from lmadapt.tasks.generation import EVAL_TOKENS_PER_BATCH, GenerationTask
from lmadapt.tasks.generation_layouts import IGNORE, align_virtual, loss_positions


@dataclass
class Logps:
    """Per row of a pair batch (chosen rows, then rejected): Σ log p over the reply's tokens
    and how many tokens that is."""

    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) halves of a per-row tensor."""
        n = len(values) // 2
        return values[:n], values[n:]


@dataclass
class PairLoss:
    loss: torch.Tensor
    """The batch's loss (a scalar)."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-log σ(x), with ε of it on the other label (conservative DPO)."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def dpo(policy: Logps, reference: Logps | None, cfg: PreferenceConfig) -> PairLoss:
    assert reference is not None, "dpo needs the reference's log-probabilities"
    beta = cfg.strength
    pc, pr = policy.split(policy.sums)
    rc, rr = reference.split(reference.sums)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return PairLoss(_smoothed(chosen - rejected, cfg.label_smoothing).mean(), chosen, rejected)


def simpo(policy: Logps, reference: Logps | None, cfg: PreferenceConfig) -> PairLoss:
    beta = cfg.strength
    chosen, rejected = (beta * m for m in policy.split(policy.means))
    x = chosen - rejected - cfg.simpo_gamma
    return PairLoss(_smoothed(x, cfg.label_smoothing).mean(), chosen, rejected)


def orpo(policy: Logps, reference: Logps | None, cfg: PreferenceConfig) -> PairLoss:
    beta = cfg.strength
    # log(1 - p) as log(-expm1(m)), m kept below 0: a nearly certain reply (m -> 0) would
    # otherwise give log(0) and a NaN gradient
    pc, pr = (m.clamp(max=-1e-6) for m in policy.split(policy.means))
    log_odds = (pc - pr) - (torch.log(-torch.expm1(pc)) - torch.log(-torch.expm1(pr)))
    sums, counts = policy.split(policy.sums)[0], policy.split(policy.counts)[0]
    nll = -sums.sum() / counts.sum().clamp(min=1)  # token mean over the chosen replies
    return PairLoss(nll - beta * F.logsigmoid(log_odds).mean(), beta * pc, beta * pr)


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[Logps, Logps | None, PreferenceConfig], PairLoss]
    needs_reference: bool


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, needs_reference=True),
    "simpo": LossSpec(simpo, needs_reference=False),
    "orpo": LossSpec(orpo, needs_reference=False),
}


def reply_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> Logps:
    """Each row's Σ log p(reply token): logits of the whole row, or only of the loss positions
    (`forward_kwargs`), or with prompt-learning's virtual tokens first."""
    ids, w = batch["input_ids"], batch["loss_weights"]
    if logits.shape[1] < ids.shape[1]:  # only the positions that predict a reply token
        pos = loss_positions(w) + 1
        targets, mask = ids[:, pos], w[:, pos]
    else:
        logits = align_virtual(logits, batch)[:, :-1]
        targets, mask = ids[:, 1:], w[:, 1:]
    keep = mask > 0
    # only reply tokens go through the softmax: (N, V) rather than (rows, T, V)
    ce = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    rows = torch.arange(len(ids), device=ids.device).unsqueeze(1).expand_as(keep)[keep]
    sums = torch.zeros(len(ids), device=ce.device).index_add(0, rows.to(ce.device), -ce)
    return Logps(sums, keep.sum(1).to(ce.device))


class PairCollator:
    """A batch of pairs as 2B rows, the chosen replies first: input_ids, labels (the reply
    tokens, else -100) and loss_weights (1 on them), padded to the longest row."""

    def __init__(self, pad_id: int):
        self.inner = Collator(pad_id, {"labels": IGNORE, "loss_weights": 0.0})

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sides = (("input_ids", "labels"), ("rejected_ids", "rejected_labels"))
        rows = [
            {
                "input_ids": f[ids],
                "labels": f[labels],
                "loss_weights": [0.0 if t == IGNORE else 1.0 for t in f[labels]],
            }
            for ids, labels in sides
            for f in features
        ]
        return self.inner(rows)


class PreferenceTask(GenerationTask):
    """Preference alignment (DPO, SimPO, ORPO) of a causal LM with its own LM head; it answers
    prompts (predict, serve, chat) as a generation run does."""

    kind = "preference"
    model_kinds: tuple[str, ...] = ("causal",)
    groups_by_length = True
    default_metric = "loss"
    explainables = None  # type: ignore[assignment]  # no label to attribute: not explainable
    rows_per_example = 2  # a pair trains as its chosen and its rejected row
    # no dropout: the policy's log-probabilities are compared with the reference's, which has
    # none (TRL's DPOConfig.disable_dropout does the same)
    train_dropout: float | None = 0.0

    def __init__(self, cfg: PreferenceConfig, state: dict[str, Any] | None = None):
        super().__init__(cfg.generation(), state)
        self.pcfg = cfg
        self.loss_spec = LOSSES[cfg.loss]
        self.description = f"preference ({cfg.loss}, β = {cfg.strength:g})"
        self.spec: ModelSpec | None = None
        self._frozen: torch.nn.Module | None = None

    # ------------------------------------------------------------------ data
    def read(
        self, path: str, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
    ) -> list[Any]:
        """Pairs; unlabelled, the prompts alone (what predict and serve answer)."""
        pairs = read_pairs(path, fmt, labelled, bad)
        return pairs if labelled else [p.conversation(None) for p in pairs]

    def fit(self, train: Iterable[Any]) -> None:
        """Nothing to learn from the pairs (no label set)."""

    def recognises(self, path: str, fmt: str) -> bool:
        """Records holding `chosen` and `rejected` (its first one) are preference pairs, in
        any of the reader's layouts (`lmadapt auto`)."""
        try:  # the first record only: the rest of the file is not read
            first = next(iter_records(path, fmt), None)
        except DataError:  # no records (CoNLL, an unknown format...): not a file of pairs
            return False
        return first is not None and looks_like_pairs(first.fields)

    def profile(self, examples: list[PreferencePair]) -> DataProfile:
        """Pairs have no labels to count or keep in proportion: one stratum, so a carved dev set
        is a random share of them. Lengths are in words: the prompt's and the longer reply's."""
        words = [
            sum(len(m["content"].split()) for m in p.prompt)
            + max(len((p.chosen or "").split()), len((p.rejected or "").split()))
            for p in examples
        ]
        return DataProfile(
            examples=len(examples),
            label_counts={},
            strata=["pair"] * len(examples),
            source_lines=[[p.line] for p in examples],
            mean_words=float(np.mean(words)) if words else 0.0,
            max_words=max(words, default=0),
        )

    def use_model(self, spec: Any) -> None:
        """Kept: a model trained without adapters is scored against a fresh copy of it."""
        super().use_model(spec)
        self.spec = spec

    def encode(self, examples: list[Any], tokenizer: Any) -> list[dict[str, Any]]:
        """A pair's two rows as one feature (input_ids/labels the chosen row's, rejected_ids/
        rejected_labels the other's), each through the chat template as generation encodes a
        conversation; prompts to answer as generation encodes them."""
        if not examples or not isinstance(examples[0], PreferencePair):
            return super().encode(examples, tokenizer)
        convs = [p.conversation(reply) for p in examples for reply in (p.chosen, p.rejected)]
        rows = [self._cut(ids, train) for ids, train in self.token_rows(convs, tokenizer)]
        return [
            {"input_ids": c[0], "labels": c[1], "rejected_ids": r[0], "rejected_labels": r[1]}
            for c, r in zip(rows[::2], rows[1::2])
        ]

    def _cut(self, ids: list[int], train: list[bool]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one row within max_length: a longer row loses the start of its
        prompt, so that the reply (what the loss scores) stays whole; a reply longer than
        max_length by itself keeps its start after one prompt token. Labels are the reply's
        tokens, -100 elsewhere and always at the first position (nothing predicts it)."""
        limit = self.pcfg.max_length
        if len(ids) > limit:
            start = train.index(True)  # every row has a reply (the reader refuses empty ones)
            keep = max(0, min(len(ids) - limit, start - 1))
            ids, train = ids[keep : keep + limit], train[keep : keep + limit]
        labels = [t if on else IGNORE for t, on in zip(ids, train)]
        labels[0] = IGNORE
        return ids, labels

    def segments(self, ex: Any, template: Any) -> list[Any]:
        """As generation's, but only the last assistant turn (the pair's reply) is trained: the
        prompt's earlier assistant turns are context, outside the reply's log-probability."""
        segs = super().segments(ex, template)
        end = max((i + 1 for i, s in enumerate(segs) if s.train), default=0)
        start = end
        while start and segs[start - 1].train:  # the last run of trained segments: the reply
            start -= 1
        return [replace(s, train=False) if i < start else s for i, s in enumerate(segs)]

    def collator(self, tokenizer: Any) -> Any:
        self.tokenizer = tokenizer
        return PairCollator(tokenizer.pad_token_id)

    # ------------------------------------------------------------------ training
    @contextlib.contextmanager
    def base_model(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model before training: a peft model with its adapters disabled, else a frozen
        copy of the base (loaded on first use, on the model's device)."""
        disable = getattr(model, "disable_adapter", None)  # peft's PeftModel
        if disable is not None:
            with disable():
                yield model
            return
        if self._frozen is None:
            if self.spec is None:
                raise RuntimeError("PreferenceTask: use_model was not called")
            frozen = self.build_model(self.spec).requires_grad_(False)
            weight = next(model.parameters())
            self._frozen = frozen.to(device=weight.device).eval()
        yield self._frozen

    def reference_bytes(self, model: torch.nn.Module) -> int:
        """The frozen copy `base_model` loads for a model without peft's adapters (as the base
        loads: every weight in its own dtype), for the reference or for evaluation's base
        figures; 0 where adapters are disabled instead."""
        if hasattr(model, "disable_adapter"):
            return 0
        return sum(p.numel() * p.element_size() for p in model.parameters())

    @torch.no_grad()
    def _base_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Logps:
        with self.base_model(model) as base:
            was = base.training
            base.eval()  # the reference is a fixed function: no dropout
            try:
                out = base(**model_inputs(batch), **self.forward_kwargs(base, batch))
            finally:
                base.train(was)
        return reply_logps(out.logits, batch)

    def prepare_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Before the training forward: the reference's log-probabilities of the batch's replies
        (`reference_logps`), where the loss reads them."""
        if self.loss_spec.needs_reference:
            batch["reference_logps"] = self._base_logps(model, batch).sums

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        policy = reply_logps(logits, batch)
        reference = None
        if self.loss_spec.needs_reference:
            if "reference_logps" not in batch:
                raise RuntimeError("preference loss: the batch has no reference_logps")
            reference = Logps(batch["reference_logps"].to(policy.sums), policy.counts)
        return self.loss_spec.fn(policy, reference, self.pcfg).loss

    # ------------------------------------------------------------------ evaluation
    @property
    def metric_names(self) -> tuple[str, ...]:
        trained = ("loss", *PAIR_METRICS)
        return trained + tuple(f"base_{n}" for n in trained)

    @torch.no_grad()
    def evaluate_model(self, model: torch.nn.Module, data: Encoded) -> Evaluation:
        """The loss, rewards and log-probabilities of the trained model (and of the base model
        as if it were the policy: `base_*`), per pair; replies to the first `report_samples`
        prompts by both."""
        features: list[dict[str, Any]] = list(data.features)
        collate = PairCollator(self.tokenizer.pad_token_id)
        lengths = [max(len(f["input_ids"]), len(f["rejected_ids"])) for f in features]
        rows: dict[str, list[np.ndarray]] = {}
        losses = {"loss": 0.0, "base_loss": 0.0}
        with eval_mode(model):
            forward = on_model_device(model)
            for idx in token_budget_batches(lengths, EVAL_TOKENS_PER_BATCH // 2):
                batch = collate([features[i] for i in idx])
                out = forward(**model_inputs(batch), **self.forward_kwargs(model, batch))
                policy = reply_logps(out.logits, batch)
                base = self._base_logps(model, batch)
                trained = self.loss_spec.fn(policy, base, self.pcfg)
                untrained = self.loss_spec.fn(base, base, self.pcfg)
                losses["loss"] += float(trained.loss) * len(idx)
                losses["base_loss"] += float(untrained.loss) * len(idx)
                for prefix, logps, pl in (("", policy, trained), ("base_", base, untrained)):
                    values = {
                        "chosen_reward": pl.chosen_rewards,
                        "rejected_reward": pl.rejected_rewards,
                        "chosen_logp": logps.split(logps.sums)[0],
                        "rejected_logp": logps.split(logps.sums)[1],
                        "chosen_mean_logp": logps.split(logps.means)[0],
                        "rejected_mean_logp": logps.split(logps.means)[1],
                    }
                    for k, v in values.items():
                        rows.setdefault(prefix + k, []).append(v.float().cpu().numpy())
                rows.setdefault("index", []).append(np.array(idx))
        order = np.argsort(np.concatenate(rows.pop("index")))
        per_pair = {k: np.concatenate(v)[order] for k, v in rows.items()}
        n = max(len(features), 1)
        metrics = {"loss": losses["loss"] / n}
        metrics |= _pair_metrics(per_pair, "")
        metrics |= {"base_loss": losses["base_loss"] / n}
        metrics |= {f"base_{k}": v for k, v in _pair_metrics(per_pair, "base_").items()}
        margins = per_pair["chosen_reward"] - per_pair["rejected_reward"]
        details: dict[str, Any] = {"margins": [round(float(m), 4) for m in margins]}
        if self.pcfg.report_samples and data.examples:
            details["samples"] = self._samples(model, data.examples[: self.pcfg.report_samples])
        return Evaluation(metrics, details)

    def _samples(self, model: torch.nn.Module, pairs: list[PreferencePair]) -> list[dict]:
        """Greedy replies of the trained and of the base model to `pairs`' prompts."""
        prompts = [p.conversation(None) for p in pairs]
        feats = self.encode(prompts, self.tokenizer)
        ids = [self.prompt_ids(f, c) for f, c in zip(feats, prompts)]
        settings = self.settings()
        after = self.decode_ids(model, ids, settings).texts
        with self.base_model(model) as base:
            before = self.decode_ids(base, ids, settings).texts
        return [
            {"prompt": p.prompt[-1]["content"], "chosen": p.chosen, "base": b, "trained": a}
            for p, b, a in zip(pairs, before, after)
        ]

    # ------------------------------------------------------------------ report
    def report(self, evaluation: Evaluation) -> str:
        m = evaluation.metrics
        head = ["model", *BASE_METRICS]
        table = markdown_table(
            head,
            [
                ["base (untrained)", *(f"{m[f'base_{k}']:.4f}" for k in BASE_METRICS)],
                ["trained", *(f"{m[k]:.4f}" for k in BASE_METRICS)],
            ],
        )
        parts = [
            "### Trained vs base model\n\nRewards are the loss's own "
            + (
                "(β × log-probability ratio to the base model: 0 for the base itself, whose "
                "reward accuracy is chance, 0.5)"
                if self.loss_spec.needs_reference
                else "(β × mean reply log-probability)"
            )
            + "; logp_accuracy compares the mean log-probability per reply token.\n\n"
            + table
        ]
        samples = evaluation.details.get("samples")
        if samples:
            rows = [
                [
                    cell(s["prompt"], 160),
                    cell(s["chosen"], 160),
                    cell(s["base"], 160),
                    cell(s["trained"], 160),
                ]
                for s in samples
            ]
            parts.append(
                "### Sample replies (greedy)\n\n"
                + markdown_table(["prompt (last turn)", "chosen", "base model", "trained"], rows)
            )
        return "\n\n".join(parts)

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]:
        margins = evaluation.details.get("margins")
        if not margins:
            return []
        path = out_dir / f"{prefix}reward_margins.png"
        plots.histogram(margins, path, f"{prefix}reward margins (chosen - rejected)", "margin")
        return [path]


PAIR_METRICS = (
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logp",
    "rejected_logp",
    "logp_accuracy",
)
"""Per split, of the trained model and (as `base_*`) of the base model as if it were the policy."""
BASE_METRICS = (
    "loss",
    "reward_accuracy",
    "reward_margin",
    "chosen_logp",
    "rejected_logp",
    "logp_accuracy",
)
"""The columns of the report's trained-vs-base table."""


def _accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pairs with a > b, ties counting half (an untrained DPO policy ties every pair)."""
    return float(np.mean((a > b) + 0.5 * (a == b))) if len(a) else math.nan


def _pair_metrics(per_pair: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    def get(k: str) -> np.ndarray:
        return per_pair[prefix + k]

    chosen, rejected = get("chosen_reward"), get("rejected_reward")
    return {
        "reward_accuracy": _accuracy(chosen, rejected),
        "reward_margin": float(np.mean(chosen - rejected)),
        "chosen_reward": float(np.mean(chosen)),
        "rejected_reward": float(np.mean(rejected)),
        "chosen_logp": float(np.mean(get("chosen_logp"))),
        "rejected_logp": float(np.mean(get("rejected_logp"))),
        "logp_accuracy": _accuracy(get("chosen_mean_logp"), get("rejected_mean_logp")),
    }


__all__ = ["LOSSES", "PairCollator", "PreferenceTask"]
