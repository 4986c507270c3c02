"""Continuous batching: one decode loop, in a worker thread, for every request a server takes.

The rows of the running requests share one key/value cache of `max_batch` rows (cache.py's InPlaceCache,
at the model's whole context: on the CPU its memory comes as positions are written and goes back when a
row ends), and one forward a step decodes them all, each row at its own length. A request joins at the
next step: its prompt pass writes its rows into free rows of that cache, while the others wait for that
one pass (requests that arrive together share passes, one per prompt length, and a prompt's beams or return
sequences one row of it, which the others copy; a prompt longer than
`prefill_chunk` tokens is written that many positions a step, so that the others wait for a part and not
for the whole prompt). A row that ends frees its place at once, and the last busy row moves down into it,
so that a step computes no free row. Each request keeps a generator of its own (generator.py), so its
options, random numbers, stop rules and events are its own: requests with different options share a step.

Beam search shares steps too: its rows move among the rows it holds (cache.py's SharedRows). Some requests
run apart, each with a cache of its own, one at a time, oldest first, a step of it in turn with a step of
the shared rows: a seeded one where a row's numbers move with the rows beside it (int8 quantizes each step's
activations with one scale for all rows; CUDA's kernels change with the row count), so that it gives
exactly what `model.generate` gives with that seed (fp32 and int4 folders on the CPU batch it: their rows
are computed alone, which _rows_alone checks at start); more rows than `max_batch`; and every request on a
folder whose cache grows (`--growing-cache`: its rows share one left-padded width, so none can join). A request
with guesses (prompt lookup, a draft model: its steps run several tokens of its row) runs apart when nothing
else runs or waits to, and otherwise decodes in the shared rows without guessing: the same text, and no wait
behind another. Requests waiting to run apart never hold back those that can share; among those that share,
requests start oldest first, and one that waits for room holds back those behind it. With a prompt cache (load's prompt_cache_mib), an ending
one-row request's row is copied out into the runtime's pool, and into the row of a later request that starts with
its tokens (a chat's next turn), whose prompt is then written from there a part a step.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .beam import BeamSearch
from .cache import InPlaceCache, SharedRows
from .errors import OptionsError
from .generator import Generator
from .options import GenerationOptions

if TYPE_CHECKING:  # model.py runs a batcher of its own for load(max_batch=N): it imports this module
    from .model import Model


@dataclass
class Job:
    prompts: list[list[int]]
    options: GenerationOptions
    # Called from the worker thread: ("event", (row, Event)), ("done", (completions, stats)), ("error", exc), or
    # ("dropped", None) for a job whose client went away before it started.
    deliver: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    # Made, and its options checked, by the caller (load(max_batch)): run as it is where it can be, instead of made again
    generator: Generator | BeamSearch | None = None

    @property
    def rows(self) -> int:
        """Its generator's rows: num_beams a prompt for beam search, else num_return_sequences."""
        o = self.options
        return len(self.prompts) * (o.num_beams if o.num_beams > 1 else o.num_return_sequences)


@dataclass
class Running:
    job: Job
    generator: Generator | BeamSearch
    slots: list[int | None]  # the shared cache's row of each generator row while it runs; empty when apart
    # While a long prompt is written a part a step: each row's positions written so far, and the scores of
    # each row's last written position (its first token's, once the whole prompt is in). None after.
    written: list[int] | None = None
    first: np.ndarray | None = None
    # Each row's row whose prompt pass it takes (itself for the first row of each of the job's prompts): a prompt's
    # beams or return sequences share one pass, as a call's own rows do (InPlaceCache.spread)
    source: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Occupancy:
    waiting: int  # requests queued, the one held for room included
    running: int  # requests decoding or writing their prompts, in the shared rows or apart
    rows_busy: int  # rows of the shared cache in use


IDLE_SECONDS = 1.0


class Full(Exception):
    """The queue of waiting jobs is full."""


