"""One worker thread that runs every generation, batching the jobs that can share a batch.

HTTP handler threads only parse and queue; the worker owns the model, so JAX is driven from one thread and
compiled programs are reused across requests. A batch is the oldest waiting job plus every other waiting job
with equal ``Settings`` (up to ``max_batch``), gathered for at most ``wait_s`` after the first arrives. Only
greedy jobs are batched: a sampled row's random stream depends on its row in the batch, so sampled jobs run
alone and a request gets the same answer however busy the server is.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator

from meteora_jax.serve.requests import Settings


@dataclasses.dataclass(eq=False)
class Job:
    """One prompt to answer. The worker puts ``("delta", text)`` (streaming only), then ``("done", Choice)``
    or ``("error", exception)`` on ``events``."""

    prompt_ids: list[int]
    settings: Settings
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)


@dataclasses.dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    largest: int = 0


class Batcher:
    def __init__(self, run_batch: Callable[[list[Job]], None], *, max_batch: int = 8, wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.stats = BatchStats()
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._paused = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="meteora-jax-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down.")
            self._jobs.append(job)
            self._cv.notify_all()

    def pending(self) -> int:
        """Jobs waiting for a batch."""
        with self._cv:
            return len(self._jobs)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new batch starts inside this block (a running one finishes); jobs queue up meanwhile."""
        with self._cv:
            self._paused += 1
        try:
            yield
        finally:
            with self._cv:
                self._paused -= 1
                self._cv.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Finishes the queued jobs, then stops the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[Job]:
        with self._cv:
            while not self._closed and (self._paused or not self._jobs):
                self._cv.wait()
            if not self._jobs:
                return []
            first = self._jobs.popleft()
            batch = [first]
            if not first.settings.sampling.greedy:
                return batch
            deadline = time.monotonic() + self.wait_s
            while True:
                for job in list(self._jobs):
                    if len(batch) < self.max_batch and job.settings == first.settings:
                        self._jobs.remove(job)
                        batch.append(job)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch or remaining <= 0 or self._closed:
                    return batch
                self._cv.wait(remaining)

    def _loop(self) -> None:
        while batch := self._take():
            self.stats.batches += 1
            self.stats.jobs += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            try:
                self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 (the handlers report it; the worker must live on)
                for job in batch:
                    job.events.put(("error", e))
