"""Train a stream of tasks with one strategy and measure what is remembered.

After each step i every task j seen so far is scored on its dev set: R[i][j] (the task's default
metric: accuracy for classification, entity F1 for NER). From R: average accuracy, backward
transfer and forgetting (see `metrics.py`). Writes `continual.json`, `report.md` and a heatmap.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from lmadapt.continual.config import ContinualConfig, StreamEntry, load_continual_config
from lmadapt.continual.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
)
from lmadapt.continual.model import MultiTaskModel
from lmadapt.continual.strategies import Strategy, build_strategy
from lmadapt.data import cache
from lmadapt.errors import ConfigError
from lmadapt.evaluate import plots
from lmadapt.evaluate.metrics import Evaluation
from lmadapt.evaluate.report import markdown_table
from lmadapt.inference import Encoded
from lmadapt.io import write_json, write_text, write_yaml
from lmadapt.models import ModelSpec, load_model, load_tokenizer, resolve_model
from lmadapt.pipeline import fit
from lmadapt.rundir import RunDir, check_output_dir
from lmadapt.schema import to_dict
from lmadapt.session import peak_rss_mb, run_directory, seed_everything, start
from lmadapt.tasks import build_task
from lmadapt.tasks.base import Task, check_model_suits, stream_split
from lmadapt.train.loop import TrainResult


class HeadTask(Task, Protocol):
    """What the learner asks of a task beyond `Task`: a head over the shared backbone whose
    outputs it can read (a `LogitsTask`; the config admits only tasks that `shares_backbone`)."""

    per_token: bool
    """Whether its logits are per token, (T, C), rather than per sequence, (C,)."""

    def batch_outputs(
        self, model: torch.nn.Module, data: Encoded
    ) -> tuple[list[np.ndarray], float | None]:
        """Its outputs of every feature, in input order, and the mean loss where labelled."""


@dataclass
class TaskSlot:
    """One task of the stream: its task object, head, evaluation data and current training data."""

    name: str
    task: HeadTask
    collator: Any
    dev: list[Any]
    dev_features: list[dict[str, Any]]
    test: list[Any] = field(default_factory=list)
    test_features: list[dict[str, Any]] = field(default_factory=list)
    train: list[Any] = field(default_factory=list)
    train_features: Sequence[dict[str, Any]] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.task.default_metric

    def encoded(self, split: str, batch_size: int) -> Encoded:
        """Its dev or test split as its task scores it."""
        return Encoded(
            getattr(self, f"{split}_features"), getattr(self, split), self.collator, batch_size
        )


def _read(
    entry: StreamEntry, task: Task, path: str, bad_rows: dict[str, int], check: bool = True
) -> list[Any]:
    d = entry.data
    examples, bad = stream_split(task, path, d.format, d.bad_rows, d.max_bad_fraction, check=check)
    bad_rows[f"{entry.name}: {path}"] = len(bad)
    return list(examples)


@dataclass
class EntryData:
    """One stream entry's examples, read and checked; dev and test only at a task's first entry
    (a revisited task keeps its own)."""

    task: HeadTask
    train: list[Any]
    dev: list[Any] = field(default_factory=list)
    test: list[Any] = field(default_factory=list)


def read_stream(
    stream: Sequence[StreamEntry], spec: ModelSpec
) -> tuple[list[EntryData], dict[str, int]]:
    """Every entry's files read and checked (under each entry's data.bad_rows) before the first
    step trains, so a bad file late in the stream never throws earlier training away. Returns
    the entries' data and, per "task: file", the rows left out."""
    tasks: dict[str, HeadTask] = {}
    bad_rows: dict[str, int] = {}
    out = []
    for i, entry in enumerate(stream):
        d = entry.data
        if not d.train:
            raise ConfigError(f"stream[{i}].data.train", "is required")
        if entry.name in tasks:
            train = _read(entry, tasks[entry.name], d.train, bad_rows)
            out.append(EntryData(tasks[entry.name], train[: d.max_train_samples]))
            continue
        if not d.dev:
            raise ConfigError(f"stream[{i}].data.dev", "is required")
        # the config admits only tasks with a head over a shared backbone: LogitsTasks
        task = tasks[entry.name] = cast(HeadTask, build_task(entry.task))
        train = _read(entry, task, d.train, bad_rows, check=False)[: d.max_train_samples]
        task.fit(train)
        dev = _read(entry, task, d.dev, bad_rows)[: d.max_eval_samples]
        test = _read(entry, task, d.test, bad_rows)[: d.max_eval_samples] if d.test else []
        check_model_suits(task, spec, f"stream[{i}].task.type")
        out.append(EntryData(task, train, dev, test))
    return out, bad_rows