class Batcher:
    def __init__(self, model: Model, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | None = None) -> None:
        self.model, self.max_batch = model, max_batch
        # By default a part takes about a few steps' time: 128 positions of gpt2 int8 45 ms on 2 CPU cores (gpt2-large
        # 311); on an H200 gpt2-large's 512-position prompt pass 6-9 ms, its steps 1.6-3.
        self.prefill_chunk = prefill_chunk or (512 if model.runtime.device == "cuda" else 128)
        runtime = model.runtime
        self.cache = self._shared_cache() if runtime.in_place else None
        self.seeds_share = self.cache is not None and self._rows_alone()
        self._slots: list[Running | None] = [None] * max_batch  # who holds each row of the shared cache
        self._shared: list[Running] = []  # jobs whose rows decode in the shared cache
        self._prefilling: list[Running] = []  # jobs whose long prompts are being written into it, oldest first
        self._apart: Running | None = None  # the job running with a cache of its own
        self._waiting: queue.Queue[Job] = queue.Queue(max_queue)
        self._held: Job | None = None  # taken from the queue, waiting for room: it goes first
        self._apart_waiting: deque[Job] = deque()  # taken from the queue, to run apart in turn (counts as queued)
        self.jobs = 0  # jobs started
        self.joined = 0  # of them, those that joined rows already decoding
        self.steps = 0  # forwards of the shared rows
        self.moved = 0  # rows moved down into rows that ended (_compact)
        self.parts = 0  # parts of long prompts written
        self.resumed = 0  # jobs whose prompt's start came from a kept cache (prompt cache)
        self.cancelled_rows = 0  # rows ended because their client went away
        # The worker thread runs while there is work, and ends after IDLE_SECONDS without any; the next job starts
        # another. So a batcher nothing uses (with its model and cache) can be freed: a running thread would hold it.
        self._lock = threading.Lock()  # between submit and a worker that is ending
        self._worker: threading.Thread | None = None

    def _shared_cache(self) -> InPlaceCache:
        runtime = self.model.runtime
        try:
            cache = InPlaceCache(runtime, self.max_batch, runtime.n_positions)
        except Exception as e:  # MemoryError on the CPU (only address space: pages come as rows are written); onnxruntime's on CUDA
            need = runtime.cache_bytes(self.max_batch, runtime.n_positions)
            reason = (str(e).strip().splitlines() or ["no details"])[0]
            raise OptionsError(f"max_batch {self.max_batch}: a key/value cache of {self.max_batch} rows at the model's context of "
                               f"{runtime.n_positions} positions ({need / 2**30:,.1f} GiB) cannot be allocated "
                               f"({type(e).__name__}: {reason}): serve fewer rows at once") from None
        return cache

    def _rows_alone(self) -> bool:
        """Whether a row's scores are the same bits alone as beside other rows, so that a seeded request can share
        steps and still give exactly what model.generate gives with its seed. int8 quantizes each step's activations
        with one scale for all rows, and cuBLAS picks its kernels by the row count: never. fp32 and int4 on the CPU
        compute each row alone (MatMulNBits quantizes activations per row and block) where the CPU's kernels are
        the same for one row and for many: checked here, once, on a prompt pass and a step (one row, then
        max_batch), since that depends on the CPU's instruction set."""
        runtime = self.model.runtime
        if runtime.device != "cpu" or (self.model.manifest.get("quantization") or {}).get("mode") not in (None, "int4"):
            return False
        prompts = [[(97 * row + 31 * i) % self.model.dims.vocab_size for i in range(5)] for row in range(self.max_batch)]
        runs = []
        for rows in (1, self.max_batch):
            cache = runtime.new_cache(rows, 6)
            runs.append((cache.prefill(prompts[:rows])[0], cache.decode(np.arange(rows, dtype=np.int64))[0]))
        return all(np.array_equal(alone, together) for alone, together in zip(*runs))

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting.qsize() + len(self._apart_waiting) >= self._waiting.maxsize:
                raise Full(f"{self._waiting.maxsize} requests are already waiting")
            self._waiting.put_nowait(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="onnxgen-batcher", daemon=True)
                self._worker.start()

    def occupancy(self) -> Occupancy:
        """The worker's state, read from another thread (metrics.py): each number as it was when read."""
        return Occupancy(self._waiting.qsize() + (self._held is not None) + len(self._apart_waiting),
                         len(self._shared) + len(self._prefilling) + (self._apart is not None),
                         sum(holder is not None for holder in self._slots))

    def _work(self) -> None:
        while self._start_waiting():
            if self._apart is not None:
                self._step_apart(self._apart)
            if self._prefilling:
                self._prefill_part(self._prefilling[0])
            if self._shared:
                self._step_shared()

    def _can_share(self, job: Job) -> bool:
        # contrastive search runs its own rows: a step's candidates, then the chosen one's copies
        return (self.cache is not None and (job.options.seed is None or self.seeds_share) and job.rows <= self.max_batch
                and not job.options.contrastive)

    def _start_waiting(self) -> bool:
        """Start waiting jobs while there is room, oldest first; wait for one when nothing runs or waits to. False
        when nothing came for IDLE_SECONDS: the worker ends."""
        joining: list[Job] = []
        room = sum(holder is None for holder in self._slots)
        while True:
            while self._apart is None and self._apart_waiting:
                self._start_apart(self._apart_waiting.popleft())
            if self._held is None:
                busy = self._shared or self._prefilling or joining or self._apart is not None
                try:
                    self._held = self._waiting.get_nowait() if busy else self._waiting.get(timeout=IDLE_SECONDS)
                except queue.Empty:
                    if busy:
                        break
                    with self._lock:  # a job submitted meanwhile is in the queue, or finds no worker and starts one
                        if self._waiting.empty():
                            self._worker = None
                            return False
                    continue
            job = self._held
            guesses = job.options.prompt_lookup_num_tokens is not None or job.options.assistant_model is not None
            if job.cancelled.is_set():
                self._held = None
                _send(job, "dropped", None)
            elif not self._can_share(job) or (guesses and self._apart is None and not self._apart_waiting):
                self._held = None
                self._apart_waiting.append(job)  # guesses: see Generator.step, which a job apart runs
            elif job.rows > room:
                break
            else:
                self._held, room = None, room - job.rows
                joining.append(job)
        if joining:
            self._join(joining)
        return True

    def _generator(self, job: Job, shared: bool = False) -> Generator | BeamSearch | None:
        """The job's generator; in the shared rows without guesses (their steps run one token a row: the same text)."""
        made, job.generator = job.generator, None
        if made is not None:
            if not (shared and isinstance(made, Generator) and made.guesser is not None):
                return made
            made.cancel()  # its guesser's cache (a draft model's) goes back
        options = replace(job.options, prompt_lookup_num_tokens=None, assistant_model=None) if shared else job.options
        try:
            return self.model.generator(job.prompts, options)
        except Exception as e:  # an option or prompt the model refuses: the job's own error
            _send(job, "error", e)
            return None

    def _join(self, jobs: list[Job]) -> None:
        """The jobs' prompt passes, into free rows of the shared cache, and their first tokens. Rows go in order
        of prompt length, so that rows of equal length sit side by side: one pass for each length."""
        assert self.cache is not None
        started = []
        for job in jobs:
            generator = self._generator(job, shared=True)
            if generator is not None:
                repeat = job.rows // len(job.prompts)
                started.append(Running(job, generator, [None] * job.rows, source=[row - row % repeat for row in range(job.rows)]))
                generator.rows.share(SharedRows(self.cache, started[-1].slots))
        # (job, its row, the row's prompt): nothing is generated yet, so a row's history is its prompt. The rows that
        # run a pass come first among those of their length, so that they sit side by side too.
        rows = sorted(((running, row, running.generator.rows.history(row)) for running in started for row in range(running.job.rows)),
                      key=lambda r: (len(r[2]), r[0].source[r[1]] != r[1]))
        free = [slot for slot, holder in enumerate(self._slots) if holder is None]
        for (running, row, _), slot in zip(rows, free):
            running.slots[row], self._slots[slot] = slot, running
            self.cache.adapters[slot] = running.generator.rows.adapter  # each row its own LoRA adapter (or none)
        self.jobs += len(started)
        self.joined += len(started) if self._shared else 0
        for running in started:  # long prompts, and prompts a kept cache holds the start of: a part a step (_prefill_part)
            resumed = self._resume(running)
            if resumed or max(len(running.generator.rows.history(row)) for row in range(running.job.rows)) > self.prefill_chunk:
                running.written, running.first = [resumed] * running.job.rows, np.empty((running.job.rows, self.model.dims.vocab_size), np.float32)
                self._prefilling.append(running)
        rows = [r for r in rows if r[0].written is None and r[0].source[r[1]] == r[1]]
        if not rows:
            return
        now = [running for running in started if running.written is None]
        try:
            raw = self.cache.prefill([prompt for _, _, prompt in rows], [running.slots[row] for running, row, _ in rows])  # type: ignore[misc]
            self._copy_passes(now)
        except Exception as e:  # a bug, or memory: these jobs' error, the others run on
            for running in now:
                self._end(running, error=e)
            return
        order = {(id(running), row): i for i, (running, row, _) in enumerate(rows)}
        for running in now:
            self._shared.append(running)
            self._take(running, raw[[order[id(running), source] for source in running.source]])

    def _copy_passes(self, runs: list[Running]) -> None:
        """The rows that share a prompt pass (Running.source) take what it wrote, in one reorder of the shared cache
        (a beam search's reorders then leave the positions its rows hold alike be: Rows.alike)."""
        assert self.cache is not None
        every = np.arange(self.max_batch)
        for running in runs:
            for row, source in enumerate(running.source):
                target, origin = running.slots[row], running.slots[source]
                if source != row and target is not None and origin is not None:
                    every[target] = origin
        self.cache.reorder(every)

    def _resume(self, running: Running) -> int:
        """With a prompt cache (load's prompt_cache_mib), a one-row job whose prompt starts with a kept cache's
        tokens: those positions copied into its row; how many (0: none)."""
        rows = running.generator.rows
        taken = self.model.runtime.take_kept(rows.history(0), rows.adapter) if running.job.rows == 1 else None
        if taken is None:
            return 0
        assert self.cache is not None and running.slots[0] is not None
        kept, start = taken
        self.cache.copy_positions(kept, start, row=running.slots[0])
        self.resumed += 1
        return start

    def _keep(self, running: Running) -> None:
        """With a prompt cache, an ending one-row job's written positions, copied out of the shared cache with
        their tokens, for a later request that starts with them (a chat's next turn)."""
        # A job run apart has no row here: its own cache is kept as model.generate's is (Rows.release).
        slot = running.slots[0] if running.slots else None
        if running.job.rows != 1 or slot is None or self.cache is None:
            return
        length = int(self.cache.lengths[slot])
        if not self.model.runtime.keeps(length):
            return
        try:
            kept = InPlaceCache(self.model.runtime, 1, length)
        except MemoryError:  # a copy is worth keeping, not worth failing for
            return
        kept.copy_positions(self.cache, length, source_row=slot)
        self.model.runtime.release(kept, running.generator.rows.history(0)[:length])

    def _prefill_part(self, running: Running) -> None:
        """Write the next prefill_chunk positions of the oldest long prompts' rows; once a job's prompts are
        whole, it decodes with the others."""
        assert self.cache is not None and running.written is not None and running.first is not None
        self._check_cancelled(running)
        if running not in self._prefilling:
            return
        budget = self.prefill_chunk
        for row, slot in enumerate(running.slots):
            prompt, done = running.generator.rows.history(row), running.written[row]
            if done == len(prompt) or budget == 0 or slot is None or running.source[row] != row:
                continue
            part = prompt[done : done + budget]
            try:
                running.first[row] = self.cache.prefill([part], [slot], start=done)[0]
            except Exception as e:  # a bug, or memory: this job's error, the others run on
                self._end(running, error=e)
                return
            running.written[row] += len(part)
            budget -= len(part)
            self.parts += 1
        if all(running.written[row] == len(running.generator.rows.history(row)) for row in set(running.source)):
            try:
                self._copy_passes([running])
            except Exception as e:  # a bug, or memory: this job's error, the others run on
                self._end(running, error=e)
                return
            first, running.written, running.first = running.first[running.source], None, None
            self._prefilling.remove(running)
            self._shared.append(running)
            self._take(running, first)

    def _step_shared(self) -> None:
        """One forward for every shared row; each job's generator takes its rows' scores."""
        assert self.cache is not None
        for running in list(self._shared):
            self._check_cancelled(running)
        if not self._shared:
            return
        # The rows up to the last busy one (_compact leaves no free row below it; with CUDA graphs a graph is captured
        # for each count, at most max_batch of them); rows that do not decode run a placeholder and keep their length.
        count = 1 + max(row for row, holder in enumerate(self._slots) if holder is not None)
        tokens, decoding = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=bool)
        for running in self._shared:
            assert running.generator.rows.pending is not None
            for row, slot in enumerate(running.slots):
                if slot is not None:
                    tokens[slot], decoding[slot] = running.generator.rows.pending[row], True
        try:
            raw = self.cache.decode(tokens, advance=decoding)  # not free rows, nor prompts being written
        except Exception as e:  # a bug: every job of the step gets it, the worker lives on
            for running in list(self._shared):
                self._end(running, error=e)
            return
        self.steps += 1
        for running in list(self._shared):
            # Rows of the job that have ended take any row's scores: the generator looks at running rows only.
            self._take(running, raw[[slot if slot is not None else 0 for slot in running.slots]])
        self._compact()

    def _compact(self) -> None:
        """Move the last busy rows into the free rows below them, so that a step decodes no free row: on the CPU a
        step's cost grows with its rows, and on a GPU too (gpt2-large with CUDA graphs on an H200: 1.6 ms a step
        at batch 1, 2.1 at batch 8)."""
        assert self.cache is not None
        source, moved = np.arange(self.max_batch), []
        while True:
            busy = [slot for slot, holder in enumerate(self._slots) if holder is not None]
            holes = [slot for slot, holder in enumerate(self._slots) if holder is None]
            if not busy or not holes or holes[0] > busy[-1]:
                break
            hole, last = holes[0], busy[-1]
            running = self._slots[last]
            assert running is not None
            running.slots[running.slots.index(last)] = hole
            self._slots[hole], self._slots[last] = running, None
            source[hole] = last
            moved.append(last)
            self.moved += 1
        if moved:
            self.cache.reorder(source)  # the rows' written positions, copied within the buffer
            self.cache.clear(moved)

    def _take(self, running: Running, raw: np.ndarray) -> None:
        generator = running.generator
        try:
            events = generator.take(raw)
        except Exception as e:  # a caller's processor or criterion that raised: this job's error
            self._end(running, error=e)
            return
        for event in events:
            _send(running.job, "event", (event.row, event))
        if generator.done:
            self._end(running)
        elif isinstance(generator, Generator):  # a beam search's rows run until it ends
            self._free(running, [row for row, slot in enumerate(running.slots) if slot is not None and generator.finish_reasons[row] is not None])

    def _check_cancelled(self, running: Running) -> None:
        """A job whose client went away: its running rows end (finish reason "cancelled")."""
        if running.job.cancelled.is_set() and not running.generator.done:
            if isinstance(running.generator, Generator):
                self.cancelled_rows += sum(reason is None for reason in running.generator.finish_reasons)
            running.generator.cancel()
            self._end(running)

    def _free(self, running: Running, rows: list[int]) -> None:
        slots = [slot for row in rows if (slot := running.slots[row]) is not None]
        for row in rows:
            running.slots[row] = None
        for slot in slots:
            self._slots[slot] = None
        if slots and self.cache is not None:
            self.cache.clear(slots)

    def _end(self, running: Running, error: Exception | None = None) -> None:
        """The job is over: its completions, or the error, go to it; whatever it held is freed (a prompt cache
        keeps a copy of a one-row job's row first)."""
        if error is None and running.written is None:
            self._keep(running)
        self._free(running, list(range(len(running.slots))))
        for running_jobs in (self._shared, self._prefilling):
            if running in running_jobs:
                running_jobs.remove(running)
        if running is self._apart:
            self._apart = None
        if error is not None:
            running.generator.cancel()  # hands a cache of its own back
            _send(running.job, "error", error)
        else:
            _send(running.job, "done", (running.generator.completions(), running.generator.stats))

    def _start_apart(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client went away while it waited
            _send(job, "dropped", None)
            return
        generator = self._generator(job)
        if generator is not None:
            self.jobs += 1
            self._apart = Running(job, generator, [])

    def _step_apart(self, running: Running) -> None:
        self._check_cancelled(running)
        if running is not self._apart:
            return
        try:
            events = running.generator.step()
        except Exception as e:  # a bug, or a caller's processor that raised: this job's error
            self._end(running, error=e)
            return
        for event in events:  # none from beam search
            _send(running.job, "event", (event.row, event))
        if running.generator.done:
            self._end(running)


def _send(job: Job, kind: str, value: Any) -> None:
    """Hand a job its news; a receiver that is gone (its event loop closed) cancels the job, not the worker."""
    try:
        job.deliver(kind, value)
    except Exception:
        job.cancelled.set()
