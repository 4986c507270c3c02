"""Requests that arrive close together run as one batch: one generator, one forward a step for all rows.

A worker thread takes the oldest waiting job and, for up to `window_s`, gathers the jobs waiting behind it
that can share its generator: the same options, no seed (a seeded job runs alone, so that it gives exactly
what `model.generate` gives with that seed), until `max_batch` rows. Jobs that cannot join wait for the
next batch, oldest first. This is window batching, not continuous batching: a job that arrives while a
batch runs waits for it to finish, because all rows of a batch share one left-padded cache (the in-place
cache with per-row lengths is what lets rows join a running batch).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .model import Model
from .options import GenerationOptions


@dataclass
class Job:
    prompts: list[list[int]]
    options: GenerationOptions
    # Called from the worker thread: ("event", (row, Event)), ("done", (completions, stats)) or ("error", exc).
    deliver: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away

    @property
    def rows(self) -> int:
        """Its completions: num_return_sequences a prompt (also a sampling generator's rows)."""
        return len(self.prompts) * self.options.num_return_sequences

    def joins(self, other: Job) -> bool:
        return self.options.seed is None and other.options.seed is None and self.options == other.options


class Full(Exception):
    """The queue of waiting jobs is full."""


class Batcher:
    def __init__(self, model: Model, max_batch: int = 8, window_s: float = 0.005, max_queue: int = 64) -> None:
        self.model, self.max_batch, self.window_s = model, max_batch, window_s
        self._waiting: queue.Queue[Job] = queue.Queue(max_queue)
        self._held: deque[Job] = deque()  # taken from the queue but not into a batch: they go first next time
        self.batches = 0  # batches run, jobs in them and rows ended because their client went away
        self.jobs = 0
        self.cancelled_rows = 0
        threading.Thread(target=self._work, name="onnxgen-batcher", daemon=True).start()

    def submit(self, job: Job) -> None:
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise Full(f"{self._waiting.maxsize} requests are already waiting") from None

    def _next(self, block: bool, timeout: float | None = None) -> Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._waiting.get(block=block, timeout=timeout)
        except queue.Empty:
            return None

    def _work(self) -> None:
        while True:
            first = self._next(block=True)
            assert first is not None
            batch, rows, passed = [first], first.rows, []
            deadline = time.perf_counter() + self.window_s
            while rows < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                job = self._next(block=True, timeout=left)
                if job is None:
                    break
                if job.joins(first) and rows + job.rows <= self.max_batch:
                    batch.append(job)
                    rows += job.rows
                else:
                    passed.append(job)
            self._held.extendleft(reversed(passed))
            self._run([job for job in batch if not job.cancelled.is_set()])

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.batches, self.jobs = self.batches + 1, self.jobs + len(batch)
        try:
            generator = self.model.generator([p for job in batch for p in job.prompts], batch[0].options)
        except Exception as e:  # an option or prompt the model refuses: the job's own error
            for job in batch:
                _send(job, "error", e)
            return
        owner: list[tuple[Job, int]] = []  # generator row -> (job, the job's own row)
        for job in batch:
            owner.extend((job, row) for row in range(job.rows))
        try:
            while not generator.done:
                for event in generator.step():
                    job, row = owner[event.row]
                    if job.cancelled.is_set():
                        generator.finish(event.row)  # type: ignore[union-attr]  (beam search streams nothing)
                        self.cancelled_rows += 1
                    else:
                        _send(job, "event", (row, event))
            completions, stats = generator.completions(), generator.stats
        except Exception as e:  # a bug: every job of the batch gets it, the worker lives on
            for job in batch:
                _send(job, "error", e)
            return
        start = 0
        for job in batch:
            mine = completions[start : start + job.rows]
            start += job.rows
            _send(job, "done", (mine, stats))


def _send(job: Job, kind: str, value: Any) -> None:
    """Hand a job its news; a receiver that is gone (its event loop closed) cancels the job, not the worker."""
    try:
        job.deliver(kind, value)
    except Exception:
        job.cancelled.set()

