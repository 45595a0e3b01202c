"""Batched forward passes for evaluation and prediction (no gradients, length-sorted batches)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmadapt.data import sequential_batches


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where autocast pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and cpu_has_bf16())


def autocast(enabled: bool, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


LOSS_ONLY_KEYS = ("labels", "loss_weights", "teacher_logits")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward arguments: the batch without what only the loss reads.

    A batch with `position_ids` is packed (several examples per row, positions restarting at
    each); it goes without its padding mask so that transformers masks attention per example.
    """
    inputs = {k: v for k, v in batch.items() if k not in LOSS_ONLY_KEYS}
    if "position_ids" in inputs:
        inputs.pop("attention_mask", None)
    return inputs


@torch.no_grad()
def batched_logits(
    model: torch.nn.Module,
    features: list[dict[str, Any]],
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    bf16: bool = False,
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    per_token: bool = False,
) -> tuple[list[np.ndarray], float | None]:
    """Logits for every feature, in input order, and the mean loss when labels are present.

    fp32 by default, also after bf16 training: saved artifacts then give the same numbers here as
    in plain transformers/peft.

    Sequence-level logits come back as (C,) arrays; with `per_token`, (T_i, C) arrays trimmed to
    each example's own length.
    """
    was_training = model.training
    model.eval()
    out: list[np.ndarray | None] = [None] * len(features)
    lengths = [len(f["input_ids"]) for f in features]
    total_loss, n_loss = 0.0, 0
    try:
        for idx in sequential_batches(lengths, batch_size):
            batch = collator([features[i] for i in idx])
            with autocast(bf16):
                logits = model(**model_inputs(batch)).logits
            logits = logits.float()
            if loss_fn is not None and "labels" in batch:
                total_loss += float(loss_fn(logits, batch)) * len(idx)
                n_loss += len(idx)
            arr = logits.numpy()
            # Prompt/p-tuning prepend virtual tokens to the logits: per token, keep the real ones.
            skip = arr.shape[1] - batch["input_ids"].shape[1] if per_token else 0
            for row, i in enumerate(idx):
                out[i] = arr[row, skip : skip + lengths[i]] if per_token else arr[row]
    finally:
        model.train(was_training)
    return out, (total_loss / n_loss if n_loss else None)  # type: ignore[return-value]


def evaluate_model(
    model: torch.nn.Module,
    task: Any,
    features: list[dict[str, Any]],
    examples: list[Any],
    collator: Any,
    batch_size: int,
) -> Any:
    """Score `model` on labelled features with the task's metrics (+ mean loss).

    Tasks whose evaluation is not a function of logits (generation decodes text) provide their
    own `evaluate_model`; the rest share this logits path.
    """
    custom = getattr(task, "evaluate_model", None)
    if custom is not None:
        return custom(model, features, examples, collator, batch_size)
    logits, loss = batched_logits(
        model,
        features,
        collator,
        batch_size,
        loss_fn=task.loss,
        per_token=getattr(task, "per_token", False),
    )
    ev = task.evaluate(logits, examples)
    if loss is not None:
        ev.metrics["loss"] = loss
    return ev


def predict_examples(
    model: torch.nn.Module,
    task: Any,
    features: list[dict[str, Any]],
    examples: list[Any],
    collator: Any,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Task-level predictions (labels, entities, ...) for unlabelled features."""
    custom = getattr(task, "predict_model", None)
    if custom is not None:
        return custom(model, features, examples, collator, batch_size)
    logits, _ = batched_logits(
        model, features, collator, batch_size, per_token=getattr(task, "per_token", False)
    )
    return task.decode(logits, examples)
