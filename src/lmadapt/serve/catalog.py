"""The runs a server answers for, and the models in memory that answer them.

Runs are named in one of two ways:
- a list of run directories (`lmadapt serve RUN...`): all loaded at start-up and kept;
- a directory of runs (`lmadapt serve --runs-dir DIR`): every finished run or ONNX export
  directly under DIR is served, loaded when a request first names it. A run added later is
  found when first named (DIR is listed again, at most once a second). Before a load would take
  the weights in memory past the budget (`--memory-budget-mb`), the least recently used runs
  are unloaded: an adapter from the model it shares, or a model with its last run. A run
  answering a request, or named in the last `GRACE_SECONDS`, is never unloaded: a load waits
  for one to go idle, up to `WAIT_SECONDS`, then answers 503.

LoRA runs over one base share one PeftModel (`ModelGroup`), so a cold run of a base already in
memory costs only its adapter; requests for several such runs in one micro-batch go through one
forward pass (`ModelGroup.batch_key`). Each model has one micro-batcher thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel

from lmadapt.api import saved_config
from lmadapt.errors import LmadaptError
from lmadapt.export_onnx import is_onnx_export
from lmadapt.rundir import RunDir
from lmadapt.serve.batching import MicroBatcher
from lmadapt.serve.runs import (
    ModelGroup,
    ServedRun,
    adapter_bytes,
    load_groups,
    load_model,
    model_bytes,
    read_run,
    share_key,
)
from lmadapt.serve.settings import ServeSettings

RESCAN_SECONDS = 1.0
"""Least time between two listings of --runs-dir (a request naming an unknown run lists it)."""
GRACE_SECONDS = 0.5
"""A run named this recently is not unloaded: its request may be between looking the run up
and queueing its batch (no await lies between the two, so this is ample)."""
WAIT_SECONDS = 5.0
"""How long a load waits for busy runs to go idle before answering 503 (memory budget full)."""


class UnknownRun(LmadaptError):
    """No run of that name is served (404)."""


class MemoryBudgetFull(LmadaptError):
    """Loading the run would pass the memory budget and nothing can be unloaded now (503)."""


@dataclass
class Entry:
    """A run in memory: its group (the model that answers it) and what unloading it frees."""

    run: ServedRun
    group: ModelGroup
    bytes: int
    """Its own weights: its adapter's when it shares a model, else the whole model's."""
    in_flight: int = 0
    used: float = field(default_factory=time.monotonic)


def weight_files_bytes(path: Path) -> int:
    """Bytes of the weight files directly in `path` (what loading them will take, roughly)."""
    if not path.is_dir():
        return 0
    suffixes = {".safetensors", ".onnx", ".data", ".gguf"}
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in suffixes and f.is_file())


def servable(path: Path) -> bool:
    """A finished run (metrics.json written last, and a model) or an ONNX export. Hidden names
    are temporary directories of writes in progress."""
    if path.name.startswith(".") or not path.is_dir():
        return False
    run = RunDir(path)
    return (run.metrics.is_file() and run.model.is_dir()) or is_onnx_export(path)


def _release_freed_memory(collect: bool) -> None:
    """Hand freed weights back to the OS: glibc keeps large freed blocks in its heap otherwise,
    and the process's resident memory would not fall after an unload. `collect`: first run the
    garbage collector (300 ms with a model loaded), for a whole model's reference cycles; an
    adapter's tensors go when peft deletes its layers."""
    if collect:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Catalog:
    """Run names -> runs in memory; loads, unloads and batches (see the module docstring)."""

    def __init__(
        self,
        settings: ServeSettings,
        device: torch.device,
        run_dirs: list[str | Path] | None = None,
        runs_dir: str | Path | None = None,
    ):
        if bool(run_dirs) == (runs_dir is not None):
            raise LmadaptError("serve needs run directories or --runs-dir DIR (one of the two)")
        self.settings, self.device = settings, device
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None
        self.budget = settings.memory_budget() if runs_dir is not None else None
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.base_bytes: dict[int, int] = {}  # id(group) -> its weights beyond the adapters
        self.batchers: dict[int, MicroBatcher] = {}  # id(group) -> its micro-batcher
        self.paths: dict[str, Path] = {}
        self.loads = self.unloads = 0
        self._lock = threading.RLock()  # the tables above (read by the event loop's thread)
        self._loading = threading.Lock()  # one load (and its unloads) at a time
        self._scanned = -RESCAN_SECONDS
        self._adapters = itertools.count(1)
        self._bases = itertools.count()
        if self.runs_dir is not None:
            if not self.runs_dir.is_dir():
                raise LmadaptError(f"--runs-dir {self.runs_dir}: not a directory")
            self.scan()
            return
        for group in load_groups(list(run_dirs or []), settings.max_batch, device):
            adapters = sum(adapter_bytes(group.model, a) for a in group.adapters.values())
            self._add_group(group, model_bytes(group.model) - adapters)
            for name, run in group.runs.items():
                self.paths[name] = run.run_dir
                own = adapter_bytes(group.model, group.adapters[name]) if group.adapters else 0
                self.entries[name] = Entry(run, group, own)

    # ------------------------------------------------------------------ names

    def scan(self, force: bool = False) -> None:
        """List --runs-dir again (at most once per RESCAN_SECONDS unless `force`). A run whose
        directory has gone is no longer named, so it soon becomes the least recently used."""
        if self.runs_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._scanned < RESCAN_SECONDS:
            return
        self._scanned = now
        found = {p.name: p for p in sorted(self.runs_dir.iterdir()) if servable(p)}
        self.paths = found

    def names(self) -> list[str]:
        """Every run this server answers for, loaded or not."""
        self.scan()
        return sorted(self.paths)

    def describe(self, name: str) -> dict[str, Any]:
        """A run's card (`ServedRun.info`): as loaded, or from its config.yaml alone, without
        its labels (listing many runs reads no tokenizer or task state)."""
        entry = self.entries.get(name)
        if entry is not None:
            return entry.run.info()
        path = self.paths[name]
        config = saved_config(path)
        return {
            "task": config.task.type,
            "method": config.method.name,
            "base_model": config.model,
            "engine": "onnxruntime" if is_onnx_export(path) else "pytorch",
        }

    def resolve(self, name: str | None) -> str:
        """The run a request means: `name`, or the only one served when it gives none."""
        if name is None:
            names = self.names()
            if len(names) == 1:
                return names[0]
            raise UnknownRun(f"field 'model' is required; served models: {', '.join(names)}")
        if name not in self.paths:
            self.scan()
        if name not in self.paths:
            raise UnknownRun(name)
        return name

    # ------------------------------------------------------------------ loading

    def get(self, name: str) -> Entry:
        """The run in memory, loaded now if it is not (blocking: call it off the event loop
        when `loaded(name)` is False)."""
        with self._lock:
            entry = self.entries.get(name)
            if entry is not None:
                entry.used = time.monotonic()
                self.entries.move_to_end(name)
                return entry
        with self._loading:
            with self._lock:  # another request may have loaded it meanwhile
                if name in self.entries:
                    return self.entries[name]
            return self._load(name)

    def loaded(self, name: str) -> bool:
        return name in self.entries

    def _load(self, name: str) -> Entry:
        run = read_run(self.paths[name])
        key = share_key(run)
        with self._lock:
            group = next(
                (
                    e.group
                    for e in self.entries.values()
                    if key is not None and e.group.share == key
                ),
                None,
            )
        model_dir = RunDir(run.run_dir).model if run.engine == "pytorch" else run.run_dir
        need = weight_files_bytes(model_dir)
        if group is None and run.engine == "pytorch" and not run.method.saves_whole_model:
            need += weight_files_bytes(Path(run.spec.path))  # the base it loads under the adapter
        self._make_room(need, keep=group, name=name)
        if group is not None:
            entry = Entry(run, group, group.attach(run, f"run{next(self._adapters)}"))
        else:
            model = load_model(run, self.device).to(self.device).eval()
            # a run that shares (a PeftModel) keeps peft's name for its first adapter
            adapters = {run.name: cast(PeftModel, model).active_adapter} if key else {}
            group = ModelGroup(
                model,
                {run.name: run},
                adapters,
                self.settings.max_batch,
                base=next(self._bases),
                share=key,
            )
            own = adapter_bytes(model, adapters[run.name]) if adapters else 0
            total = model_bytes(model) or need  # an ONNX session holds its graph's weights
            self._add_group(group, total - own)
            entry = Entry(run, group, own)
        with self._lock:
            self.entries[name] = entry
            self.loads += 1
        self._make_room(0, keep=group, name=name)  # now that its size is known
        return entry

    def _add_group(self, group: ModelGroup, base_bytes: int) -> None:
        self.base_bytes[id(group)] = base_bytes
        self.batchers[id(group)] = MicroBatcher(
            group.generate if group.endpoint == "generate" else group.predict,
            self.settings.max_batch,
            self.settings.max_wait_ms,
            self.settings.max_queue,
            name=f"lmadapt-batcher-{group.base}",
        )

    # ------------------------------------------------------------------ unloading

    @property
    def groups(self) -> list[ModelGroup]:
        """The models in memory, each once."""
        with self._lock:
            return list({id(e.group): e.group for e in self.entries.values()}.values())

    @property
    def resident_bytes(self) -> int:
        """Weights in memory: each model once, each adapter once."""
        with self._lock:
            return sum(self.base_bytes.values()) + sum(e.bytes for e in self.entries.values())

    def _idle(self, entry: Entry) -> bool:
        return entry.in_flight == 0 and time.monotonic() - entry.used > GRACE_SECONDS

    def _make_room(self, need: int, keep: ModelGroup | None, name: str) -> None:
        """Unload least recently used idle runs until `need` more bytes fit, never `name` nor
        the last run of `keep` (the model `name` is joining)."""
        if self.budget is None:
            return
        mb = 2**20
        if need > self.budget:
            raise MemoryBudgetFull(
                f"model {name!r} needs about {need / mb:.1f} MB, more than the memory budget of "
                f"{self.budget / mb:.1f} MB (--memory-budget-mb)"
            )
        waited = 0.0
        while self.resident_bytes + need > self.budget:
            with self._lock:
                victim = next(
                    (
                        n
                        for n, e in self.entries.items()
                        if n != name
                        and self._idle(e)
                        and (e.group is not keep or len(keep.runs) > 1)  # keep the model
                    ),
                    None,
                )
            if victim is None and need > 0 and waited < WAIT_SECONDS:
                time.sleep(0.05)  # a busy run may finish its request
                waited += 0.05
                continue
            if victim is None:
                if need == 0:  # loaded already: over budget until the busy runs go idle
                    return
                raise MemoryBudgetFull(
                    f"loading model {name!r} (about {need / mb:.1f} MB) would pass the memory "
                    f"budget of {self.budget / mb:.1f} MB, and every loaded run is answering "
                    "requests; retry shortly"
                )
            self._unload(victim)

    def _unload(self, name: str) -> None:
        """Drop one run: its adapter from a shared model, or the model with its last run."""
        with self._lock:
            entry = self.entries.pop(name)
            last = len(entry.group.runs) == 1
            batcher = self.batchers.pop(id(entry.group)) if last else None
            if last:
                del self.base_bytes[id(entry.group)]
            self.unloads += 1
        if batcher is not None:
            batcher.close()
            entry.group.model = torch.nn.Module()  # the last reference the catalog holds
        else:
            entry.group.detach(name)
        del entry
        _release_freed_memory(collect=batcher is not None)

    # ------------------------------------------------------------------ requests

    def submit(self, entry: Entry, key: Hashable, items: list[Any]) -> Future:
        """Queue items on the run's model batcher; the run stays loaded until they are done."""
        with self._lock:
            entry.in_flight += 1
        try:
            future = self.batchers[id(entry.group)].submit(key, items)
        except BaseException:
            self._done(entry)
            raise
        future.add_done_callback(lambda _: self._done(entry))
        return future

    @contextlib.contextmanager
    def busy(self, entry: Entry) -> Iterator[None]:
        """Keep the run loaded while work outside the batcher (an explanation) uses it."""
        with self._lock:
            entry.in_flight += 1
        try:
            yield
        finally:
            self._done(entry)

    def _done(self, entry: Entry) -> None:
        with self._lock:
            entry.in_flight -= 1
            entry.used = time.monotonic()

    def stats(self) -> dict[str, Any]:
        """What /health reports about models in memory and micro-batching."""
        with self._lock:
            batchers, resident = list(self.batchers.values()), self.resident_bytes
            return {
                "loaded": sorted(self.entries),
                "base_models_in_memory": len({e.group.base for e in self.entries.values()}),
                "weights_bytes": resident,
                "weights_mb": round(resident / 2**20, 1),
                "memory_budget_mb": None if self.budget is None else round(self.budget / 2**20, 1),
                "loads": self.loads,
                "unloads": self.unloads,
                "batches": sum(b.stats.batches for b in batchers),
                "items": sum(b.stats.items for b in batchers),
                "largest_batch": max((b.stats.largest for b in batchers), default=0),
                "mixed_batches": sum(g.mixed for g in self.groups),
            }

    def close(self) -> None:
        for b in self.batchers.values():
            b.close()
