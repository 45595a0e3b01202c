"""Typed run configuration: dataclasses loaded from YAML, with dotted `key=value` overrides.

Every field is checked on load; an error names the field path (`train.lr`) and the bad value.
The `task` and `method` sections are polymorphic: their `type` / `name` key picks a config
class from the task or method registry, so a new method brings its own typed fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from lmadapt.errors import ConfigError
from lmadapt.evaluate.perturbations import PERTURBATIONS
from lmadapt.methods import METHODS
from lmadapt.methods.configs import MethodConfig
from lmadapt.schema import (
    apply_overrides,
    check_device_name,
    config_source,
    from_dict,
    parse_section,
    read_yaml,
    resolve_data_paths,
    to_dict,
)
from lmadapt.tasks import TASKS
from lmadapt.train.config import EarlyStoppingConfig, TrainConfig

__all__ = [
    "DataConfig",
    "EarlyStoppingConfig",
    "ReportConfig",
    "RunConfig",
    "TrainConfig",
    "build_run_config",
    "check_dev_needs",
    "load_config",
    "read_config",
]

C = TypeVar("C")


@dataclass
class DataConfig:
    """Where the examples are. Format is taken from the file extension unless given."""

    train: str | None = None
    """Training file (csv, tsv or jsonl)."""
    dev: str | None = None
    """Dev file: evaluated during training; drives early stopping and the best checkpoint."""
    test: str | None = None
    """Optional test file, evaluated once with the best model at the end."""
    format: Literal["auto", "csv", "tsv", "jsonl", "conll", "parquet", "dataset"] = "auto"
    """auto: from the extension (.csv, .tsv, .jsonl, .json, .conll, .parquet), or a directory
    written by datasets' save_to_disk ("dataset")."""
    max_train_samples: int | None = None
    """Keep only the first N training rows (after validation)."""
    max_eval_samples: int | None = None
    bad_rows: Literal["error", "skip"] = "error"
    """Rows with a problem of their own (empty text, bad label, malformed JSON line, bad tags in
    a CoNLL sentence): error refuses the run and lists them all; skip drops them and records
    them. Problems of a whole file (missing, not UTF-8, header without a needed column) are
    always errors."""
    max_bad_fraction: float = 0.1
    """With bad_rows=skip, a file with more than this fraction of bad rows is refused anyway."""
    num_proc: int = 1
    """Processes that tokenize the training file when its feature cache is built (once per
    file, tokenizer and settings; later runs memory-map it). A fast tokenizer already uses
    several threads on its own, so more processes pay mainly for slow tokenizers."""

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"data.{name}", f"must be > 0, got {v}")
        if self.num_proc < 1:
            raise ConfigError("data.num_proc", f"must be >= 1, got {self.num_proc}")
        if not 0 <= self.max_bad_fraction < 1:
            raise ConfigError(
                "data.max_bad_fraction", f"must be in [0, 1), got {self.max_bad_fraction}"
            )


@dataclass
class ReportConfig:
    """What report.md adds at the end of a run, beyond the dev and test evaluations."""

    robustness: bool = False
    """Re-evaluate the best model on seeded, label-preserving perturbations of the test set (dev
    when there is none): metric, delta and flip rate per perturbation, and the most fragile
    examples, in report.md and robustness.json (see `lmadapt robustness`)."""
    perturbations: list[str] | None = None
    """Which perturbations, by name; None = every one (lmadapt.evaluate.robustness)."""
    seed: int = 0
    """Seed of the perturbations (the same seed perturbs the same examples the same way)."""

    def __post_init__(self) -> None:
        unknown = [n for n in self.perturbations or [] if n not in PERTURBATIONS]
        if unknown:
            raise ConfigError(
                "report.perturbations",
                f"unknown perturbation {unknown[0]!r}; known: {', '.join(PERTURBATIONS)}",
            )
        if self.perturbations is not None and not self.perturbations:
            raise ConfigError("report.perturbations", "is empty; leave it out for every one")
        if self.seed < 0:
            raise ConfigError("report.seed", f"must be >= 0, got {self.seed}")


