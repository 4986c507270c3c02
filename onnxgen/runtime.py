"""One onnxruntime session over an exported GPT-2 graph, and its key/value cache.

Every run goes through IO binding: the `present.*` outputs stay where onnxruntime put them (host memory
on CPU, device memory on CUDA) and are bound as the next step's `past_key_values.*` inputs as they are,
so the cache is never copied between steps. Only the last position's logits come back to numpy. The
cache's element type is the graph's own (float32, or float16 in an fp16 folder).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ModelFolderError, OptionsError, ProviderError
from .folder import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS, ModelFolder, past_names, present_names

Provider = Literal["cpu", "cuda"]

ONNXRUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
# Gather(cache, rows) on axis 0, one graph per cache type (made by graph.select_rows_model): beam search
# reorders a CUDA cache with it, on the device.
SELECT_ROWS = {np.dtype(np.float32): "select_rows_float32.onnx", np.dtype(np.float16): "select_rows_float16.onnx"}
GRAPHS = Path(__file__).parent / "graphs"
_ELEMENT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


def onnxruntime_conflict(path: list[str] | None = None) -> str | None:
    """A message if onnxruntime and onnxruntime-gpu are installed into one folder: the folder `onnxruntime` is
    imported from (or any folder of `path`). Both unpack into `onnxruntime/`, so whichever was installed last
    has overwritten the other's files. The two in different folders (one shadowing the other) work."""
    if path is None:
        spec = importlib.util.find_spec("onnxruntime")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        path = [str(Path(next(iter(spec.submodule_search_locations))).parent)]
    for folder in path:
        if not os.path.isdir(folder):
            continue
        installed = {entry.name.split("-")[0].lower().replace("_", "-") for entry in os.scandir(folder) if entry.name.endswith(".dist-info")}
        if set(ONNXRUNTIME_PACKAGES) <= installed:
            return (f"onnxruntime and onnxruntime-gpu are both installed in {folder} and overwrite each other: "
                    "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'onnxgen[gpu]' (or 'onnxgen[cpu]')")
    return None


def import_onnxruntime() -> Any:
    """onnxruntime, or a ProviderError naming the fix when it is missing or broken by its GPU twin."""
    conflict = onnxruntime_conflict()
    if conflict:
        raise ProviderError(conflict)
    try:
        import onnxruntime
    except ImportError:
        raise ProviderError(
            "onnxruntime is not installed: pip install 'onnxgen[cpu]' (or 'onnxgen[gpu]' for CUDA, never both)"
        ) from None
    return onnxruntime


def _threads(threads: int | None) -> int:
    """onnxruntime's intra-op threads: all cores by default. Far more threads than cores only slows a step,
    and a huge count makes session creation hang for minutes."""
    cores = os.cpu_count() or 1
    if threads is None:
        return cores
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or not 1 <= threads <= 4 * cores:
        raise OptionsError(f"threads must be an integer from 1 to {4 * cores} (4 x this machine's {cores} cores), got {threads!r}")
    return int(threads)


def _load_cuda_libraries(ort: Any) -> str:
    """Load CUDA and cuDNN from the nvidia-* wheels that onnxgen[gpu] installs (onnxruntime finds a system
    CUDA on the library path by itself, and then this finds it too). onnxruntime prints what failed on
    stdout, where generated text goes: keep it for the error instead."""
    notes = io.StringIO()
    with contextlib.redirect_stdout(notes):
        ort.preload_dlls()
    return f": {notes.getvalue().strip().splitlines()[0]}" if notes.getvalue().strip() else ""


Cache = list[Any]  # past_key_values for every layer, as OrtValues in the order the graph names them