class Learner:
    """The shared multi-head model, the tasks seen so far, and which one is active."""

    def __init__(
        self,
        model: MultiTaskModel,
        tokenizer: Any,
        spec: ModelSpec,
        strategy: Strategy,
        seed: int,
        eval_batch_size: int,
        trust_remote_code: bool = False,
    ):
        self.model, self.tokenizer, self.spec, self.strategy = model, tokenizer, spec, strategy
        self.seed, self.eval_batch_size = seed, eval_batch_size
        self.trust_remote_code = trust_remote_code
        self.slots: dict[str, TaskSlot] = {}
        self.seen: list[str] = []
        """Task names in order of first appearance (the columns of R)."""

    def activate(self, name: str) -> None:
        self.model.active = name
        self.strategy.on_activate(self, name)

    def load(self, entry: StreamEntry, data: EntryData) -> TaskSlot:
        """Encode an entry's data (read and checked by `read_stream`); a new task also gets
        its head."""
        d = entry.data
        if entry.name in self.slots:
            slot = self.slots[entry.name]
        else:
            task = data.task
            seed_everything(self.seed)  # head init independent of the stream so far
            self.model.add_task(entry.name, task.build_model(self.spec, self.trust_remote_code))
            slot = TaskSlot(
                entry.name,
                task,
                task.collator(self.tokenizer),
                data.dev,
                task.encode(data.dev, self.tokenizer),
                data.test,
                task.encode(data.test, self.tokenizer),
            )
            self.slots[entry.name] = slot
            self.seen.append(entry.name)
        slot.train = data.train
        assert d.train is not None  # read_stream refused an entry without one
        # encoded once per file, task state and tokenizer (lmadapt.data.cache); memory-mapped
        parts = [
            cache.file_digest(d.train),
            d.format,
            to_dict(entry.task),
            slot.task.state(),
            d.max_train_samples,
            [self.spec.name, self.spec.path, self.spec.kind],
            cache.tokenizer_digest(self.tokenizer),
        ]
        slot.train_features = cache.features_once(
            parts, slot.train, lambda rows: slot.task.encode(rows, self.tokenizer), d.num_proc
        )
        return slot

    def evaluate(self, name: str, split: str = "dev") -> Evaluation:
        """The task's metrics through its own head (and adapter), as `lmadapt eval` has them."""
        slot = self.slots[name]
        self.activate(name)
        return slot.task.evaluate_model(self.model, slot.encoded(split, self.eval_batch_size))

    def outputs(self, name: str) -> list[np.ndarray]:
        """Task `name`'s dev outputs through its own head, to check that they stay put."""
        slot = self.slots[name]
        self.activate(name)
        return slot.task.batch_outputs(self.model, slot.encoded("dev", self.eval_batch_size))[0]


def _config_dict(config: ContinualConfig) -> dict[str, Any]:
    """The config as YAML that `lmadapt continual` reads back (repeated entries without task)."""
    stream = []
    for e in config.stream:
        row: dict[str, Any] = {"name": e.name}
        if e.first:
            row["task"] = to_dict(e.task)
        row["data"] = to_dict(e.data)
        row["train"] = to_dict(e.train)
        stream.append(row)
    return {
        "model": config.model,
        "strategy": to_dict(config.strategy),
        "output_dir": config.output_dir,
        "trust_remote_code": config.trust_remote_code,
        "device": config.device,
        "stream": stream,
    }


