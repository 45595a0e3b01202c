"""Typed run configuration: dataclasses loaded from YAML, with dotted `key=value` overrides.

Every field is checked on load; an error names the field path (`train.lr`) and the bad value.
The `task` and `method` sections are polymorphic: their `type` / `name` key picks a config
class from the task or method registry, so a new method brings its own typed fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmadapt.errors import ConfigError


@dataclass
class DataConfig:
    """Where the examples are. Format is taken from the file extension unless given."""

    train: str | None = None
    """Training file (csv, tsv or jsonl)."""
    dev: str | None = None
    """Dev file: evaluated during training; drives early stopping and the best checkpoint."""
    test: str | None = None
    """Optional test file, evaluated once with the best model at the end."""
    format: Literal["auto", "csv", "tsv", "jsonl", "conll"] = "auto"
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

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"data.{name}", f"must be > 0, got {v}")
        if not 0 <= self.max_bad_fraction < 1:
            raise ConfigError(
                "data.max_bad_fraction", f"must be in [0, 1), got {self.max_bad_fraction}"
            )


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None
    """Stop after this many evaluations without improvement; None disables early stopping."""
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 1:
            raise ConfigError("train.early_stopping.patience", f"must be >= 1, got {self.patience}")


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None
    """If set, overrides epochs: stop after this many optimizer steps."""
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float | None = None
    """Peak learning rate; None takes the method's default (e.g. 5e-4 for LoRA, 5e-5 for full)."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    """Evaluate on dev every N optimizer steps; None evaluates at the end of each epoch."""
    metric: str | None = None
    """Dev metric that picks the best checkpoint and drives early stopping; None = task default."""
    metric_mode: Literal["auto", "max", "min"] = "auto"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast (fp32 master weights); auto = bf16 when the CPU has native bf16 units."""
    dropout: float | None = None
    """Override every dropout probability in the model (LoRA's too); None keeps the model's.
    0 is the fast choice on CPU, where random masks cost a quarter of a MiniLM step."""
    group_by_length: bool = True
    """Length-grouped batches (shuffled buckets) to cut padding."""
    optimizer: Literal["fused", "foreach"] = "fused"
    """AdamW kernel: fused updates each parameter in one pass over weights, gradients and
    moments, the faster on CPU (see bench/); foreach is torch's multi-tensor kernel."""
    log_every: int = 20
    checkpoint_every: int | None = None
    """Save a resumable checkpoint every N optimizer steps; None = at every evaluation."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep (oldest deleted first)."""
    threads: int | None = None
    """torch intra-op threads; None = all cores, shared out among the processes of a node."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun, accelerate launch) share a run: ddp replicates the model
    and averages gradients; fsdp also shards weights, gradients and optimizer state, on CUDA GPUs
    only. batch_size stays the global batch, split across the processes."""

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "eval_batch_size",
            "grad_accum",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise ConfigError("train.epochs", f"must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("train.max_steps", f"must be >= 1, got {self.max_steps}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError("train.dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {v}")


@dataclass
class RunConfig:
    """One training run: model + task + method + data + schedule -> a run directory."""

    task: Any
    """Task section; `type` picks the task (classification, ...)."""
    method: Any
    """Method section; `name` picks the adaptation method (full, bitfit, lora, ...)."""
    data: DataConfig
    model: str = "minilm"
    """Embedded short name (see `lmadapt models`), a local model directory, or a hub id."""
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/run"
    overwrite: bool = False
    """Replace an existing output_dir; otherwise an existing one is an error."""
    trust_remote_code: bool = False
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    """Attention kernel. auto = eager for encoders (on CPU, SDPA's flash kernel has a slow
    backward for short inputs), the model's default (SDPA) for causal LMs."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ---------------------------------------------------------------- generic (de)serialisation


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against type `tp`, converting the few safe cases (int -> float, '5e-4')."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(path, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "5e-4" as a string
            except ValueError:
                pass
        raise ConfigError(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(path, f"expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and bad types name their field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(where, f"unknown field; known fields: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        kwargs[name] = coerce(value, hints[name], sub)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(where, "is required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if path and not e.field.startswith(path):
            raise ConfigError(f"{path}.{e.field}", e.message) from None
        raise


def parse_section(registry: Any, key: str, data: Any, path: str) -> Any:
    """Parse a polymorphic section: `data[key]` names the registry entry whose config to build."""
    if isinstance(data, str):
        data = {key: data}
    if not isinstance(data, dict) or key not in data:
        raise ConfigError(f"{path}.{key}", f"is required; one of: {', '.join(registry.names())}")
    name = data[key]
    if name not in registry:
        raise ConfigError(
            f"{path}.{key}", f"unknown value {name!r}; one of: {', '.join(registry.names())}"
        )
    return from_dict(registry.get(name).config_cls, data, path)


def build_run_config(data: dict[str, Any]) -> RunConfig:
    from lmadapt.methods import METHODS
    from lmadapt.tasks import TASKS

    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping, got {data!r}")
    data = dict(data)
    task = parse_section(TASKS, "type", data.pop("task", None), "task")
    method = parse_section(METHODS, "name", data.pop("method", "lora"), "method")
    if "data" not in data:
        raise ConfigError("data", "is required (at least data.train)")
    rest = from_dict(_RunRest, data)
    return RunConfig(task=task, method=method, **{k: getattr(rest, k) for k in _REST_FIELDS})


@dataclass
class _RunRest:
    """RunConfig without the polymorphic sections, for typed parsing of the remaining keys."""

    data: DataConfig
    model: str = "minilm"
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/run"
    overwrite: bool = False
    trust_remote_code: bool = False
    attention: Literal["auto", "eager", "sdpa"] = "auto"


_REST_FIELDS = [f.name for f in dataclasses.fields(_RunRest)]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested mapping."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("task", "method"):
                child = {"type" if part == "task" else "name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(key, f"cannot set a field inside {part!r}={child!r}")
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> Any:
    """A config file's YAML content; every failure is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<file>", "config file not found", source=str(path))
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError("<yaml>", f"not valid YAML: {e}", source=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("<file>", f"not UTF-8 text: {e}", source=str(path)) from None


@contextlib.contextmanager
def config_source(path: str | Path) -> Iterator[None]:
    """Errors raised inside name the config file they came from."""
    try:
        yield
    except ConfigError as e:
        if e.source is None:
            raise ConfigError(e.field, e.message, source=str(path)) from None
        raise


def resolve_data_paths(config_file: str | Path, obj: Any, names: tuple[str, ...]) -> None:
    """Relative data paths in a config file are relative to the working directory when they
    exist there (the usual case for shipped configs), else to the config file itself."""
    base = Path(config_file).parent
    for name in names:
        value = getattr(obj, name)
        if value and not Path(value).exists() and (base / value).exists():
            setattr(obj, name, str(base / value))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply overrides, and check every field."""
    raw = read_yaml(path)
    with config_source(path):
        config = build_run_config(apply_overrides(raw, overrides or []))
    resolve_data_paths(path, config.data, ("train", "dev", "test"))
    return config
