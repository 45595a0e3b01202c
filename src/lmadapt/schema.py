"""Typed configs from YAML, for every config in lmadapt: dataclass (de)serialisation with errors
that name the field (`train.lr`) and the bad value, polymorphic sections picked from a registry,
dotted `key=value` overrides, and config files read with errors that name the file.

The bottom floor: methods, tasks and prompting build their own configs with it, and the run
config (config.py) sits above them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from lmadapt.errors import ConfigError


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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a class, never an instance
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
    if isinstance(data, cls):  # a section already built (task and method: by their registry)
        return data
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


SECTION_KEYS = {"task": "type", "method": "name", "strategy": "name"}
"""The polymorphic sections a name may stand for, and the key that name fills."""


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
            if isinstance(child, str) and part in SECTION_KEYS:  # `method=lora` then `method.r=4`
                child = {SECTION_KEYS[part]: child}
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


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def check_device_name(value: str, field: str = "device") -> str:
    """A `device` setting's spelling; whether this machine has it is checked when a command
    starts (session.resolve_device), since that is a property of the machine, not of the file."""
    if not isinstance(value, str) or not DEVICE_NAME.fullmatch(value):
        raise ConfigError(field, f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return value
