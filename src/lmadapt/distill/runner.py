"""`lmadapt distill`: teacher distributions once, student trained in the one loop, then a report
comparing teacher and student (metric, parameters, inference sentences/s, speed-up).

The output directory is also a normal run directory of the student (`lmadapt eval/predict`).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch

from lmadapt.config import RunConfig, build_run_config, check_dev_needs, read_config
from lmadapt.data import cache
from lmadapt.data.cache import FeatureStore
from lmadapt.data.streams import Examples
from lmadapt.data.validation import BadRow
from lmadapt.distill.loss import DistillationTask
from lmadapt.distill.student import keep_first_layers
from lmadapt.distill.teachers import TEACHERS, Teacher, build_teacher
from lmadapt.errors import ConfigError
from lmadapt.evaluate.metrics import Evaluation
from lmadapt.evaluate.report import (
    evaluation_section,
    markdown_table,
    training_curves,
)
from lmadapt.inference import batched_logits, model_inputs
from lmadapt.io import write_json, write_yaml
from lmadapt.methods import build_method
from lmadapt.methods.base import count_parameters
from lmadapt.models import ModelSpec, load_tokenizer, resolve_model
from lmadapt.pipeline import Fitted, finish, fit, save_artifact
from lmadapt.rundir import RunDir, check_output_dir
from lmadapt.schema import from_dict, parse_section, resolve_data_paths, to_dict
from lmadapt.session import (
    apply_method,
    check_quantize,
    resolve_device,
    run_directory,
    run_info,
    seed_everything,
    set_attention,
    start,
)
from lmadapt.tasks import build_task
from lmadapt.tasks.base import Task, stream_split
from lmadapt.train.distributed import Distributed
from lmadapt.train.loop import Hook

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class _Options:
    teacher: Any
    alpha: float = 0.5
    """Weight of the gold-label cross-entropy; 1 - alpha goes to the teacher's soft targets."""
    temperature: float = 2.0
    student_layers: int | None = None
    """Keep only the student's first k transformer blocks."""
    use_gold_labels: bool = True
    """False: train on the teacher's distributions only (train labels are not read)."""
    unlabeled: str | None = None
    """Extra unlabelled file (same text column): teacher soft targets only."""

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if self.student_layers is not None and self.student_layers < 1:
            raise ConfigError("student_layers", f"must be >= 1, got {self.student_layers}")


@dataclass
class DistillConfig:
    student: RunConfig
    """The student's run: model, task, method, data, train, output_dir."""
    options: _Options


def build_distill_config(data: dict[str, Any]) -> DistillConfig:
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping, got {data!r}")
    data = dict(data)
    raw = {k: data.pop(k) for k in list(data) if k in _Options.__dataclass_fields__}
    if "teacher" not in raw:
        raise ConfigError("teacher", "is required: {type: run, run_dir: ...} or {type: prompt}")
    raw["teacher"] = parse_section(TEACHERS, "type", raw["teacher"], "teacher")
    options = from_dict(_Options, raw)
    return DistillConfig(build_run_config(data), options)


def load_distill_config(path: str | Path, overrides: list[str] | None = None) -> DistillConfig:
    config = read_config(path, overrides, build_distill_config)
    resolve_data_paths(path, config.student.data, ("train", "dev", "test"))
    resolve_data_paths(path, config.options, ("unlabeled",))
    return config


class InputsOnly(torch.nn.Module):
    """Feeds the model its inputs only: batches also carry cached teacher log-probabilities."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> Any:
        return self.model(**model_inputs(inputs))


def _comparison(
    metric: str,
    teacher_ev: Evaluation,
    student_ev: Evaluation,
    teacher: Teacher,
    student_params: int,
    teacher_rate: float,
    student_rate: float,
) -> str:
    """The report's teacher-vs-student table: dev metric, size and speed."""
    return markdown_table(
        ["", f"dev {metric}", "parameters", "sentences/s (dev, 2 decimals)"],
        [
            [
                "teacher",
                f"{teacher_ev.metrics[metric]:.4f}",
                f"{teacher.num_parameters:,}",
                f"{teacher_rate:.2f}",
            ],
            [
                "student",
                f"{student_ev.metrics[metric]:.4f}",
                f"{student_params:,}",
                f"{student_rate:.2f}",
            ],
        ],
    )


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run_distill(
    config: DistillConfig | str | Path,
    overrides: list[str] | None = None,
    hooks: list[Hook] | None = None,
) -> dict[str, Any]:
    """Distil the configured teacher into the student; returns the run's metrics.json content.

    `hooks` join the training loop (e.g. `lmadapt auto`'s deadline)."""
    if not isinstance(config, DistillConfig):
        config = load_distill_config(config, overrides)
    run, opt = config.student, config.options
    check_dev_needs(run)
    out = check_output_dir(run.output_dir, run.overwrite, inputs=to_dict(config))
    check_quantize(run.quantize, build_method(run.method))
    device = resolve_device(run.device)
    start(run.train.threads, run.train.seed)
    teacher: Teacher = build_teacher(opt.teacher)
    data = _read(run, opt, teacher)
    spec = resolve_model(run.model)
    tokenizer = load_tokenizer(spec, run.trust_remote_code)
    with _teacher_features(data, teacher, tokenizer) as feats:
        seed_everything(run.train.seed)
        model = data.task.build_model(spec, run.trust_remote_code)
        return _distil(config, out, data, teacher, tokenizer, feats, spec, model, hooks, device)


