"""The public Python API: train, evaluate, predict. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from lmadapt.config import RunConfig, build_run_config, check_dev_needs, load_config
from lmadapt.data import cache
from lmadapt.data.batching import largest_batch
from lmadapt.data.streams import Examples, Reread, limited, read_through
from lmadapt.data.validation import BadRow, BadRows, text_problem
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.evaluate.metrics import Evaluation
from lmadapt.evaluate.perturbations import select
from lmadapt.evaluate.report import (
    bad_rows_metrics,
    bad_rows_section,
    evaluation_section,
    training_curves,
)
from lmadapt.evaluate.robustness import RobustnessResult, check_perturbable
from lmadapt.evaluate.robustness import robustness as perturbed_evaluation
from lmadapt.inference import Encoded, autocast_bf16
from lmadapt.io import clean_orphans, write_json, write_yaml
from lmadapt.memory import check_fits
from lmadapt.methods import build_method
from lmadapt.methods.base import Method, count_parameters
from lmadapt.models import ModelSpec, check_weights, load_tokenizer, resolve_model
from lmadapt.pipeline import Fitted, finish, fit, save_artifact
from lmadapt.rundir import CONFIG, MODEL, RUN_INFO, RunDir, check_output_dir
from lmadapt.schema import config_source, read_yaml, to_dict
from lmadapt.session import (
    apply_method,
    check_quantize,
    peak_rss_mb,
    quantized_spec,
    resolve_device,
    run_directory,
    run_info,
    seed_everything,
    set_attention,
    set_threads,
    start,
)
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.base import check_model_suits, stream_split
from lmadapt.tasks.capabilities import (
    CalibratableTask,
    ExplainableTask,
    TunableTask,
    cannot_explain,
)
from lmadapt.train import distributed
from lmadapt.train.loop import (
    Hook,
    checkpoint_metric,
)

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


class Features(TypedDict):
    """Split -> features."""

    train: Sequence[dict[str, Any]]
    """A memory-mapped `lmadapt.data.cache.FeatureStore`."""
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]


@dataclass
class Prepared:
    """Validated, tokenized data and the task that read it."""

    task: Task
    tokenizer: Any
    spec: ModelSpec
    train: Examples
    """The training examples: a list, or (for a task that streams its file) a sized
    `lmadapt.data.streams.Reread` that reads the file again when iterated."""
    dev: list[Any]
    test: list[Any]
    features: Features
    """Split -> features; the train split's is a memory-mapped `lmadapt.data.cache.FeatureStore`."""
    bad_rows: dict[str, list[BadRow]]
    """Split -> the `lmadapt.data.validation.BadRow`s left out under data.bad_rows=skip (empty
    lists under error, which refuses any); one entry per split read."""

    def eval_splits(self, collator: Any, batch_size: int) -> dict[str, Encoded]:
        """Dev then test, each where it has examples, as the task scores them."""
        return {
            split: Encoded(self.features[split], getattr(self, split), collator, batch_size)
            for split in ("dev", "test")
            if self.features[split]
        }