class TaskSection(Protocol):
    """A task's own config dataclass (ClassificationConfig, GenerationConfig, ...), picked from
    the task registry by `type` and built by `parse_section` before the run config is."""

    type: str


@dataclass
class RunConfig:
    """One training run: model + task + method + data + schedule -> a run directory."""

    task: TaskSection
    """Task section; `type` picks the task (classification, ...)."""
    method: MethodConfig
    """Method section; `name` picks the adaptation method (full, bitfit, lora, ...)."""
    data: DataConfig
    model: str = "minilm"
    """Embedded short name (see `lmadapt models`), a local model directory, or a hub id."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Load the frozen base in 4-bit NF4 or 8-bit (QLoRA) for methods that add weights beside
    it (lora, adalora, ia3). Needs bitsandbytes on a CUDA GPU; refused, before anything loads,
    where that cannot run."""
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/run"
    overwrite: bool = False
    """Replace an existing output_dir; otherwise an existing one is an error."""
    trust_remote_code: bool = False
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    """Attention kernel. auto = eager for encoders (on CPU, SDPA's flash kernel has a slow
    backward for short inputs), the model's default (SDPA) for causal LMs."""
    device: str = "auto"
    """Where a single-process run trains: auto | cpu | cuda | cuda:N | mps. auto = the first CUDA
    GPU when torch sees one, else the CPU. Whether the device exists is checked when the run
    starts (session.resolve_device), since that is a property of the machine, not of the file.
    Under a launcher (torchrun) each process keeps the device the launcher gives it."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """What report.md adds at the end of the run (robustness to perturbed inputs)."""

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.quantize != "none" and self.train.base_dtype in ("bf16", "int8"):
            raise ConfigError(
                "train.base_dtype",
                f"a {self.quantize} base is already stored quantised; leave train.base_dtype "
                "at auto with quantize",
            )
        if self.report.robustness and not (self.data.dev or self.data.test):
            raise ConfigError("report.robustness", "needs data.test or data.dev to perturb")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def check_dev_needs(config: RunConfig) -> None:
    """Refuse, before a new run starts, what only a dev set can serve when there is none: early
    stopping watches a dev metric, and task.calibrate applies a temperature fitted on dev.

    Not checked in `RunConfig.__post_init__`, which also reads finished runs' config.yaml:
    runs made before this check still load for predict and serve."""
    if config.data.dev:
        return
    if config.train.early_stopping.patience is not None:
        raise ConfigError(
            "train.early_stopping.patience",
            "needs data.dev: early stopping watches a dev metric and this run has no dev set; "
            "add data.dev or leave train.early_stopping.patience out",
        )
    # Only the tasks that calibrate a label distribution have the field.
    if getattr(config.task, "calibrate", False):
        raise ConfigError(
            "task.calibrate",
            "needs data.dev: the temperature is fitted on the dev set after training, and "
            "this run has none; add data.dev or set task.calibrate to false",
        )


def build_run_config(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a mapping: task and method through their registries (each brings its
    own typed config), every other key typed by RunConfig's own fields."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping, got {data!r}")
    data = dict(data)
    task = parse_section(TASKS, "type", data.pop("task", None), "task")
    method = parse_section(METHODS, "name", data.pop("method", "lora"), "method")
    if "data" not in data:
        raise ConfigError("data", "is required (at least data.train)")
    return from_dict(RunConfig, {**data, "task": task, "method": method})


def read_config(path: str | Path, overrides: list[str] | None, build: Callable[[Any], C]) -> C:
    """`build` on the YAML file at `path` with dotted `overrides` applied; an error names the
    file. Shared by the run and distill configs."""
    raw = read_yaml(path)
    with config_source(path):
        return build(apply_overrides(raw, overrides or []))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply overrides, and check every field."""
    config = read_config(path, overrides, build_run_config)
    resolve_data_paths(path, config.data, ("train", "dev", "test"))
    return config
