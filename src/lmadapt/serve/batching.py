"""Dynamic micro-batching: concurrent requests share one forward pass.

A CPU forward over 16 short texts costs far less than 16 forwards over one, so a single worker
thread per model collects whatever requests arrive within `max_wait_ms` (until `max_batch` items),
runs them together, and hands each request its own slice of the results. Requests carry a key
(the run name; for generation, the run and its decoding settings): jobs with different keys in
one collection run as separate batches, so a batch never mixes adapters or settings. No batch
holds more than `max_batch` items: a request larger than what is left of a batch is split, its
parts run in consecutive batches, and it is answered once all of them are done.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

ProcessFn = Callable[[Any, list[Any]], list[Any]]
"""(key, items) -> one result per item, in order."""


class QueueFullError(Exception):
    """The batcher's queue is at capacity: the caller should shed load (HTTP 503)."""


@dataclass
class _Job:
    key: Hashable
    items: list[Any]
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0


class MicroBatcher:
    """One background worker thread that runs `process(key, items)` on collected jobs."""

    def __init__(
        self,
        process: ProcessFn,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int = 1024,
        name: str = "lmadapt-batcher",
    ):
        self.process = process
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, items: list[Any]) -> Future:
        """Queue one request; the future resolves to its results (or its exception)."""
        job = _Job(key, list(items))
        if not job.items:  # nothing to run; a batch would never answer it
            job.future.set_result([])
            return job.future
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError("server busy: request queue is full, retry later") from None
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued jobs, then stop the worker."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        stop = False
        while not stop:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.items)
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                n += len(nxt.items)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        # A cancelled future (client went away) drops its job before any work is done.
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        by_key: dict[Hashable, list[_Job]] = {}
        for j in live:
            by_key.setdefault(j.key, []).append(j)
        for key, group in by_key.items():
            self._run_key(key, group)

    def _run_key(self, key: Hashable, group: list[_Job]) -> None:
        """Jobs of one key in batches of at most max_batch items; each job is answered as soon
        as the batch holding its last item is done, or fails with the first failing batch."""
        items = [x for j in group for x in j.items]
        waiting, done = deque(group), []
        try:
            for start in range(0, len(items), self.max_batch):
                batch = items[start : start + self.max_batch]
                results = self.process(key, batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"batch returned {len(results)} results for {len(batch)}")
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.largest = max(self.stats.largest, len(batch))
                done.extend(results)
                while waiting and len(waiting[0].items) <= len(done):
                    job = waiting.popleft()
                    job.future.set_result(done[: len(job.items)])
                    del done[: len(job.items)]
        except Exception as e:  # every request still waiting must hear of it
            for job in waiting:
                job.future.set_exception(e)