def prepare(config: RunConfig, task_state: dict | None = None) -> Prepared:
    """Read and validate every data file, then tokenize. Nothing is written but the feature cache.

    Bad rows follow data.bad_rows: each file is refused with all of its bad rows listed, or
    they are left out and kept in `Prepared.bad_rows`. The training file's features are
    built once per input (file bytes, tokenizer, task and data settings) into the cache
    (`lmadapt.data.cache`) and memory-mapped from there; a second run on the same file reads
    neither the file nor the tokenizer's output again.
    """
    task = build_task(config.task, task_state)
    d = config.data
    if not d.train:
        raise ConfigError("data.train", "is required")
    train_file = d.train
    paths = {"train": d.train, "dev": d.dev, "test": d.test}
    bad = {s: BadRows(p, d.bad_rows, d.max_bad_fraction) for s, p in paths.items() if p}
    spec = resolve_model(config.model)
    tokenizer = load_tokenizer(spec, config.trust_remote_code)
    key = _train_key(config, train_file, task_state, spec, tokenizer)
    store = cache.load(key)
    if store is None:
        streamed = limited(task.stream(train_file, d.format, bad["train"]), d.max_train_samples)
        # Task.stream's contract: a list, or a Reread that counts its examples
        assert isinstance(streamed, Sized), f"{type(streamed).__name__} is not sized"
        train: Examples = streamed
        try:
            task.fit(train)  # the first pass over a streamed file: every row is checked
            read_through(train)  # in case fit did not need every row
        except Exception:  # what fit made of the rows left: the file's bad rows come first
            bad["train"].finish()
            raise
        bad["train"].finish()  # a refused file is never encoded
    else:  # what the build learned: the task's fitted state and the rows it skipped
        task = build_task(config.task, store.manifest["task_state"])
        bad["train"].rows = [BadRow(**r) for r in store.manifest["bad_rows"]]
        bad["train"].total = store.manifest["rows"]
        train = Reread(
            lambda into: limited(task.stream(train_file, d.format, into), d.max_train_samples),
            bad["train"],
            count=store.manifest["examples"],
        )
    # What fit learned (the label set) can show more bad rows in dev and test.
    read = {s: task.read(bad[s].file, d.format, bad=bad[s]) for s in ("dev", "test") if s in bad}
    dev = task.check(read["dev"], bad["dev"]) if d.dev else []
    test = task.check(read["test"], bad["test"]) if d.test else []
    for b in bad.values():
        b.finish()
    if d.max_eval_samples:
        dev, test = dev[: d.max_eval_samples], test[: d.max_eval_samples]
    check_model_suits(task, spec)
    if store is None:
        kept = {
            "task_state": task.state(),
            "bad_rows": [dataclasses.asdict(r) for r in bad["train"].rows],
            "rows": bad["train"].total,
        }
        store = cache.build(
            key,
            cache.encoded(train, lambda rows: task.encode(rows, tokenizer), num_proc=d.num_proc),
            lambda: {**kept, "examples": len(train)},
        )
    features: Features = {
        "train": store,
        "dev": task.encode(dev, tokenizer),
        "test": task.encode(test, tokenizer),
    }
    bad_rows = {s: b.rows for s, b in bad.items()}
    return Prepared(task, tokenizer, spec, train, dev, test, features, bad_rows)


def _train_key(
    config: RunConfig, train_file: str, task_state: dict | None, spec: ModelSpec, tokenizer: Any
) -> str:
    """The feature cache's key for the training file (`train_file`, the config's data.train):
    its bytes and everything that changes what its features are (task and data settings, model,
    tokenizer)."""
    d = config.data
    return cache.cache_key(
        cache.file_digest(_existing(train_file)),
        d.format,
        to_dict(config.task),  # the JSON that dataclasses.asdict gave: cached keys still match
        task_state,
        [d.bad_rows, d.max_bad_fraction, d.max_train_samples],
        [spec.name, spec.path, spec.kind],
        cache.tokenizer_digest(tokenizer),
    )


def _existing(path: str) -> str:
    """`path`, refused with the readers' own words when there is nothing to read."""
    if not Path(path).exists():
        raise DataError(path, "file not found")
    return path


def train(
    config: RunConfig | str | Path,
    overrides: list[str] | None = None,
    hooks: list[Hook] | None = None,
) -> dict[str, Any]:
    """Fine-tune per `config` and write a run directory; returns the run's metrics.json content.

    `hooks` join the training loop (e.g. hyperparameter search reporting each evaluation)."""
    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    check_dev_needs(config)
    out = check_output_dir(config.output_dir, config.overwrite, inputs=config.to_dict())
    return _run(config, out, resume=False, hooks=hooks or [])


def resume(run_dir: str | Path) -> dict[str, Any]:
    """Continue an interrupted run from its newest checkpoint, exactly where it stopped."""
    out = Path(run_dir)
    if not RunDir(out).config.is_file():
        raise LmadaptError(f"{out}: not an lmadapt run directory (no config.yaml)")
    if RunDir(out).metrics.is_file():
        raise LmadaptError(f"{out}: this run already finished (metrics.json exists)")
    return _run(saved_config(out), out, resume=True)


def saved_config(run_dir: Path) -> RunConfig:
    """A run directory's resolved config.yaml, its errors naming the file."""
    with config_source(RunDir(run_dir).config):
        return build_run_config(read_yaml(RunDir(run_dir).config))


def disk_needed(method: Method, model: torch.nn.Module, keep: int) -> int:
    """Bytes a run writes at most, all fp32: the artifact (every weight, or only the trained
    ones), best.safetensors, and keep + 1 resumable checkpoints (weights and both AdamW moments;
    a new one is written before the oldest goes)."""
    trainable, total = count_parameters(model)
    artifact = total if method.saves_whole_model else trainable
    return 4 * (artifact + trainable * (1 + 3 * (keep + 1)))


