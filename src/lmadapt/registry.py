"""A name -> (config class, implementation) registry, shared by methods, tasks and models.

Adding a method or task is one file plus one `@REGISTRY.register(...)` line; nothing branches on
names anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type | None
    impl: T
    summary: str


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, config_cls: type | None = None, summary: str = ""
    ) -> Callable[[T], T]:
        def deco(impl: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            doc = summary or (getattr(impl, "__doc__", None) or "").strip().splitlines()[0:1]
            text = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._entries[name] = Entry(name, config_cls, impl, text)
            return impl

        return deco

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