def run_continual(
    config: ContinualConfig | str | Path, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Train the stream with the configured strategy; returns `continual.json`'s content."""
    if not isinstance(config, ContinualConfig):
        config = load_continual_config(config, overrides)
    out = check_output_dir(config.output_dir, config.overwrite, inputs=to_dict(config))
    spec = resolve_model(config.model)
    stream_data, bad_rows = read_stream(config.stream, spec)  # every file, before any writing
    # no resume: a failure keeps only a finished run
    with run_directory(out, "continual", keep=lambda: RunDir(out).continual.is_file()):
        write_yaml(RunDir(out).config, _config_dict(config))
        learner = _learner(config, spec)
        t_start = time.perf_counter()
        rows, steps, trained_at = _train_stream(learner, config, stream_data, out)
        names = learner.seen
        R = np.array([[row.get(n, np.nan) for n in names] for row in rows], dtype=float)
        summary = _summary(learner, config, R, steps, trained_at, bad_rows, t_start, out)
        _heatmap(learner, config.strategy.name, R, steps, out)
        _write_report(out, summary)
        write_json(RunDir(out).continual, summary)
        return summary


def _learner(config: ContinualConfig, spec: ModelSpec) -> Learner:
    """Threads and seed set, then the backbone, its tokenizer and the strategy: no task yet."""
    from transformers import AutoModel

    first = config.stream[0].train
    start(first.threads, config.seed)
    tokenizer = load_tokenizer(spec, config.trust_remote_code)
    backbone = load_model(spec, AutoModel, config.trust_remote_code)
    strategy = build_strategy(config.strategy)
    return Learner(
        MultiTaskModel(backbone),
        tokenizer,
        spec,
        strategy,
        config.seed,
        first.eval_batch_size,
        config.trust_remote_code,
    )


def _train_stream(
    learner: Learner, config: ContinualConfig, stream_data: list[EntryData], out: Path
) -> tuple[list[dict[str, float]], list[dict[str, Any]], dict[str, int]]:
    """Every step of the stream: train its task, then score every task seen so far. Returns
    the rows of R (task -> dev metric), each step's record, and the last step training each
    task."""
    rows: list[dict[str, float]] = []
    steps: list[dict[str, Any]] = []
    trained_at: dict[str, int] = {}
    frozen: dict[str, list[np.ndarray]] = {}
    for i, entry in enumerate(config.stream):
        slot, result, seconds = _train_step(learner, config, i, entry, stream_data[i], out)
        trained_at[entry.name] = i
        row = _evaluate_seen(learner, entry.name, frozen, config.strategy.name)
        rows.append(row)
        steps.append(
            {
                "step": i,
                "task": entry.name,
                "train_file": entry.data.train,
                "train_samples": len(slot.train),
                "optimizer_steps": result.state.step,
                "best_step": result.state.best_step,
                "seconds": round(seconds, 2),
                "dev": row,
            }
        )
    return rows, steps, trained_at


def _train_step(
    learner: Learner,
    config: ContinualConfig,
    i: int,
    entry: StreamEntry,
    data: EntryData,
    out: Path,
) -> tuple[TaskSlot, TrainResult, float]:
    """Step i: train its task with the strategy's hooks in steps/<i>-<task>; returns the task's
    slot, the trainer's result and the seconds it took (the strategy's after_task included)."""
    strategy = learner.strategy
    slot = learner.load(entry, data)
    learner.activate(entry.name)
    strategy.before_task(learner, slot)
    run_dir = out / "steps" / f"{i:02d}-{entry.name}"
    run_dir.mkdir(parents=True)
    seed_everything(entry.train.seed + i)
    t0 = time.perf_counter()
    result = fit(
        learner.model,
        slot.task,
        None,  # the strategy adapts the model: its hooks are the method's
        slot.train_features,
        slot.collator,
        entry.train,
        entry.train.lr or config.strategy.lr,
        run_dir,
        dev_features=slot.dev_features,
        dev_examples=slot.dev,
        hooks=[strategy],
        resumable=False,
    ).result
    shutil.rmtree(RunDir(run_dir).checkpoints, ignore_errors=True)  # the best is loaded already
    strategy.after_task(learner, slot)
    return slot, result, time.perf_counter() - t0


def _evaluate_seen(
    learner: Learner, trained: str, frozen: dict[str, list[np.ndarray]], strategy: str
) -> dict[str, float]:
    """One row of R: every task seen so far on its dev metric, after training `trained`. A
    strategy with `frozen_past` must leave earlier tasks' outputs as they were (`frozen` keeps
    each task's outputs from the step that trained it)."""
    row = {}
    for name in learner.seen:
        row[name] = learner.evaluate(name).metrics[learner.slots[name].metric]
        if not learner.strategy.frozen_past:
            continue
        outputs = learner.outputs(name)
        if name != trained and name in frozen:
            same = all(np.array_equal(a, b) for a, b in zip(frozen[name], outputs))
            if not same:
                raise RuntimeError(
                    f"strategy {strategy}: predictions of earlier task "
                    f"'{name}' changed while training '{trained}'"
                )
        if name == trained:
            frozen[name] = outputs
    return row


def _summary(
    learner: Learner,
    config: ContinualConfig,
    R: np.ndarray,
    steps: list[dict[str, Any]],
    trained_at: dict[str, int],
    bad_rows: dict[str, int],
    t_start: float,
    out: Path,
) -> dict[str, Any]:
    """`continual.json`'s content: R and the measures from it, the steps, and each task on its
    test file (scored here, with the final model)."""
    names = learner.seen
    at = [trained_at[n] for n in names]
    forget = forgetting(R, at)
    test = {n: learner.evaluate(n, "test").metrics for n in names if learner.slots[n].test}
    return {
        "strategy": config.strategy.name,
        "strategy_config": to_dict(config.strategy),
        "model": learner.spec.name,
        "tasks": names,
        "metrics": {n: learner.slots[n].metric for n in names},
        "matrix": [[None if np.isnan(v) else round(float(v), 6) for v in r] for r in R],
        "average_accuracy": round(average_accuracy(R), 6),
        "bwt": round(backward_transfer(R, at), 6),
        "forgetting": {n: None if f is None else round(f, 6) for n, f in zip(names, forget)},
        "average_forgetting": round(average_forgetting(R, at), 6),
        "steps": steps,
        "test": test,
        "bad_rows_skipped": bad_rows,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "output_dir": str(out),
    }


def _heatmap(
    learner: Learner, strategy: str, R: np.ndarray, steps: list[dict[str, Any]], out: Path
) -> None:
    """plots/accuracy_matrix.png: R, one row per step, one column per task."""
    plots.heatmap(
        R,
        [f"{s['step']}: {s['task']}" for s in steps],
        [f"{n} ({learner.slots[n].metric})" for n in learner.seen],
        RunDir(out).plots / "accuracy_matrix.png",
        title=f"R[i][j], strategy {strategy}",
        xlabel="evaluated task j",
        ylabel="after training step i",
    )


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _write_report(out: Path, s: dict[str, Any]) -> None:
    names = s["tasks"]
    matrix = markdown_table(
        ["after step \\ task", *[f"{n} ({s['metrics'][n]})" for n in names]],
        [
            [f"{st['step']}: {st['task']}", *[_fmt(v) for v in r]]
            for st, r in zip(s["steps"], s["matrix"])
        ],
    )
    summary = markdown_table(
        ["measure", "value"],
        [
            ["average accuracy (ACC)", _fmt(s["average_accuracy"])],
            ["backward transfer (BWT)", _fmt(s["bwt"])],
            ["average forgetting", _fmt(s["average_forgetting"])],
            *[[f"forgetting: {n}", _fmt(f)] for n, f in s["forgetting"].items()],
        ],
    )
    timing = markdown_table(
        ["step", "task", "train rows", "optimizer steps", "seconds"],
        [
            [st["step"], st["task"], st["train_samples"], st["optimizer_steps"], st["seconds"]]
            for st in s["steps"]
        ],
    )
    lines = [
        f"# Continual learning: strategy `{s['strategy']}`",
        "",
        f"- **model**: {s['model']}, one head per task (task-incremental)",
        f"- **strategy**: {s['strategy_config']}",
        f"- **wall time**: {s['wall_seconds']:.1f}s, peak RSS {s['peak_rss_mb']:.0f} MB",
        *[
            f"- **bad rows left out** (data.bad_rows=skip): {n} in {where}"
            for where, n in s["bad_rows_skipped"].items()
            if n
        ],
        "",
        "## Accuracy matrix R[i][j] (dev metric of task j after training step i)",
        "",
        matrix,
        "",
        "## Summary",
        "",
        "ACC = mean of the last row; BWT = mean over earlier tasks of R[last][j] - R[t_j][j] "
        "(Lopez-Paz & Ranzato 2017); forgetting = max earlier R[l][j] - R[last][j] "
        "(Chaudhry et al. 2018).",
        "",
        summary,
        "",
        "## Steps",
        "",
        timing,
        "",
        "![accuracy matrix](plots/accuracy_matrix.png)",
        "",
        "## Reproduce",
        "",
        "```",
        f"lmadapt continual {out / 'config.yaml'} overwrite=true",
        "```",
        "",
    ]
    write_text(RunDir(out).report, "\n".join(lines))


def run_continual_many(
    config: str | Path, strategies: list[str], overrides: list[str] | None = None
) -> dict[str, Any]:
    """One run per strategy on the same stream and seed, under `output_dir/<strategy>`, plus a
    side-by-side `summary.md` / `summary.json` in `output_dir`."""
    base = Path(load_continual_config(config, overrides).output_dir)
    results = {}
    for name in strategies:
        over = [*(overrides or []), f"strategy={name}", f"output_dir={base / name}"]
        results[name] = run_continual(config, over)
    rows = [
        [
            name,
            _fmt(r["average_accuracy"]),
            _fmt(r["bwt"]),
            _fmt(r["average_forgetting"]),
            *[_fmt(v) for v in r["matrix"][-1]],
            f"{r['wall_seconds']:.0f}",
        ]
        for name, r in results.items()
    ]
    tasks = next(iter(results.values()))["tasks"] if results else []
    table = markdown_table(
        ["strategy", "ACC", "BWT", "forgetting", *[f"final {t}" for t in tasks], "seconds"], rows
    )
    write_text(base / "summary.md", f"# Continual learning: strategies side by side\n\n{table}\n")
    summary = {
        "output_dir": str(base),
        "runs": {
            n: {k: r[k] for k in ("average_accuracy", "bwt", "average_forgetting", "matrix")}
            for n, r in results.items()
        },
    }
    write_json(base / "summary.json", summary)
    return summary
