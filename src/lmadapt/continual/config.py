"""Typed continual-learning config: a stream of task entries sharing one backbone.

```yaml
model: minilm
strategy: {name: ewc, strength: 1e6}
train: {epochs: 1, batch_size: 32}       # defaults for every entry
stream:
  - name: sst2
    task: {type: classification, text_column: sentence}
    data: {train: sst2/train.tsv, dev: sst2/dev.tsv}
    train: {batch_size: 16}               # optional per-entry overrides of `train`
  - name: sst2                            # a repeated name: more data for an existing task
    data: {train: sst2/more.tsv}
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmadapt.config import DataConfig, TaskSection, TrainConfig, read_config
from lmadapt.continual.strategies import STRATEGIES
from lmadapt.errors import ConfigError
from lmadapt.schema import from_dict, parse_section, resolve_data_paths, to_dict
from lmadapt.tasks import TASKS

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass
class StreamEntry:
    name: str
    """Task id: picks the head (and adapter); a name seen before continues that task."""
    task: TaskSection
    """Task section, as in run configs (taken from the first entry of a repeated name)."""
    data: DataConfig
    train: TrainConfig
    first: bool = True
    """False for a repeated name (more data for a task already learned)."""


@dataclass
class ContinualConfig:
    stream: list[StreamEntry]
    strategy: Any
    """Strategy section; `name` picks it (naive, ewc, l2, replay, lwf, adapters)."""
    model: str = "minilm"
    output_dir: str = "runs/continual"
    overwrite: bool = False
    trust_remote_code: bool = False
    seed: int = 42
    device: Literal["auto", "cpu"] = "auto"
    """Continual learning runs on the CPU for now (its strategies keep penalties and replay
    state there): auto and cpu both mean the CPU, and a GPU is refused by name rather than
    ignored."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class _Rest:
    model: str = "minilm"
    train: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/continual"
    overwrite: bool = False
    trust_remote_code: bool = False
    device: Literal["auto", "cpu"] = "auto"


def _within(prefix: str, fn: Any, *args: Any) -> Any:
    """Parse a section as if top-level (`train.lr`) and report errors under the entry."""
    try:
        return fn(*args)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e.field}", e.message) from None


def _entry(raw: Any, i: int, train: dict[str, Any], seen: dict[str, int], entries: list) -> Any:
    path = f"stream[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping with name, task, data; got {raw!r}")
    unknown = sorted(set(raw) - {"name", "task", "data", "train"})
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}", "unknown field; known fields: name, task, data, train"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{path}.name", f"must be a word (letters, digits, _ or -), got {name!r}")
    if "data" not in raw:
        raise ConfigError(f"{path}.data", "is required (at least data.train)")
    data = _within(path, from_dict, DataConfig, raw["data"], "data")
    if not data.train:
        raise ConfigError(f"{path}.data.train", "is required")
    over = raw.get("train") or {}
    if not isinstance(over, dict):
        raise ConfigError(f"{path}.train", f"expected a mapping, got {over!r}")
    entry_train = _within(path, from_dict, TrainConfig, {**train, **over}, "train")
    if entry_train.gradient_checkpointing:  # refused, not silently ignored
        raise ConfigError(
            f"{path}.train.gradient_checkpointing",
            "continual learning does not support it yet; use lmadapt train for one task",
        )
    if name in seen:
        first = entries[seen[name]]
        if (
            "task" in raw
            and _within(path, parse_section, TASKS, "type", raw["task"], "task") != first.task
        ):
            raise ConfigError(
                f"{path}.task", f"differs from the task of '{name}' in stream[{seen[name]}]"
            )
        if data.dev or data.test:
            raise ConfigError(
                f"{path}.data.{'dev' if data.dev else 'test'}",
                f"evaluation sets of '{name}' are fixed by its first entry stream[{seen[name]}]",
            )
        return StreamEntry(name, first.task, data, entry_train, first=False)
    if "task" not in raw:
        raise ConfigError(f"{path}.task", f"is required on the first entry of '{name}'")
    if not data.dev:
        raise ConfigError(f"{path}.data.dev", "is required: the accuracy matrix is measured on it")
    task = _within(path, parse_section, TASKS, "type", raw["task"], "task")
    if not TASKS.get(task.type).impl.shares_backbone:
        heads = ", ".join(e.name for e in TASKS if e.impl.shares_backbone)
        raise ConfigError(
            f"{path}.task.type",
            f"'{task.type}' has no task head over a shared backbone, which the continual "
            f"learner's multi-head model needs; one of: {heads}",
        )
    seen[name] = i
    return StreamEntry(name, task, data, entry_train)


def build_continual_config(data: dict[str, Any]) -> ContinualConfig:
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"expected a mapping, got {data!r}")
    data = dict(data)
    strategy = parse_section(STRATEGIES, "name", data.pop("strategy", "naive"), "strategy")
    stream = data.pop("stream", None)
    if not isinstance(stream, list) or not stream:
        raise ConfigError("stream", "is required: a non-empty list of {name, task, data} entries")
    rest = from_dict(_Rest, data)
    from_dict(TrainConfig, rest.train, "train")  # check the shared defaults even if overridden
    seen: dict[str, int] = {}
    entries: list[StreamEntry] = []
    for i, raw in enumerate(stream):
        entries.append(_entry(raw, i, rest.train, seen, entries))
    return ContinualConfig(
        stream=entries,
        strategy=strategy,
        model=rest.model,
        output_dir=rest.output_dir,
        overwrite=rest.overwrite,
        trust_remote_code=rest.trust_remote_code,
        device=rest.device,
        seed=entries[0].train.seed,
    )


def load_continual_config(path: str | Path, overrides: list[str] | None = None) -> ContinualConfig:
    """Read a continual YAML config; overrides like `strategy=replay strategy.buffer_size=50`."""
    config = read_config(path, overrides, build_continual_config)
    for entry in config.stream:
        resolve_data_paths(path, entry.data, ("train", "dev", "test"))
    return config