def _check_disk(out: Path, need: int) -> None:
    """Refuse to start, writing nothing, when the run clearly cannot fit on the disk."""
    where = out
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise ConfigError(
            "output_dir",
            f"{where} has {free / 2**20:.1f} MB free; this run needs about "
            f"{need / 2**20:.1f} MB for checkpoints and the model",
        )


def _run(
    config: RunConfig, out: Path, resume: bool, hooks: list[Hook] | None = None
) -> dict[str, Any]:
    """One run; under torchrun every process runs it and process 0 alone writes `out`."""
    dist = distributed.setup(config.train.distributed, resolve_device(config.device))
    start(config.train.threads or dist.cpu_threads, config.train.seed)
    data = prepare(config)
    task, spec = data.task, data.spec
    if config.report.robustness:
        check_perturbable(task)  # refused before training, not after it
    checkpoint_metric(config.train, task)  # a misspelt train.metric fails before any writing
    method = build_method(config.method)
    check_quantize(config.quantize, method)
    spec = base_spec(config, spec, task, dist.device)
    largest = largest_batch(
        data.features["train"], task.collator(data.tokenizer), config.train.batch_size
    )
    check_fits(config, spec, task, method, largest, dist.device, report=dist.is_main)
    seed_everything(config.train.seed)  # head init does not depend on how much data was read
    base = task.build_model(spec, config.trust_remote_code)
    set_attention(base, config.attention, spec.kind)
    model = apply_method(base, method, task, config.train)

    dist.barrier()  # every process has checked `out` before process 0 replaces it
    if dist.is_main:
        _check_disk(out, disk_needed(method, model, config.train.keep_checkpoints))
        if resume:  # what a crash mid-write left behind
            clean_orphans(out)
            clean_orphans(RunDir(out).checkpoints)
    with run_directory(out, "train", create=dist.is_main and not resume):
        if dist.is_main and not resume:
            write_yaml(RunDir(out).config, config.to_dict())
            write_json(RunDir(out).run_info, run_info(config.method.name, spec, task))
        return _train_and_report(config, out, resume, hooks, dist, data, method, model)


def _train_and_report(
    config: RunConfig,
    out: Path,
    resume: bool,
    hooks: list[Hook] | None,
    dist: distributed.Distributed,
    data: Prepared,
    method: Method,
    model: torch.nn.Module,
) -> dict[str, Any]:
    """Train, save the artifact, evaluate on dev/test, write the report and metrics.json."""
    task, spec = data.task, data.spec
    trainable, total = count_parameters(model)
    collate, bs = task.collator(data.tokenizer), config.train.eval_batch_size
    fitted = fit(
        model,
        task,
        method,
        data.features["train"],
        collate,
        config.train,
        config.train.lr or config.method.lr,
        out,
        dev_features=data.features["dev"],
        dev_examples=data.dev,
        hooks=hooks,
        dist=dist,
        resume=resume,
    )
    trainer, result = fitted.trainer, fitted.result
    if not dist.is_main:
        return dist.broadcast(None)  # process 0's metrics

    splits = data.eval_splits(collate, bs)
    if "dev" in splits and isinstance(task, TunableTask):  # e.g. QA's no-answer threshold
        task.tune(model, splits["dev"])
    save_artifact(out, method, model, data.tokenizer)
    evals: dict[str, Evaluation] = {
        split: task.evaluate_model(model, encoded) for split, encoded in splits.items()
    }
    # Fitted on dev (e.g. a temperature); run.json is rewritten so the run keeps it and what
    # `tune` settled.
    calibration = task.fit_calibration(evals) if isinstance(task, CalibratableTask) else {}
    write_json(RunDir(out).run_info, run_info(config.method.name, spec, task))
    trained = TrainedRun(config, out, data, fitted, dist, trainable, total, resume)
    metrics = {
        **trained.metrics(),
        **{split: ev.metrics for split, ev in evals.items()},
        **calibration,
    }
    plot_dir = RunDir(out).plots
    images = training_curves(result.state.history, trainer.metric, plot_dir)
    for split, ev in evals.items():
        images += task.plots(ev, plot_dir, f"{split}_")
    summary = trained.summary()
    weights = "best checkpoint" if data.dev else "last step"
    sections = [
        evaluation_section(f"{split.capitalize()} set ({weights})", ev, task)
        for split, ev in evals.items()
    ]
    skipped = bad_rows_section(data.bad_rows)
    if skipped:
        sections.append(skipped)
    if config.report.robustness:
        sections.append(_robustness_report(config, out, data, model))
    finish(out, summary, sections, images, evals, metrics)
    return dist.broadcast(metrics)