def _distil(
    config: DistillConfig,
    out: Path,
    data: DistillData,
    teacher: Teacher,
    tokenizer: Any,
    feats: FeatureStore,
    spec: ModelSpec,
    model: torch.nn.Module,
    hooks: list[Hook] | None,
    device: torch.device,
) -> dict[str, Any]:
    """Train the student on the teacher's features in the run directory, save it, report."""
    run, opt = config.student, config.options
    # no resume: a failure keeps only a finished run
    with run_directory(out, "distill", keep=lambda: RunDir(out).metrics.is_file()):
        if opt.student_layers:
            pretrained = cast("PreTrainedModel", model)  # the task's transformers model
            keep_first_layers(pretrained, opt.student_layers)
            base = out / "student_base"
            pretrained.save_pretrained(base, safe_serialization=True)
            tokenizer.save_pretrained(base)
            run.model = str(base)  # the run dir then reloads the truncated base (peft methods too)
            spec = resolve_model(run.model)
        method = build_method(run.method)
        set_attention(model, run.attention, spec.kind)
        model = apply_method(model, method, data.task, run.train)
        write_yaml(RunDir(out).config, run.to_dict())
        write_yaml(out / "distill.yaml", {"options": to_dict(opt), "student": run.to_dict()})
        write_json(RunDir(out).run_info, run_info(run.method.name, spec, data.task))
        fitted = fit(
            InputsOnly(model),
            DistillationTask(data.task, opt.alpha, opt.temperature),
            method,
            feats,
            data.task.collator(tokenizer),
            run.train,
            run.train.lr or run.method.lr,
            out,
            dev_features=data.task.encode(data.dev, tokenizer),
            dev_examples=data.dev,
            hooks=hooks,
            dist=Distributed(device=device),  # one process; back on the CPU when it returns
            resumable=False,
            adapted=model,
        )
        shutil.rmtree(RunDir(out).checkpoints, ignore_errors=True)
        save_artifact(out, method, model, tokenizer)
        return _teacher_vs_student(config, out, data, teacher, model, tokenizer, fitted)


class StudentTask(Task, Protocol):
    """What distillation asks of the student's task beyond `Task`: its metrics from logits, so
    that the teacher's distributions are scored the same way (a single-label classification
    task, a `LogitsTask`)."""

    def evaluate(self, logits: list[np.ndarray], examples: list[Any]) -> Evaluation:
        """The task's metrics from one logits array per example."""


@dataclass
class DistillData:
    """The student's task (with the teacher's label set) and its examples, read and checked."""

    task: StudentTask
    train: Examples
    """Read lazily where the task streams its files (`lmadapt.tasks.base.stream_split`), so
    is `extra`; both sized."""
    dev: list[Any]
    test: list[Any]
    extra: Examples
    """Unlabelled rows: the teacher's distributions are their only targets."""
    bad_rows: dict[str, int]


def _read(run: RunConfig, opt: _Options, teacher: Teacher) -> DistillData:
    """Every data file read under data.bad_rows before any model loads."""
    built = build_task(run.task, {"labels": teacher.labels})
    if not (built.label_distribution and built.shares_backbone):  # logits (B, C) from a head
        raise ConfigError("task", "distillation supports single-label classification students")
    task = cast(StudentTask, built)  # single-label classification: a LogitsTask
    d = run.data
    if not d.train or not d.dev:
        raise ConfigError("data.dev" if d.train else "data.train", "is required")
    # the training and unlabelled files may not fit in memory: read as the teacher scores them
    # (labelled, limit) per split; dev and test are held as lists
    how = {
        "train": (opt.use_gold_labels, d.max_train_samples),
        "dev": (True, d.max_eval_samples),
        "test": (True, d.max_eval_samples),
        "unlabeled": (False, None),
    }
    splits = {"train": d.train, "dev": d.dev, "test": d.test, "unlabeled": opt.unlabeled}
    read: dict[str, Any] = {}
    bad_rows = {}
    bad: list[BadRow]
    for split, path in splits.items():
        if not path:
            read[split], bad = [], []
        else:
            labelled, limit = how[split]
            read[split], bad = stream_split(
                task, path, d.format, d.bad_rows, d.max_bad_fraction, labelled, limit
            )
        bad_rows[split] = len(bad)
    dev, test = list(read["dev"]), list(read["test"])
    return DistillData(task, read["train"], dev, test, read["unlabeled"], bad_rows)


