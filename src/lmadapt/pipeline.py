"""The stages a training command goes through, written once: fit the adapted model with the one
loop, save the artifact, evaluate the splits, and finish the run directory (evaluations.json,
report.md, then metrics.json, whose presence marks a finished run).

`lmadapt train` (api), `distill` and `continual` assemble these stages; what differs stays in
each (distill's teacher features and its teacher-vs-student table, continual's loop over tasks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmadapt.evaluate.metrics import Evaluation
from lmadapt.evaluate.report import evaluation_record, write_report
from lmadapt.hooks import Hook
from lmadapt.io import atomic_dir, write_json
from lmadapt.methods.base import Method
from lmadapt.rundir import RunDir
from lmadapt.train.config import TrainConfig
from lmadapt.train.distributed import SINGLE, Distributed
from lmadapt.train.loop import Trainer, TrainResult

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


@dataclass
class Fitted:
    """What a fit leaves for the report: the trainer (its metric, bf16 use) and its result."""

    trainer: Trainer
    result: TrainResult
    wall_seconds: float


def fit(
    model: torch.nn.Module,
    task: Task,
    method: Method | None,
    train_features: Any,
    collator: Any,
    cfg: TrainConfig,
    lr: float,
    out: Path,
    dev_features: list[dict[str, Any]] | None = None,
    dev_examples: list[Any] | None = None,
    hooks: list[Hook] | None = None,
    dist: Distributed = SINGLE,
    resume: bool = False,
    resumable: bool = True,
    adapted: torch.nn.Module | None = None,
) -> Fitted:
    """Train `model` with the one loop: the method's own hooks (e.g. AdaLoRA's rank budget)
    first, then the caller's, and the method's learning-rate rules (e.g. LoRA+'s). `adapted` is
    the model the method adapted, when `model` wraps it (distill feeds the student through a
    wrapper that drops the teacher's columns)."""
    trainer = Trainer(
        model,
        task,
        train_features,
        collator,
        cfg,
        lr,
        out,
        dev_features=dev_features,
        dev_examples=dev_examples,
        dist=dist,
        resumable=resumable,
        lr_rules=method.lr_rules() if method is not None else None,
    )
    target = adapted if adapted is not None else model
    own = method.hooks(target, trainer.total_steps()) if method is not None else []
    trainer.hooks += own + (hooks or [])
    t0 = time.perf_counter()
    result = trainer.fit(resume=resume)
    return Fitted(trainer, result, time.perf_counter() - t0)


def save_artifact(out: Path, method: Method, model: torch.nn.Module, tokenizer: Any) -> None:
    """The loadable artifact (a PEFT adapter or a model directory) with its tokenizer, replaced
    whole so a reader never sees half of it."""
    with atomic_dir(RunDir(out).model) as tmp:
        method.save(model, tmp)
        tokenizer.save_pretrained(tmp)


def finish(
    out: Path,
    summary: dict[str, Any],
    sections: list[str],
    images: list[Path],
    evaluations: dict[str, Evaluation],
    metrics: dict[str, Any],
) -> None:
    """Write what a finished run holds, metrics.json last: its presence marks the run done."""
    write_json(RunDir(out).evaluations, {s: evaluation_record(e) for s, e in evaluations.items()})
    write_report(out, summary, sections, images)
    write_json(RunDir(out).metrics, metrics)
