"""The key/value cache of one call's rows, in the layout its graph has, and the runs that fill it.

- `InPlaceCache` (graphs exported with the cache in place, the default): one buffer for every layer's key
  and value, each a (rows, heads, capacity, head size) slice of it, allocated once per call at the length
  the call needs (its longest prompt + max_new_tokens: never the whole context window). GroupQueryAttention
  writes each new position into it where it goes; each row has its own length, so no row is ever padded.
  The prompt pass runs once per run of neighbouring rows of equal length, on their slice of the buffer; a
  prompt's beams or return sequences share one pass, copied to its other rows (`spread`).
  A server keeps one for all its requests instead (batcher.py): rows at the whole context, each written by
  its request's prompt pass when it joins and cleared when it ends, while the others go on decoding.
- `GrowingCache` (graphs with MultiHeadAttention or optimum's own attention: `--growing-cache`, or
  `--no-optimize`): every step returns a new cache one position longer; rows are left-padded to one
  width and an attention mask says which positions are real.

Both answer `prefill(prompts)` and `decode(tokens)` with the last position's scores, (rows, vocab)
float32, and `reorder(source, alike)` (row i becomes a copy of row source[i]: beam search). Each row has a LoRA adapter
(`adapters`: a loaded Adapter, or None; a graph exported with --lora), whose inputs every run binds (adapters.py).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

import numpy as np

from .folder import (
    ATTENTION_MASK,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    LOGITS_TO_KEEP,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
)
from .pages import give_back, small_pages

if TYPE_CHECKING:
    from .adapters import Adapter
    from .runtime import Runtime


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask and position ids of a left-padded batch.

    Position ids count real tokens only, so a padded prompt sees the same positions as it would alone."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


class InPlaceCache:
    def __init__(self, runtime: Runtime, rows: int, capacity: int) -> None:
        self.runtime, self.rows, self.capacity = runtime, rows, capacity
        rt = runtime
        self.shape = (rows, rt.n_head, capacity, rt.head_dim)  # of each layer's key or value
        self.nbytes = rt.cache_bytes(rows, capacity)
        self.row_bytes = rt.cache_bytes(1, capacity) // len(rt.past_names)  # one row of one layer's key or value
        # One buffer, layer after layer (past_names' order), so that beam search moves every layer's rows in one
        # run on CUDA (144 small runs a step for gpt2-large otherwise).
        shape = (len(rt.past_names) * rows, *self.shape[1:])
        # Zeroed: GroupQueryAttention weighs the positions past a row's length by zero, and zero times garbage that
        # happens to be NaN is NaN (on CUDA too: a new buffer's memory held other tensors, and rows of fp16 NaN
        # scores came of it).
        if rt.device == "cpu":
            # calloc: pages appear as they are written. A numpy view of the same memory lets beam search move rows in place.
            self.array = np.zeros(shape, rt.cache_dtype)
            # In 4 KiB pages: each step writes one position in every head of every row, and a transparent huge page
            # (numpy asks for them) would bring in, zeroed, the 2 MiB around the first one written, and first wait for
            # the kernel to compact memory into one. Measured: 4 beams of gpt2-large int8 after 32 tokens, the first
            # token in 84-103 ms against 74-325, decoding as fast; a server's cache (gpt2 int8, 16 rows at the whole
            # context), an 8-token prompt pass brought in 1 MiB in 8 ms against its row's whole context, 72 MiB in 65-128.
            small_pages(self.array.ctypes.data, self.array.nbytes)
            self.buffer = rt.ort.OrtValue.ortvalue_from_numpy(self.array)
        else:
            with rt.exclusive():  # with CUDA graphs, no device work while another thread captures
                self.buffer = rt.ort.OrtValue.ortvalue_from_shape_and_type(shape, rt.cache_dtype, rt.device, 0)
                rt.zero(self.buffer)
        self.lengths = np.zeros(rows, dtype=np.int64)  # positions written, per row
        self.adapters: list[Adapter | None] = [None] * rows  # each row's LoRA adapter
        self._steps: dict[int, DecodeStep] = {}  # by how many leading rows a decode runs (a batcher's rows come and go)
        # Contrastive search's: prefill keeps each prompt's hidden states (every position's), and decode_hidden reads the
        # last step's; others leave the prompts' unbound, as large as the prompts' pass
        self.keep_hidden = False
        self.prompt_hidden: list[np.ndarray] = []
        self._last_step: DecodeStep | None = None

    def layers(self) -> np.ndarray:
        """The CPU buffer as (layer's key or value in past_names' order, row, head, position, head size)."""
        return self.array.reshape(-1, *self.shape)

    def address(self, layer: int, row: int = 0) -> int:
        """Where row `row` of past_names[layer] starts in the buffer."""
        return self.buffer.data_ptr() + (layer * self.rows + row) * self.row_bytes

    def prefill(self, prompts: list[list[int]], rows: list[int] | None = None, start: int = 0) -> np.ndarray:
        """Write prompt i into row rows[i] (by default row i) from position `start` (a batcher writes a long prompt
        in parts, after what the row holds); the last position's scores of each prompt. One pass per run of
        prompts of equal length in neighbouring rows."""
        rows = list(range(len(prompts))) if rows is None else rows
        scores = np.empty((len(prompts), self.runtime.vocab_size), np.float32)
        self.prompt_hidden = []
        first = 0
        while first < len(prompts):
            n, stop = len(prompts[first]), first + 1
            while stop < len(prompts) and len(prompts[stop]) == n and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            ids = np.asarray(prompts[first:stop], dtype=np.int64)
            positions = np.broadcast_to(np.arange(start, start + n), ids.shape)
            seqlens = np.full(stop - first, start + n - 1, dtype=np.int32)
            with self.runtime.exclusive():
                scores[first:stop] = self._run(ids, positions, rows[first], rows[first] + stop - first, seqlens, start + n,
                                               hidden=self.keep_hidden)
            first = stop
        self.lengths[rows] = [start + len(p) for p in prompts]
        return scores

    def spread(self, repeat: int) -> None:
        """The first rows // repeat rows hold as many prompts' passes: each becomes `repeat` neighbouring rows (row i
        takes row i // repeat). A prompt's beams or return sequences thus share one pass (4 beams after a 512-token
        prompt: a call 2.5x faster, benchmarks/results/beam-prompt.md)."""
        self.reorder(np.repeat(np.arange(self.rows // repeat), repeat))

    def decode(self, tokens: np.ndarray, advance: np.ndarray | None = None) -> np.ndarray:
        """One token for each of the first len(tokens) rows, written at the row's own length. Rows where `advance`
        is False (a batcher's free rows, and rows whose prompt is still being written) keep their length: what
        their token wrote there is overwritten by their next write."""
        n = len(tokens)
        lengths = self.lengths[:n]  # a view: the increment below lands in self.lengths
        step = self._steps.get(n)
        if step is None:
            if not self.runtime.cuda_graph:  # binding again is cheap; a captured graph is not, and onnxruntime keeps it anyway
                self._steps.clear()
            step = self._steps[n] = DecodeStep(self, n)
        self._last_step = step
        with self.runtime.exclusive():
            scores = step.run(tokens.reshape(-1, 1).astype(np.int64), lengths.reshape(-1, 1), lengths.astype(np.int32),
                              int(lengths.max()) + 1, self.adapters[:n])
        lengths[advance if advance is not None else slice(None)] += 1
        return scores

    def decode_hidden(self) -> np.ndarray:
        """The last decode's hidden states, (rows, n_embd) float32 (the graph's LAST_HIDDEN_STATE)."""
        assert self._last_step is not None and self._last_step.hidden is not None, "a decode of a graph with hidden states first"
        return self._last_step.hidden.numpy()[:, -1, :].astype(np.float32)

    def append(self, tokens: list[int]) -> np.ndarray:
        """Write `tokens` after what row 0 holds, in one pass; each one's scores, (len(tokens), vocab) float32.
        A step with guesses runs its token and the guesses this way, then sets `lengths` back past the guesses
        that did not hold: what lies past a row's length is never read, and the next write overwrites it. A draft
        model catches up with the text this way too (assistant.py)."""
        start, n = int(self.lengths[0]), len(tokens)
        every = self.runtime.ort.OrtValue.ortvalue_from_numpy(np.arange(n, dtype=np.int64))
        with self.runtime.exclusive():
            scores = self._run(np.asarray([tokens], dtype=np.int64), np.arange(start, start + n)[None], 0, 1,
                               np.array([start + n - 1], dtype=np.int32), start + n, every)
        self.lengths[0] = start + n
        return scores[0].astype(np.float32, copy=False)

    def copy_positions(self, source: InPlaceCache, positions: int, row: int = 0, source_row: int = 0) -> None:
        """Row `row` takes the first `positions` positions of `source`'s row `source_row`, every layer's, and that
        length (CPU buffers: the prompt cache moves kept rows in and out this way)."""
        self.layers()[:, row, :, :positions] = source.layers()[:, source_row, :, :positions]
        self.lengths[row] = positions
        self.adapters[row] = source.adapters[source_row]

    def clear(self, rows: list[int]) -> None:
        """Rows that no call uses any more: empty again, and on the CPU their memory goes back to the system (it
        reads as zeros after, as a new buffer's does), so that a long call's positions are not held after it."""
        self.lengths[rows] = 0
        for row in rows:
            self.adapters[row] = None
        if self.runtime.device == "cpu":
            for layer in range(len(self.runtime.past_names)):
                for row in rows:
                    give_back(self.address(layer, row), self.row_bytes)

    def _run(self, ids: np.ndarray, positions: np.ndarray, start: int, stop: int, seqlens: np.ndarray, total: int,
             keep: Any = None, hidden: bool = False) -> np.ndarray:
        """Rows start:stop (their slice of every buffer, bound as past and as present: the same memory). With
        CUDA graphs, under runtime.exclusive(): binding copies the inputs to the device. `hidden`: each row's hidden
        states go to prompt_hidden too."""
        rt = self.runtime
        io = rt.session.io_binding()
        io.bind_cpu_input(INPUT_IDS, ids)
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(positions))
        io.bind_cpu_input(SEQLENS_K, seqlens)
        io.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(total, dtype=np.int32))
        io.bind_ortvalue_input(LOGITS_TO_KEEP, keep if keep is not None else rt.keep_last)
        lora = bind_lora(rt, io, self.adapters[start:stop])  # noqa: F841  (held until the run is over)
        shape = [stop - start, *self.shape[1:]]
        for layer, (past, present) in enumerate(zip(rt.past_names, rt.present_names)):
            pointer = self.address(layer, start)
            io.bind_input(past, rt.device, 0, rt.cache_dtype, shape, pointer)
            io.bind_output(present, rt.device, 0, rt.cache_dtype, shape, pointer)
        io.bind_output(LOGITS, "cpu")
        if hidden:
            io.bind_output(LAST_HIDDEN_STATE, "cpu")
        rt.run(io)
        outputs = io.get_outputs()  # in the order bound: the presents, the logits, the hidden states
        if hidden:
            self.prompt_hidden += list(outputs[-1].numpy().astype(np.float32))
        logits = outputs[len(rt.present_names)].numpy()
        return logits if keep is not None else logits[:, -1, :].astype(np.float32, copy=False)

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits of a prompt pass over equal-length rows (scoring text, not generating)."""
        n = ids.shape[1]
        seqlens = np.full(len(ids), n - 1, dtype=np.int32)
        every = self.runtime.ort.OrtValue.ortvalue_from_numpy(np.arange(n, dtype=np.int64))
        with self.runtime.exclusive():
            return self._run(ids, np.broadcast_to(np.arange(n), ids.shape), 0, len(ids), seqlens, n, every)

    def reorder(self, source: np.ndarray, alike: np.ndarray | None = None) -> None:
        """Copy only the rows that change, within the buffers, and on the CPU only their written positions past the
        first alike[i], which row i already holds as row source[i] does (Rows.alike: beams that share their first
        tokens; None: nothing, as for a row moved into a cleared one when the batcher moves rows down)."""
        moved = np.flatnonzero(source != np.arange(self.rows))
        if moved.size:
            n = int(self.lengths[source[moved]].max())  # past its source's length a moved row is never read
            if self.runtime.device == "cpu":
                layers, starts = self.layers(), np.zeros(len(moved), np.int64) if alike is None else alike[moved]
                groups = [(moved[starts == start], start) for start in np.unique(starts).tolist()]
                # Every right side is gathered before anything is written: safe when rows swap
                copies = [(rows, start, layers[:, source[rows], :, start:n]) for rows, start in groups]
                for rows, start, values in copies:
                    layers[:, rows, :, start:n] = values
            else:  # row r of layer l is row l x rows + r of the buffer
                every = (np.arange(len(self.runtime.past_names))[:, None] * self.rows + source).reshape(-1)
                with self.runtime.exclusive():
                    self.runtime.move_rows(self.buffer, every)
            self.lengths = self.lengths[source]
            self.adapters = [self.adapters[s] for s in source.tolist()]


class DecodeStep:
    """The decode step's IO binding over a cache's first `rows` rows, made once per cache and row count: the
    inputs live in small buffers that each step overwrites, and the cache buffers and the logits stay bound
    where they are. That saves binding every layer's key and value at every step, and it is what a CUDA graph
    needs (`cuda_graph=True`): onnxruntime captures the step once and then replays it as one launch, which
    requires every input and output at a fixed address with fixed shapes; total_sequence_length is then the
    capacity (each row's length is in seqlens_k), where otherwise it is the longest row's. It holds the cache's
    addresses, not the cache: a step that held its cache, which holds its steps, kept the buffer alive after the
    call until Python's cycle collector ran, and later calls' buffers came beside it (gpt2-large at batch 8 x 512,
    1,800 MiB a cache: five such calls left 10,423 MiB resident instead of 4,062)."""

    def __init__(self, cache: InPlaceCache, rows: int) -> None:
        rt = self.runtime = cache.runtime
        self.lora: tuple[Adapter | None, ...] | None = None  # the rows' adapters bound (run binds them when they change)
        self.lora_feeds: dict[str, np.ndarray] = {}  # and their arrays, held while bound
        ort = rt.ort
        shape = (rows, *cache.shape[1:])
        self.ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, 1), np.int64), rt.device, 0)
        self.positions = ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, 1), np.int64), rt.device, 0)
        self.seqlens = ort.OrtValue.ortvalue_from_numpy(np.zeros(rows, np.int32), rt.device, 0)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((rows, 1, rt.vocab_size), rt.logits_dtype, rt.device, 0)
        # Bound wherever the graph has them (a step's are n_embd numbers a row, which the head reads anyway), so that a
        # cache's steps serve contrastive search and the rest alike (CUDA graphs' caches go from call to call)
        self.hidden = (None if rt.hidden_dtype is None else
                       ort.OrtValue.ortvalue_from_shape_and_type((rows, 1, rt.n_embd), rt.hidden_dtype, rt.device, 0))
        self.io = io = rt.session.io_binding()
        io.bind_ortvalue_input(INPUT_IDS, self.ids)
        io.bind_ortvalue_input(POSITION_IDS, self.positions)
        io.bind_ortvalue_input(SEQLENS_K, self.seqlens)
        io.bind_ortvalue_input(LOGITS_TO_KEEP, rt.keep_last)
        for layer, (past, present) in enumerate(zip(rt.past_names, rt.present_names)):
            io.bind_input(past, rt.device, 0, rt.cache_dtype, shape, cache.address(layer))
            io.bind_output(present, rt.device, 0, rt.cache_dtype, shape, cache.address(layer))
        io.bind_ortvalue_output(LOGITS, self.logits)
        if self.hidden is not None:
            io.bind_ortvalue_output(LAST_HIDDEN_STATE, self.hidden)
        self.options = rt.step_options()
        if rt.cuda_graph:
            io.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(cache.capacity, dtype=np.int32))

    def run(self, ids: np.ndarray, positions: np.ndarray, seqlens: np.ndarray, total: int, adapters: list[Adapter | None]) -> np.ndarray:
        """One step of the rows; `adapters`: each row's LoRA adapter (the cache's, which reorders move)."""
        if self.runtime.lora is not None and tuple(adapters) != self.lora:  # a graph without LoRA inputs pays nothing here
            self.lora = tuple(adapters)
            self.lora_feeds = bind_lora(self.runtime, self.io, self.lora)
        self.ids.update_inplace(ids)
        self.positions.update_inplace(np.ascontiguousarray(positions))
        self.seqlens.update_inplace(seqlens)
        if not self.runtime.cuda_graph:
            self.io.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(total, dtype=np.int32))
        else:
            # The copies above go through CUDA's default stream and may still be in flight when they return; a
            # captured step replays on onnxruntime's own stream, which does not wait for it. Reading a value
            # back waits for them.
            self.seqlens.numpy()
        self.runtime.run(self.io, self.options)
        scores = self.logits.numpy()[:, -1, :]  # from CUDA, a copy; on the CPU, the buffer the next step overwrites
        return np.array(scores, dtype=np.float32) if self.runtime.device == "cpu" else scores.astype(np.float32, copy=False)