@dataclass
class TrainedRun:
    """What the report of a finished training run is written from."""

    config: RunConfig
    out: Path
    data: Prepared
    fitted: Fitted
    dist: distributed.Distributed
    trainable: int
    total: int
    resume: bool

    def metrics(self) -> dict[str, Any]:
        """metrics.json's account of the run itself (the splits' metrics are added beside it)."""
        config, data, fitted, resume = self.config, self.data, self.fitted, self.resume
        state, result = fitted.result.state, fitted.result
        return {
            "run_dir": str(self.out),
            "task": data.task.kind,
            "method": config.method.name,
            "model": data.spec.name,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "train_samples": len(data.train),
            "steps": state.step,
            "epochs": round(state.samples / max(1, len(data.train)), 3),
            "best_step": state.best_step,
            "stopped_early": result.stopped_early,
            "resumed": resume,
            "train_seconds": round(state.train_seconds, 2),
            "wall_seconds": round(fitted.wall_seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "bf16": fitted.trainer.bf16,
            "threads": torch.get_num_threads(),
            "processes": self.dist.world_size,
            **bad_rows_metrics(data.bad_rows),
        }

    def summary(self) -> dict[str, str]:
        """The head of report.md: what was trained, how fast, which weights were kept."""
        data, dist, trainable, total = self.data, self.dist, self.trainable, self.total
        state, result, trainer = self.fitted.result.state, self.fitted.result, self.fitted.trainer
        spec = data.spec
        return {
            "model": f"{spec.name} (`{spec.path}`)",
            "task": data.task.description,
            "method": self.config.method.name,
            "trainable parameters": f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
            "training": f"{state.step} steps, {len(data.train):,} examples, "
            f"{state.train_seconds:.1f}s, {result.samples_per_second:.1f} samples/s, "
            f"{result.tokens_per_second:.0f} tokens/s" + (" (resumed)" if self.resume else ""),
            "best checkpoint": f"step {state.best_step} by dev {trainer.metric}"
            + (" (stopped early)" if result.stopped_early else "")
            if data.dev
            else "no dev set: the last step's weights",
            "peak RSS": f"{peak_rss_mb():.0f} MB",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
            f"bf16 autocast {'on' if trainer.bf16 else 'off'}, torch {torch.__version__}"
            + (f", {dist.world_size} processes ({dist.strategy})" if dist.enabled else ""),
        }


def _robustness_report(config: RunConfig, out: Path, data: Prepared, model: torch.nn.Module) -> str:
    """report.robustness: the best model on perturbed copies of the test set (dev without one);
    writes robustness.json and returns the report.md section."""
    split = "test" if data.test else "dev"
    result = perturbed_evaluation(
        data.task,
        model,
        data.tokenizer,
        getattr(data, split),
        config.train.eval_batch_size,
        config.report.seed,
        config.report.perturbations,
    )
    write_json(out / "robustness.json", {"split": split, **result.to_dict()})
    weights = "best checkpoint" if data.dev else "last step"
    return result.markdown(f"Robustness ({split} set, {weights})")


# ---------------------------------------------------------------------- saved runs


@dataclass
class RunInfo:
    """A finished run's config, task (with its label set), base model, method and tokenizer."""

    run_dir: Path
    config: RunConfig
    task: Task
    spec: ModelSpec
    method: Any
    tokenizer: Any


@dataclass
class LoadedRun:
    config: RunConfig
    task: Task
    model: torch.nn.Module
    tokenizer: Any
    spec: ModelSpec

    def encoded(self, examples: list[Any]) -> Encoded:
        """`examples` as the run's task scores or predicts them, `train.eval_batch_size` at a
        time."""
        return Encoded(
            self.task.encode(examples, self.tokenizer),
            examples,
            self.task.collator(self.tokenizer),
            self.config.train.eval_batch_size,
        )


def base_spec(
    config: RunConfig, spec: ModelSpec, task: Task, device: torch.device, dequantize: bool = False
) -> ModelSpec:
    """The base model as `config`'s run trains on it: quantised on `device` when it asks to be
    (`quantize`), computing in bf16 where it autocasts to bf16 on a GPU."""
    bf16 = autocast_bf16(config.train.precision, device)
    return quantized_spec(
        spec, task, config.quantize, device, bf16, config.trust_remote_code, dequantize
    )


def read_run(run_dir: str | Path) -> RunInfo:
    """Everything about a run but its weights (serving groups runs by base before loading)."""
    run_dir = Path(run_dir)
    for name in (CONFIG, RUN_INFO, MODEL):
        if not (run_dir / name).exists():
            raise LmadaptError(f"{run_dir} is not a finished lmadapt run (no {name})")
    config = saved_config(run_dir)
    info = _run_json(RunDir(run_dir).run_info)
    try:
        spec = resolve_model(config.model)
    except LmadaptError:  # a model dir named by a path that has moved: use the recorded one
        m = info["model"]
        spec = ModelSpec(m["name"], m["path"], m["kind"], m.get("gguf_file"))
    try:
        task = build_task(config.task, info["task"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        path = str(RunDir(run_dir).run_info)
        raise DataError(path, f"unusable task state ({e!r})", field="task") from None
    check_model_suits(task, spec)
    check_weights(RunDir(run_dir).model, "saved model")
    tokenizer = load_tokenizer(ModelSpec(spec.name, str(RunDir(run_dir).model), spec.kind))
    return RunInfo(run_dir, config, task, spec, build_method(config.method), tokenizer)


def json_object(path: Path) -> dict[str, Any]:
    """A JSON file lmadapt wrote, holding an object; a hand-edited or truncated one is a
    DataError naming the file, not a traceback."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(str(path), f"not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise DataError(str(path), f"expected a JSON object, got {type(info).__name__}")
    return info


def _run_json(path: Path) -> dict[str, Any]:
    """run.json checked for the fields a saved run needs, its errors naming the file and field
    (a hand-edited or truncated file is one line, not a KeyError)."""
    info = json_object(path)
    if not isinstance(info.get("task"), dict):
        raise DataError(str(path), "missing or not an object", field="task")
    model = info.get("model")
    if not isinstance(model, dict):
        raise DataError(str(path), "missing or not an object", field="model")
    for key in ("name", "path", "kind"):
        if not isinstance(model.get(key), str):
            raise DataError(str(path), "missing or not text", field=f"model.{key}")
    return info


def load_run(run_dir: str | Path, device: str = "auto") -> LoadedRun:
    """Rebuild a trained model from its run directory (safetensors only, no pickle) on `device`.

    The device is resolved first, so a missing GPU is refused before anything loads; inference
    moves each batch to the model's device (inference.on_model_device)."""
    where = resolve_device(device)
    info = read_run(run_dir)
    set_threads(info.config.train.threads)
    base = base_spec(info.config, info.spec, info.task, where)
    artifact, trust = RunDir(info.run_dir).model, info.config.trust_remote_code
    model = info.method.load(info.task, base, artifact, trust)
    model.to(where).eval()
    return LoadedRun(info.config, info.task, model, info.tokenizer, info.spec)


def evaluate(
    run_dir: str | Path, data_path: str | Path, fmt: str = "auto", device: str = "auto"
) -> tuple[Evaluation, str]:
    """Score a saved run on a labelled file; returns the evaluation and its markdown section."""
    run = load_run(run_dir, device)
    examples = run.task.read(str(data_path), fmt)
    run.task.check(examples)
    ev = run.task.evaluate_model(run.model, run.encoded(examples))
    return ev, evaluation_section(f"Evaluation on `{data_path}`", ev, run.task)


def input_examples(
    task: Task, texts: list[str] | None, file: str | Path | None, fmt: str, command: str
) -> list[Any]:
    """Unlabelled examples from a file or raw texts, for `command`."""
    if file is not None:
        return task.read(str(file), fmt, labelled=False)
    if not texts:
        raise LmadaptError(f"{command} needs at least one text or --file")
    for i, text in enumerate(texts, start=1):
        problem = text_problem(text)
        if problem is not None:  # refused here as serve refuses it, not by the tokenizer
            raise DataError("<input>", problem, i)
    return task.examples_from_texts(list(texts))


PREDICT_CHUNK = 4096
"""Examples of a file read, encoded and predicted at a time: memory stays flat in its size."""


def predictions(
    run_dir: str | Path | LoadedRun,
    texts: list[str] | None = None,
    file: str | Path | None = None,
    fmt: str = "auto",
    device: str = "auto",
) -> Iterator[dict[str, Any]]:
    """Predictions (label + probabilities, or the task's equivalent) for raw texts or a file,
    each as soon as it is made; `device` applies when the run is loaded here.

    A file is read through once first, so a bad row anywhere refuses it before any prediction
    is out; then again, `PREDICT_CHUNK` examples at a time (where the task streams its files:
    only NER, QA and chat files are held in memory whole)."""
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    if file is None:
        examples = input_examples(run.task, texts, None, fmt, "predict")
        yield from run.task.predict_model(run.model, run.encoded(examples))
        return
    rows, _ = stream_split(run.task, str(file), fmt, "error", 0.0, labelled=False)
    for chunk in cache.chunked(rows, PREDICT_CHUNK):
        yield from run.task.predict_model(run.model, run.encoded(chunk))


def predict(
    run_dir: str | Path | LoadedRun,
    texts: list[str] | None = None,
    file: str | Path | None = None,
    fmt: str = "auto",
    device: str = "auto",
) -> list[dict[str, Any]]:
    """`predictions`, all of them."""
    return list(predictions(run_dir, texts, file, fmt, device))


def methods(model: str | None = "minilm") -> list[dict[str, Any]]:
    """Every adaptation method with its summary and, unless `model` is None, its trainable and
    total parameter counts on `model` with a 2-label classification head."""
    from lmadapt.methods import METHODS
    from lmadapt.schema import parse_section

    rows = []
    spec = resolve_model(model) if model else None
    task = build_task(
        parse_section(TASKS, "type", "classification", "task"), {"labels": ["0", "1"]}
    )
    for entry in METHODS:
        trainable = total = None
        if spec is not None:
            method = build_method(parse_section(METHODS, "name", entry.name, "method"))
            # a method that cannot adapt this model (bitfit without biases) has no counts
            with contextlib.suppress(ConfigError):
                trainable, total = count_parameters(method.apply(task.build_model(spec), task))
        rows.append(
            {"name": entry.name, "about": entry.summary, "trainable": trainable, "total": total}
        )
    return rows


def models() -> list[dict[str, Any]]:
    """The embedded default models: name, whether installed, kind, the tasks it suits."""
    from lmadapt.models import list_models

    return [
        {**row, "tasks": [e.name for e in TASKS if row.get("kind") in e.impl.model_kinds]}
        for row in list_models()
    ]


# ---------------------------------------------------------------------- robustness


def robustness(
    run_dir_or_loaded: str | Path | LoadedRun,
    data: str | Path,
    fmt: str = "auto",
    device: str = "auto",
    seed: int = 0,
    perturbations: list[str] | None = None,
) -> RobustnessResult:
    """A saved run scored on a labelled file and on seeded, label-preserving perturbations of
    it (lmadapt.evaluate.robustness); `perturbations` names some (default: every one)."""
    select(perturbations, seed)  # a misspelt name fails before the model loads
    run = (
        run_dir_or_loaded
        if isinstance(run_dir_or_loaded, LoadedRun)
        else load_run(run_dir_or_loaded, device)
    )
    examples = run.task.check(run.task.read(str(data), fmt))
    return perturbed_evaluation(
        run.task,
        run.model,
        run.tokenizer,
        examples,
        run.config.train.eval_batch_size,
        seed,
        perturbations,
    )


# ---------------------------------------------------------------------- explanations


def explain(
    run_dir: str | Path | LoadedRun,
    texts: list[str] | None = None,
    file: str | Path | None = None,
    fmt: str = "auto",
    method: str = "ig",
    label: str | None = None,
    steps: int = 32,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Per-word attributions of each text's prediction (the predicted label, or `label`; each
    predicted entity), one JSON-ready row per text: Integrated Gradients over `steps` points
    (`method='ig'`) or leave-one-word-out (`'occlusion'`). See lmadapt.evaluate.explain."""
    from lmadapt.evaluate.explain import METHODS
    from lmadapt.evaluate.explain import explain as attribute

    if method not in METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if steps < 1:
        raise ConfigError("steps", f"must be >= 1, got {steps}")
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    examples = input_examples(run.task, texts, file, fmt, "explain")
    bs = run.config.train.eval_batch_size
    if not isinstance(run.task, ExplainableTask):
        raise cannot_explain(run.task)
    items = run.task.explainables(run.model, run.tokenizer, examples, label, bs)
    pad = run.tokenizer.pad_token_id
    pad = run.tokenizer.eos_token_id if pad is None else pad
    return [attribute(run.model, item, method, steps, pad) for item in items]  # type: ignore[arg-type]


__all__ = [
    "LoadedRun",
    "evaluate",
    "explain",
    "load_run",
    "methods",
    "models",
    "predict",
    "prepare",
    "resume",
    "robustness",
    "train",
]
