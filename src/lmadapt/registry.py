"""A name -> (config class, implementation) registry, shared by methods, tasks and models.

Adding a method or task is one file plus one registration line; nothing branches on names
anywhere else. Tasks and methods register their implementation by its dotted path (`lazy`), next
to a light config class, so that reading and checking a run config imports neither torch nor the
implementations (peft's layout: a config beside each tuner, the model code loaded when used).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


class Entry(Generic[T]):
    """One registered name: its config class, and its implementation (imported on first use
    when it was registered by path)."""

    def __init__(self, name: str, config_cls: type | None, impl: T | str, summary: str = ""):
        self.name, self.config_cls = name, config_cls
        self._impl, self._summary = impl, summary

    @property
    def impl(self) -> T:
        if isinstance(self._impl, str):  # "package.module:attribute"
            module, _, attr = self._impl.partition(":")
            self._impl = getattr(importlib.import_module(module), attr)
        return cast(T, self._impl)

    @property
    def summary(self) -> str:
        """The given summary, else the first line of the implementation's docstring."""
        if self._summary:
            return self._summary
        doc = (getattr(self.impl, "__doc__", None) or "").strip().splitlines()
        return doc[0] if doc else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def _add(self, entry: Entry[T]) -> None:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} '{entry.name}' registered twice")
        self._entries[entry.name] = entry

    def register(
        self, name: str, config_cls: type | None = None, summary: str = ""
    ) -> Callable[[T], T]:
        """A decorator registering the implementation it decorates."""

        def deco(impl: T) -> T:
            self._add(Entry(name, config_cls, impl, summary))
            return impl

        return deco

    def lazy(self, package: str, rows: list[tuple[str, type, str]]) -> None:
        """Register each (name, config class, implementation) without importing it: the
        implementation is that attribute of the module `package.name`."""
        for name, config_cls, impl in rows:
            self._add(Entry(name, config_cls, f"{package}.{name}:{impl}"))

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} '{name}'; known: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: Any) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())