class GrowingCache:
    def __init__(self, runtime: Runtime, rows: int, pad_id: int) -> None:
        self.runtime, self.rows, self.pad_id = runtime, rows, pad_id
        empty = np.zeros((rows, runtime.n_head, 0, runtime.head_dim), dtype=runtime.cache_dtype)
        self.values: list[Any] = [runtime.ort.OrtValue.ortvalue_from_numpy(empty, runtime.device, 0)] * len(runtime.past_names)
        self.mask = np.zeros((rows, 0), dtype=np.int64)
        self.positions = np.zeros((rows, 1), dtype=np.int64)  # of the last token run
        self._buffers: list[np.ndarray] = []  # reorder's targets, kept across steps (see reorder)
        self.adapters: list[Adapter | None] = [None] * rows  # each row's LoRA adapter

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        ids, self.mask, positions = left_pad(prompts, self.pad_id)
        return self._run(ids, positions)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        column = tokens.reshape(-1, 1).astype(np.int64)
        self.mask = np.concatenate([self.mask, np.ones_like(column)], axis=1)
        return self._run(column, self.positions + 1, self.runtime.step_options())

    def _run(self, ids: np.ndarray, positions: np.ndarray, step: Any = None) -> np.ndarray:
        """A pass over prompts, or with `step` (Runtime.step_options()) a decode step."""
        rt = self.runtime
        io = rt.session.io_binding()
        io.bind_cpu_input(INPUT_IDS, ids)
        io.bind_cpu_input(ATTENTION_MASK, self.mask)
        io.bind_cpu_input(POSITION_IDS, positions)
        io.bind_ortvalue_input(LOGITS_TO_KEEP, rt.keep_last)
        lora = bind_lora(rt, io, self.adapters)  # noqa: F841  (held until the run is over)
        for name, value in zip(rt.past_names, self.values):
            io.bind_ortvalue_input(name, value)
        io.bind_output(LOGITS, "cpu")
        for name in rt.present_names:
            io.bind_output(name, rt.device)
        rt.run(io, step)
        outputs = io.get_outputs()
        self.values, self.positions = outputs[1:], positions[:, -1:]
        return outputs[0].numpy()[:, -1, :].astype(np.float32, copy=False)  # fp16 folders made before their Cast give fp16

    def reorder(self, source: np.ndarray, alike: np.ndarray | None = None) -> None:
        """Select rows, copying the cache once (each step's is a new array: what rows hold alike saves nothing).

        On CUDA a Gather runs on the device (`Runtime.select_rows`). On CPU numpy gathers straight from
        onnxruntime's memory (no `OrtValue.numpy()` copy) into buffers kept from step to step: fresh arrays
        cost a page fault per 4 KB, which for gpt2-large's four beams took four times longer than the copy.
        """
        self.mask, self.positions = self.mask[source], self.positions[source]
        self.adapters = [self.adapters[s] for s in source.tolist()]
        rt = self.runtime
        if rt.device != "cpu":
            self.values = rt.select_rows(self.values, source)
            return
        selected = []
        for i, value in enumerate(self.values):
            shape = value.shape()
            size = int(np.prod(shape))
            raw = (ctypes.c_byte * (size * rt.cache_dtype.itemsize)).from_address(value.data_ptr())
            origin = np.frombuffer(raw, dtype=rt.cache_dtype).reshape(shape)
            if i == len(self._buffers):
                self._buffers.append(np.empty(0, rt.cache_dtype))
            if self._buffers[i].size < size:  # grow ahead, up to the context window: the cache gains a position per step
                self._buffers[i] = np.empty(min(2 * size, size // max(1, shape[2]) * rt.n_positions), rt.cache_dtype)
            target = self._buffers[i][:size].reshape(shape)
            np.take(origin, source, axis=0, out=target, mode="clip")  # mode="clip": "raise" would buffer the output
            selected.append(rt.ort.OrtValue.ortvalue_from_numpy(target))
        self.values = selected

    def all_logits(self, ids: np.ndarray) -> np.ndarray:
        rt = self.runtime
        feed = {INPUT_IDS: ids, ATTENTION_MASK: np.ones_like(ids), POSITION_IDS: np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
                LOGITS_TO_KEEP: np.array([0], dtype=np.int64)}
        empty = np.zeros((ids.shape[0], rt.n_head, 0, rt.head_dim), dtype=rt.cache_dtype)
        feed.update({name: empty for name in rt.past_names})
        if rt.lora is not None:
            feed.update(rt.lora.feeds(tuple(self.adapters)))
        return rt.session.run([LOGITS], feed, rt.pass_options)[0]


def bind_lora(runtime: Runtime, io: Any, adapters: list[Adapter | None] | tuple[Adapter | None, ...]) -> dict[str, np.ndarray]:
    """Bind the LoRA inputs of rows with these adapters, where the graph has them (adapters.py); returns the arrays
    bound, which must outlive the binding (on the CPU onnxruntime reads them where they are)."""
    feeds = runtime.lora.feeds(tuple(adapters)) if runtime.lora is not None else {}
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    return feeds


class SharedRows:
    """Rows of an InPlaceCache that a server's batcher runs for one call (batcher.py): what the call's Rows asks
    of its cache between the batcher's forwards, which is beam search's reorder, done where the rows sit.
    `slots` is the batcher's own list (the cache row of each of the call's rows), which it updates when it moves
    rows."""

    def __init__(self, cache: InPlaceCache, slots: list[int | None]) -> None:
        self.cache, self.slots = cache, slots

    def reorder(self, source: np.ndarray, alike: np.ndarray | None = None) -> None:
        where = np.asarray(self.slots, dtype=np.int64)  # a beam search's rows all run until it ends: no None
        every, held = np.arange(self.cache.rows), np.zeros(self.cache.rows, np.int64)
        every[where] = where[source]
        if alike is not None:
            held[where] = alike
        self.cache.reorder(every, held)


Cache = InPlaceCache | GrowingCache