def _teacher_features(
    data: DistillData, teacher: Teacher, tokenizer: Any
) -> contextlib.AbstractContextManager[FeatureStore]:
    """The training rows (then the unlabelled ones) encoded with the teacher's log-probabilities
    beside them, in a feature store of the run's own: the teacher is asked once, whatever the
    number of epochs, a chunk of rows at a time, and no row is held in memory for training."""

    def encode(rows: list[Any]) -> list[dict[str, Any]]:
        probs = teacher.label_distribution(rows)
        if probs.shape != (len(rows), len(teacher.labels)):
            raise RuntimeError(f"teacher returned shape {probs.shape} for {len(rows)} examples")
        feats = data.task.encode(rows, tokenizer)
        # softmax(log p / T) = p_T
        log_probs = np.log(np.clip(probs, 1e-12, 1.0)).astype(np.float32)
        for f, lp in zip(feats, log_probs):
            f.setdefault("labels", -100)
            f["teacher_logits"] = lp.tolist()
        return feats

    rows = itertools.chain(data.train, data.extra)
    chunk = max(1, len(data.train) + len(data.extra)) if teacher.whole_set else TEACHER_CHUNK
    return cache.scratch(cache.encoded(rows, encode, chunk=chunk))


TEACHER_CHUNK = 4096
"""Rows the teacher scores (and the student's tokenizer encodes) at a time."""


def _teacher_vs_student(
    config: DistillConfig,
    out: Path,
    data: DistillData,
    teacher: Teacher,
    model: torch.nn.Module,
    tokenizer: Any,
    fitted: Fitted,
) -> dict[str, Any]:
    """Teacher and student on dev (metric and inference speed, tokenisation included), the
    student on test, and the finished run directory; returns metrics.json's content."""
    run, opt, task, dev = config.student, config.options, data.task, data.dev
    collate = task.collator(tokenizer)

    def student_logits(examples: list[Any]) -> list[np.ndarray]:
        fs = task.encode(examples, tokenizer)
        return batched_logits(model, fs, collate, run.train.eval_batch_size)[0]

    s_logits, s_sec = _timed(student_logits, dev)
    t_probs, t_sec = _timed(teacher.label_distribution, dev)
    evals = {"dev": task.evaluate(s_logits, dev)}
    t_ev = task.evaluate(list(np.log(np.clip(t_probs, 1e-12, 1.0))), dev)
    if data.test:
        evals["test"] = task.evaluate(student_logits(data.test), data.test)
    metric = task.default_metric
    s_rate, t_rate = len(dev) / s_sec, len(dev) / t_sec
    trainable, total = count_parameters(model)
    state = fitted.result.state
    metrics = {
        "run_dir": str(out),
        "teacher": teacher.name,
        "alpha": opt.alpha,
        "temperature": opt.temperature,
        "student_layers": opt.student_layers,
        "use_gold_labels": opt.use_gold_labels,
        "train_samples": len(data.train),
        "unlabeled_samples": len(data.extra),
        "bad_rows_skipped": data.bad_rows,
        "steps": state.step,
        "train_seconds": round(state.train_seconds, 2),
        "metric": metric,
        "teacher_dev": t_ev.metrics,
        **{split: ev.metrics for split, ev in evals.items()},
        "teacher_params": teacher.num_parameters,
        "student_params": total,
        "student_trainable_params": trainable,
        "teacher_sentences_per_second": round(t_rate, 1),
        "student_sentences_per_second": round(s_rate, 1),
        "speedup": round(s_rate / t_rate, 2),
    }
    comparison = _comparison(metric, t_ev, evals["dev"], teacher, total, t_rate, s_rate)
    summary = {
        "teacher": teacher.name,
        "student": f"{run.model} ({opt.student_layers or 'all'} layers), method "
        f"{run.method.name}, {trainable:,} of {total:,} parameters trained",
        "loss": (
            f"{opt.alpha}·CE + {1 - opt.alpha:g}·T²·KL"
            if opt.use_gold_labels
            else "T²·KL only (no gold labels)"
        )
        + f", T = {opt.temperature} (Hinton et al. 2015)",
        "training": f"{state.step} steps, {len(data.train) + len(data.extra):,} rows "
        f"({len(data.extra):,} unlabelled), {state.train_seconds:.1f}s",
        "speed-up": f"{s_rate / t_rate:.2f}x sentences/s over the teacher",
    }
    images = training_curves(state.history, fitted.trainer.metric, RunDir(out).plots)
    sections = ["## Teacher vs student\n\n" + comparison]
    sections += [evaluation_section(f"Student on {s}", ev, task) for s, ev in evals.items()]
    finish(out, summary, sections, images, evals, metrics)
    return metrics