class Runtime:
    def __init__(self, folder: ModelFolder, provider: Provider = "cpu", threads: int | None = None) -> None:
        ort = import_onnxruntime()
        self.ort = ort
        self.n_head, self.head_dim, self.n_positions = folder.dims.n_head, folder.dims.head_dim, folder.dims.n_positions
        model_path = folder.model_file
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are noise here
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ProviderError("CUDA was requested but this onnxruntime has no CUDA provider: pip install 'onnxgen[gpu]' (and uninstall onnxruntime)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            library_notes = _load_cuda_libraries(ort)
        elif provider == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ProviderError(f"unknown provider {provider!r}: use 'cpu' or 'cuda'")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
            raise ModelFolderError(f"cannot load {model_path}: {str(e).splitlines()[0]}") from None
        # onnxruntime falls back to CPU silently when CUDA libraries are missing: refuse instead.
        if provider == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise ProviderError("CUDA was requested but onnxruntime could not start it (CUDA/cuDNN libraries missing? "
                                f"onnxgen[gpu] installs them){library_notes}")
        self.device = provider
        self.cache_dtype = self._check_graph(folder)
        # Beam search's reorder on CUDA, on the device (see reorder); a few milliseconds to load.
        self._select_rows = ort.InferenceSession(str(GRAPHS / SELECT_ROWS[self.cache_dtype]), options, providers=providers)
        self.past_names, self.present_names = past_names(folder.dims.n_layer), present_names(folder.dims.n_layer)
        # logits_to_keep has a default (graph.add_logits_to_keep), and IO binding takes an input with a
        # default only as an OrtValue.
        self._keep_last = ort.OrtValue.ortvalue_from_numpy(np.array([1], dtype=np.int64))

    def _check_graph(self, folder: ModelFolder) -> np.dtype:
        """The graph's inputs and outputs against the manifest's dims, so a mismatch is a clear error at load
        and not onnxruntime's shape error at the first step; returns the cache's element type."""
        dims, model_path = folder.dims, folder.model_file
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        types = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        past = [name for name in inputs if name.startswith("past_key_values.")]
        missing = [n for n in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS) if n not in inputs] + [n for n in [LOGITS] if n not in outputs]
        if missing:
            raise ModelFolderError(f"{model_path} lacks {', '.join(missing)}: not a graph onnxgen made")
        if sorted(past) != sorted(past_names(dims.n_layer)):
            raise ModelFolderError(f"{model_path} has {len(past) // 2} layers of cache, the manifest says n_layer {dims.n_layer}")
        shape = inputs[past_names(1)[0]]  # (batch, heads, positions, head size); a name where a size is symbolic
        if (isinstance(shape[1], int) and shape[1] != dims.n_head) or (isinstance(shape[3], int) and shape[3] != dims.head_dim):
            raise ModelFolderError(f"{model_path} has {shape[1]} heads of {shape[3]}, the manifest says n_head {dims.n_head} "
                                   f"of {dims.head_dim} (n_embd {dims.n_embd})")
        if isinstance(outputs[LOGITS][-1], int) and outputs[LOGITS][-1] != dims.vocab_size:
            raise ModelFolderError(f"{model_path} scores {outputs[LOGITS][-1]} tokens, the manifest says vocab_size {dims.vocab_size}")
        cache_type = types[past_names(1)[0]]
        if cache_type not in _ELEMENT_TYPES:
            raise ModelFolderError(f"{model_path}: {past_names(1)[0]} is {cache_type}, expected tensor(float) or tensor(float16)")
        return _ELEMENT_TYPES[cache_type]

    def empty_cache(self, batch: int) -> Cache:
        empty = np.zeros((batch, self.n_head, 0, self.head_dim), dtype=self.cache_dtype)
        value = self.ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0)
        return [value] * len(self.past_names)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        """Run new tokens (batch, n) after `cache`; return the last position's logits (batch, vocab) and the new cache."""
        io = self.session.io_binding()
        io.bind_cpu_input(INPUT_IDS, input_ids)
        io.bind_cpu_input(ATTENTION_MASK, attention_mask)
        io.bind_cpu_input(POSITION_IDS, position_ids)
        io.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_last)
        for name, value in zip(self.past_names, cache):
            io.bind_ortvalue_input(name, value)
        io.bind_output(LOGITS, "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        logits = outputs[0].numpy()[:, -1, :].astype(np.float32, copy=False)  # an fp16 graph's logits are fp16
        return logits, outputs[1:]

    def all_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits at every position of `input_ids` (batch, n) with no cache: for scoring text, not generating."""
        feed = {INPUT_IDS: input_ids, ATTENTION_MASK: np.ones_like(input_ids),
                POSITION_IDS: np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape).copy(),
                LOGITS_TO_KEEP: np.array([0], dtype=np.int64)}
        empty = np.zeros((input_ids.shape[0], self.n_head, 0, self.head_dim), dtype=self.cache_dtype)
        feed.update({name: empty for name in self.past_names})
        return self.session.run([LOGITS], feed)[0].astype(np.float32, copy=False)

    def reorder(self, cache: Cache, rows: np.ndarray, buffers: list[np.ndarray]) -> Cache:
        """Select cache rows (beam search keeps the beams it continues), copying the cache once.

        On CUDA a Gather runs on the device (`select_rows`). On CPU numpy gathers straight from
        onnxruntime's memory (no `OrtValue.numpy()` copy) into `buffers`, which the caller keeps from step
        to step (start with []): fresh arrays cost a page fault per 4 KB, which for gpt2-large's four beams
        took four times longer than the copy itself. The returned cache lives in them, so it is valid until
        the next reorder into the same buffers.
        """
        if self.device != "cpu":
            return self.select_rows(cache, rows)
        selected = []
        for i, value in enumerate(cache):
            shape = value.shape()
            size = int(np.prod(shape))
            raw = (ctypes.c_byte * (size * self.cache_dtype.itemsize)).from_address(value.data_ptr())
            source = np.frombuffer(raw, dtype=self.cache_dtype).reshape(shape)
            if i == len(buffers):
                buffers.append(np.empty(0, self.cache_dtype))
            if buffers[i].size < size:  # grow ahead, up to the context window: the cache gains a position per step
                buffers[i] = np.empty(min(2 * size, size // max(1, shape[2]) * self.n_positions), self.cache_dtype)
            target = buffers[i][:size].reshape(shape)
            np.take(source, rows, axis=0, out=target, mode="clip")  # mode="clip": "raise" would buffer the output
            selected.append(self.ort.OrtValue.ortvalue_from_numpy(target))
        return selected

    def select_rows(self, cache: Cache, rows: np.ndarray) -> Cache:
        """Select cache rows where the cache lives, through the `select_rows` graph: one small run per
        layer's key and value, the row indices copied to the device once."""
        index = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(rows, dtype=np.int64), self.device, 0)
        selected = []
        for value in cache:
            io = self._select_rows.io_binding()
            io.bind_ortvalue_input("cache", value)
            io.bind_ortvalue_input("rows", index)
            io.bind_output("selected", self.device)
            self._select_rows.run_with_iobinding(io)
            selected.append(io.get_outputs()[0])
        return selected
