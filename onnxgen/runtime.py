"""One onnxruntime session over an exported GPT-2 graph: the provider, the graph's checks, how a run is made.

Every run goes through IO binding (cache.py binds the cache where it lives: host memory on CPU, device
memory on CUDA) and only the last position's logits come back to numpy. The cache's layout (in place or
growing) and element type (float32, or float16 in an fp16 folder) are read from the graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import itertools
import os
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import prepacked
from .adapters import Adapter, Lora
from .cache import Cache, GrowingCache, InPlaceCache
from .errors import ModelFolderError, OptionsError, ProviderError
from .folder import (
    ATTENTION_MASK,
    ELEMENT_TYPES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    ModelFolder,
    past_names,
    present_names,
)
from .manifest import cache_in_place
from .options import is_int
from .pages import page_on_demand

Provider = Literal["cpu", "cuda"]
# Arrays of rows x vocabulary float32 a call holds at its peak: onnxruntime's head output and the logits it returns, their
# float32 copy, the filters' copies, the sampling weights. Measured (10,000 rows of the bundled model, peak RSS): greedy
# 6.2, sampling 6.8, top-p 7.8, top-k + top-p 8.8, beam search 3.5 (of its rows).
SCORE_COPIES = 10

ONNXRUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
# Gather(cache, rows) on axis 0 and Identity, one graph per cache type (made by graph.select_rows_model and
# graph.copy_model): beam search moves the rows of a CUDA cache with them, on the device. ConstantOfShape
# (graph.zeros_model) zeroes a new CUDA cache there.
SELECT_ROWS = {np.dtype(np.float32): "select_rows_float32.onnx", np.dtype(np.float16): "select_rows_float16.onnx"}
COPY = {np.dtype(np.float32): "copy_float32.onnx", np.dtype(np.float16): "copy_float16.onnx"}
ZEROS = {np.dtype(np.float32): "zeros_float32.onnx", np.dtype(np.float16): "zeros_float16.onnx"}
TOP_K = "top_k.onnx"  # beam search's selections, on the host (graph.top_k_model)
GRAPHS = Path(__file__).parent / "graphs"
CUDA_OPTIONS = {"use_tf32": "0"}  # the CUDA provider's options for every session (see Runtime.__init__)
IDLE_CACHE_BYTES = 2 << 30  # CUDA graphs: finished calls' caches kept for later calls of their shape
MIN_RESUMED = 32  # tokens: a kept cache is taken by a call that starts with at least this many of its tokens


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


def runs_on_cuda(record: dict[str, Any]) -> bool:
    """Whether every node of a folder's graph (its manifest `record`) has a CUDA kernel: GroupQueryAttention, the
    cache in place, has them in float16 only; onnxruntime would run an fp32 one on the CPU, copying every
    layer's activations across each step."""
    return not cache_in_place(record) or record.get("dtype") == "float16"


def available_memory() -> int | None:
    """Bytes that new allocations can take without swapping (Linux's MemAvailable); None where unknown."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)


def _load_cuda_libraries(ort: Any) -> str:
    """Load CUDA and cuDNN from the nvidia-* wheels that onnxgen[gpu] installs (onnxruntime finds a system
    CUDA on the library path by itself, and then this finds it too). onnxruntime prints what failed on
    stdout, where generated text goes: keep it for the error instead."""
    notes = io.StringIO()
    with contextlib.redirect_stdout(notes):
        ort.preload_dlls()
    return f": {notes.getvalue().strip().splitlines()[0]}" if notes.getvalue().strip() else ""


class Runtime:
    """The session over a folder's graph, and what every call's cache shares: names, dims, the small graphs
    that move cache rows on the device. Everything a call changes lives in its cache (cache.py)."""

    def __init__(self, folder: ModelFolder, provider: Provider = "cpu", threads: int | None = None,
                 mapped_weights: bool = False, cuda_graph: bool = False, spinning: bool = True, prompt_cache_mib: int = 0,
                 adapters: dict[str, str | Path] | None = None) -> None:
        ort = import_onnxruntime()
        self.ort = ort
        dims = folder.dims
        self.n_head, self.head_dim, self.n_positions, self.vocab_size = dims.n_head, dims.head_dim, dims.n_positions, dims.vocab_size
        model_path = folder.model_file
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads(threads)
        options.inter_op_num_threads = 1
        if not spinning:  # see load()
            options.add_session_config_entry("session.force_spinning_stop", "1")
        self.spinning = spinning
        options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are noise here
        if not (is_int(prompt_cache_mib) and prompt_cache_mib >= 0):
            raise OptionsError(f"prompt_cache_mib must be a number of MiB >= 0, got {prompt_cache_mib!r}")
        if prompt_cache_mib and provider != "cpu":
            raise OptionsError("prompt_cache_mib is a CPU option (the kept caches are host memory)")
        if prompt_cache_mib and not cache_in_place(folder.manifest):  # refused before a load of GBs
            raise OptionsError(f"prompt_cache_mib needs a folder with the cache in place (the export default); {model_path} "
                               "was exported with --growing-cache")
        if mapped_weights:  # the weights packed for this CPU once, in a file every process maps (prepacked.py)
            if provider != "cpu":
                raise OptionsError("mapped_weights is a CPU option: on CUDA the weights live in GPU memory")
            model_path = prepacked.packed_model(folder, ort, options)
        if cuda_graph and provider != "cuda":
            raise OptionsError("cuda_graph (--cuda-graph) needs the CUDA provider (provider='cuda', --provider cuda)")
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ProviderError("CUDA was requested but this onnxruntime has no CUDA provider: pip install 'onnxgen[gpu]' (and uninstall onnxruntime)")
            if not runs_on_cuda(folder.manifest):
                raise ProviderError(f"{model_path} keeps its cache in place (GroupQueryAttention), which onnxruntime runs on CUDA in "
                                    "float16 only: make an fp16 folder (onnxgen quantize --mode fp16), or export with --growing-cache")
            if cuda_graph and not cache_in_place(folder.manifest):  # refused before a load of GBs
                raise OptionsError(f"cuda_graph needs a folder with the cache in place; {model_path} was exported with --growing-cache")
            # fp32 means fp32, as in PyTorch: onnxruntime's CUDA provider multiplies float32 matrices in TF32 (10-bit
            # mantissas) unless told not to, and greedy text then parts from the CPU's at near-ties.
            providers: list[Any] = [("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]
            library_notes = _load_cuda_libraries(ort)
        elif provider == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ProviderError(f"unknown provider {provider!r}: use 'cpu' or 'cuda'")
        # The model's session alone captures CUDA graphs. The small graphs below never do: a capture replays the
        # addresses it was made with, and they run on new tensors every time.
        model_providers = [("CUDAExecutionProvider", {**CUDA_OPTIONS, "enable_cuda_graph": "1"}), *providers[1:]] if cuda_graph else providers
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=model_providers)
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable models
            raise ModelFolderError(f"cannot load {model_path}: {str(e).splitlines()[0]}") from None
        # The file's pages that stay mapped: read a page at a time (pages.py). Mapped weights are read through
        # at every step, and a page at a time would read a cold file in 4 KiB pieces (gpt2-large int8's first
        # token 11.8 s instead of 1.4 after the page cache was dropped, when they were the unpacked weights):
        # for them only what the load read and decoding does not goes back (gpt2-large int4's peak 820 -> 726 MiB).
        page_on_demand(model_path.with_name(folder.data_file.name), random=not mapped_weights)
        # onnxruntime falls back to CPU silently when CUDA libraries are missing: refuse instead.
        if provider == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise ProviderError("CUDA was requested but onnxruntime could not start it (CUDA/cuDNN libraries missing? "
                                f"onnxgen[gpu] installs them){library_notes}")
        self.device = provider
        self.in_place, self.cache_dtype, self.logits_dtype = self._check_graph(folder)
        # graph.add_hidden_output's, for contrastive search (None: a folder exported before it)
        self.hidden_dtype = next((ELEMENT_TYPES.get(o.type, np.dtype(np.float32)) for o in self.session.get_outputs()
                                  if o.name == LAST_HIDDEN_STATE), None)
        self.n_embd = dims.n_embd
        self._options, self._providers = options, providers  # for the small graphs below, loaded when first used
        self.cuda_graph = cuda_graph
        self.lora = self._lora(folder, adapters or {})
        self._graph_ids = itertools.count(1)
        self.pass_options = self._prompt_pass_options()  # the run options of a pass over prompts (not a decode step)
        self._step_options = self._graph_options(-1)  # a decode step's without CUDA graphs
        # With CUDA graphs, all device work goes one call at a time: while onnxruntime captures a step, any other
        # thread's copy or allocation on the device breaks the capture.
        self._lock = threading.RLock()
        self._idle: list[InPlaceCache] = []  # CUDA-graph caches of finished calls, the most recently finished last
        self.prompt_cache_bytes = prompt_cache_mib * 2**20
        self._kept: list[tuple[list[int], InPlaceCache]] = []  # one-row calls' caches and their tokens, the newest last
        self.past_names, self.present_names = past_names(dims.n_layer), present_names(dims.n_layer)
        # logits_to_keep: the last position. A growing graph counts positions (1), and IO binding takes that
        # input, which has a default (graph.add_logits_to_keep), only as an OrtValue; an in-place graph takes
        # their indices ([-1], on the device: a CUDA graph reads nothing from the host).
        last = np.array([-1 if self.in_place else 1], dtype=np.int64)
        self.keep_last = ort.OrtValue.ortvalue_from_numpy(last, provider if self.in_place else "cpu", 0)

    def _check_graph(self, folder: ModelFolder) -> tuple[bool, np.dtype, np.dtype]:
        """The graph's inputs and outputs against the manifest's dims, so a mismatch is a clear error at load
        and not onnxruntime's shape error at the first step; returns whether the cache is in place, the
        cache's element type and the logits'."""
        dims, model_path = folder.dims, folder.model_file
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        types = {i.name: i.type for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        in_place = SEQLENS_K in inputs
        layout = (SEQLENS_K, TOTAL_SEQUENCE_LENGTH) if in_place else (ATTENTION_MASK,)
        past = [name for name in inputs if name.startswith("past_key_values.")]
        missing = [n for n in (INPUT_IDS, POSITION_IDS, *layout) if n not in inputs] + [n for n in [LOGITS] if n not in outputs]
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
        if cache_type not in ELEMENT_TYPES:
            raise ModelFolderError(f"{model_path}: {past_names(1)[0]} is {cache_type}, expected tensor(float), tensor(float16) or tensor(int8)")
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == LOGITS)
        return in_place, ELEMENT_TYPES[cache_type], ELEMENT_TYPES.get(logits_type, np.dtype(np.float32))

    def _lora(self, folder: ModelFolder, adapters: dict[str, str | Path]) -> Lora | None:
        """The graph's LoRA inputs (export --lora) with the adapters loaded for them; None for a graph without."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        shapes = {name: (name.removesuffix("lora_A") + "lora_B", i.shape[1], inputs[name.removesuffix("lora_A") + "lora_B"].shape[2])
                  for name, i in inputs.items() if name.endswith(".lora_A")}
        if not shapes:
            if adapters:
                raise OptionsError(f"{folder.model_file} was exported without --lora: it takes no LoRA adapters (export the base with --lora, "
                                   "or the adapter merged into it)")
            return None
        if adapters:
            self._no_cuda_graph()
        base = (folder.manifest.get("source") or {}).get("weights")  # its weights' fingerprint (export.weights_fingerprint)
        return Lora(self.ort, shapes, ELEMENT_TYPES[inputs[next(iter(shapes))].type], adapters, base)

    def _no_cuda_graph(self) -> None:
        if self.cuda_graph:
            raise OptionsError("cuda_graph with LoRA adapters is not supported: a captured step needs inputs of fixed shapes, and an "
                               "adapter's rank and rows change them")

    def _takes_adapters(self, name: str) -> Lora:
        if self.lora is None:
            raise OptionsError(f"adapter {name!r}: this model takes no LoRA adapters (it was exported without --lora)")
        return self.lora

    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Make the LoRA adapter in `folder` available to later calls as `name`."""
        lora = self._takes_adapters(name)
        self._no_cuda_graph()
        lora.load(name, folder)

    def unload_adapter(self, name: str) -> None:
        """Later calls can no longer name the adapter; calls running with it finish with it."""
        self._takes_adapters(name).unload(name)

    def adapter(self, name: str | None) -> Adapter | None:
        """The loaded adapter a call names (None: none), or an OptionsError."""
        if name is None:
            return None
        if not isinstance(name, str):
            raise OptionsError(f"adapter must be an adapter's name (a string) or None, got {name!r}")
        return self._takes_adapters(name).get(name)

    def new_cache(self, rows: int, capacity: int, pad_id: int = 0, adapter: Adapter | None = None) -> Cache:
        """An empty cache for `rows` rows of up to `capacity` positions (pad_id: a growing cache's padding), each row
        with `adapter` (a loaded LoRA adapter, or None).

        With CUDA graphs, capacities round up to a multiple of 64 and finished calls hand their caches back
        (release): a later call of the same shape replays the graph captured on those buffers instead of
        capturing another one (onnxruntime keeps every graph it has captured)."""
        capacity = self.check_cache(rows, capacity)
        cache: Cache | None = None
        if not self.in_place:
            cache = GrowingCache(self, rows, pad_id)  # it grows a position a step: no capacity to allocate
        elif self.cuda_graph:
            with self._lock:
                found = [i for i, idle in enumerate(self._idle) if (idle.rows, idle.capacity) == (rows, capacity)]
                cache = self._idle.pop(found[-1]) if found else None  # its lengths are the prompts' once prefill runs
        if cache is None:
            cache = InPlaceCache(self, rows, capacity)
        cache.adapters = [adapter] * rows
        return cache

    def check_cache(self, rows: int, capacity: int) -> int:
        """The capacity a new cache gets (with CUDA graphs, a multiple of 64); raises OptionsError where its
        memory is not available (on the CPU: else pages fill as the call runs, until the kernel kills the process)."""
        capacity = min(-(-capacity // 64) * 64 if self.cuda_graph else capacity, self.n_positions)
        # On CUDA the cache is the GPU's (onnxruntime refuses what does not fit there), but the host still holds each
        # row's tokens: what keeps 10**20 beams from being built row by row until the host's memory runs out. Each
        # step's scores are the host's too (SCORE_COPIES: 100,000 rows of the bundled model's 8,192 tokens are 3 GiB an
        # array; unchecked, they ended in a MemoryError mid-step, or in the kernel's kill).
        scores = rows * self.vocab_size * np.dtype(np.float32).itemsize * SCORE_COPIES
        what, need = (("key/value cache and scores", self.cache_bytes(rows, capacity) + scores) if self.device == "cpu" else
                      ("token rows and scores", rows * capacity * np.dtype(np.int64).itemsize + scores))
        free = available_memory()
        if free is not None and need > free:
            raise OptionsError(f"this call's {what} need {need / 2**20:,.0f} MiB ({rows} rows x {capacity} positions), "
                               f"more than the {free / 2**20:,.0f} MiB of memory available: ask for fewer prompts, beams or "
                               "return sequences, or fewer new tokens")
        return capacity

    def cache_bytes(self, rows: int, capacity: int) -> int:
        """What every layer's key and value take for `rows` rows of `capacity` positions."""
        return len(self.past_names) * rows * self.n_head * capacity * self.head_dim * self.cache_dtype.itemsize

    def release(self, cache: Cache, tokens: list[int] | None = None) -> None:
        """A call is over. With CUDA graphs its cache waits for the next call of its shape, the least recently
        finished going first past IDLE_CACHE_BYTES (a server sees many shapes). onnxruntime keeps the graph of
        a cache let go (it has no way to drop one): only its buffer's memory comes back. With a prompt cache, a
        one-row call's cache is kept with `tokens`, those its positions hold, for a later call that starts with
        them (resume), the least recently finished going first past prompt_cache_mib."""
        if tokens is not None and self.keeps(len(tokens)) and isinstance(cache, InPlaceCache):
            with self._lock:
                self._kept.append((tokens, cache))
                while sum(self.cache_bytes(1, len(t)) for t, _ in self._kept) > self.prompt_cache_bytes:
                    self._kept.pop(0)
        elif self.cuda_graph and isinstance(cache, InPlaceCache):
            with self._lock:
                self._idle.append(cache)
                while sum(c.nbytes for c in self._idle) > IDLE_CACHE_BYTES:
                    self._idle.pop(0)

    def keeps(self, positions: int) -> bool:
        """Whether release keeps a one-row cache of `positions` written positions: with a prompt cache, one long
        enough for a later call to take (MIN_RESUMED)."""
        return bool(self.prompt_cache_bytes) and positions >= MIN_RESUMED

    def take_kept(self, prompt: list[int], adapter: Adapter | None = None) -> tuple[InPlaceCache, int] | None:
        """The kept cache (release) made with `adapter` that shares the longest start with `prompt`, and how many of
        the prompt's first tokens it holds: at least MIN_RESUMED and at most all but the prompt's last (whose scores
        the call needs). It leaves the pool: the caller owns it."""
        with self._lock:
            shared = [(_shared_start(tokens, prompt), i) for i, (tokens, cache) in enumerate(self._kept) if cache.adapters[0] is adapter]
            start, i = max(shared, default=(0, -1))
            start = min(start, len(prompt) - 1)
            return (self._kept.pop(i)[1], start) if start >= MIN_RESUMED else None

    def resume(self, prompt: list[int], capacity: int, adapter: Adapter | None = None) -> tuple[InPlaceCache, int] | None:
        """A cache for a one-row call of `prompt` with `adapter` that holds its first tokens already (take_kept), and
        how many: the kept one, or where that is too short for `capacity`, a new one with its shared positions copied."""
        taken = self.take_kept(prompt, adapter)
        if taken is None:
            return None
        kept, start = taken
        capacity = self.check_cache(1, capacity)
        if kept.capacity >= capacity:
            kept.lengths[0] = start  # what lies past is written over by the call's prompt pass
            return kept, start
        cache = InPlaceCache(self, 1, capacity)
        cache.copy_positions(kept, start)
        return cache, start

    def exclusive(self) -> contextlib.AbstractContextManager[Any]:
        """Held around a cache's device work when CUDA graphs are on (see _lock); otherwise nothing."""
        return self._lock if self.cuda_graph else contextlib.nullcontext()

    def run(self, io: Any, step: Any = None) -> None:
        """One run of the model graph (with CUDA graphs, under exclusive()). `step`: a decode step's step_options();
        None: a pass over prompts (or guesses, or text scored), with pass_options."""
        self.session.run_with_iobinding(io, self.pass_options if step is None else step)

    def step_options(self) -> Any:
        """Run options for a cache's decode steps. With CUDA graphs they name a new graph: one per cache, as a
        capture is tied to the addresses of the buffers it was captured with; onnxruntime captures the step once,
        then replays it."""
        return self._graph_options(next(self._graph_ids)) if self.cuda_graph else self._step_options

    def _graph_options(self, graph_id: int) -> Any:
        """Run options naming the CUDA graph a run captures or replays; -1: none. Every run's options name one: onnxruntime's
        Python wrapper (1.31 and 1.32) reads gpu_graph_id at each run_with_iobinding, and options without it cost a
        raised and caught RuntimeError, 24 us (a sixth of the bundled model's decode step)."""
        options = self.ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def _prompt_pass_options(self) -> Any:
        """A pass over prompts is never captured in a CUDA graph. On the CPU, what onnxruntime's memory arena grew by
        for the pass goes back after it: a long prompt's activations would otherwise stay the process's until it
        ended (gpt2-large int8, batch 8 x 512 tokens: 1,661 MiB resident after the call instead of 884; the next long
        pass faults its pages in again, 0-5% of its time: benchmarks/arena.py). Decode steps, which reuse the same
        memory every step, keep theirs."""
        options = self._graph_options(-1)
        if self.device == "cpu" and self._options.enable_cpu_mem_arena:  # (onnxruntime refuses a run that names no arena)
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options

    def all_logits(self, input_ids: np.ndarray, adapter: Adapter | None = None) -> np.ndarray:
        """Logits at every position of `input_ids` (batch, n) with no cache: for scoring text, not generating."""
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1], adapter=adapter)
        return cache.all_logits(np.ascontiguousarray(input_ids, dtype=np.int64)).astype(np.float32, copy=False)

    # Beam search's helpers, each a small graph of onnxgen/graphs: 7-13 ms to load, so not at every load of a model.
    @functools.cached_property
    def _top_k(self) -> Any:
        return self.ort.InferenceSession(str(GRAPHS / TOP_K), self._options, providers=["CPUExecutionProvider"])  # scores are on the host

    @functools.cached_property
    def _select_rows(self) -> Any:
        return self.ort.InferenceSession(str(GRAPHS / SELECT_ROWS[self.cache_dtype]), self._options, providers=self._providers)

    @functools.cached_property
    def _copy(self) -> Any:
        return self.ort.InferenceSession(str(GRAPHS / COPY[self.cache_dtype]), self._options, providers=self._providers)

    @functools.cached_property
    def _zeros(self) -> Any:
        return self.ort.InferenceSession(str(GRAPHS / ZEROS[self.cache_dtype]), self._options, providers=self._providers)

    def top_k(self, scores: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k largest scores of each row, best first (equal scores: the lower index first)."""
        return self._top_k.run(["indices"], {"scores": np.ascontiguousarray(scores, dtype=np.float32),
                                             "k": np.array([k], dtype=np.int64)})[0]

    def select_rows(self, values: list[Any], rows: np.ndarray) -> list[Any]:
        """Select cache rows where the cache lives, through the `select_rows` graph: one small run per
        layer's key and value, the row indices copied to the device once. Returns new tensors."""
        index = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(rows, dtype=np.int64), self.device, 0)
        selected = []
        for value in values:
            io = self._select_rows.io_binding()
            io.bind_ortvalue_input("cache", value)
            io.bind_ortvalue_input("rows", index)
            io.bind_output("selected", self.device)
            self._select_rows.run_with_iobinding(io)
            selected.append(io.get_outputs()[0])
        return selected

    def zero(self, value: Any) -> None:
        """Write zeros over a 4-D tensor of the cache's type where it lives (one fill on the device)."""
        io = self._zeros.io_binding()
        io.bind_cpu_input("shape", np.array(value.shape(), dtype=np.int64))
        io.bind_ortvalue_output("target", value)
        self._zeros.run_with_iobinding(io)

    def move_rows(self, value: Any, rows: np.ndarray) -> None:
        """Row i of the tensor becomes its row rows[i], in place on the device: gathered into a new tensor,
        then copied back (a Gather cannot write over what it reads), so the buffer keeps its address."""
        io = self._copy.io_binding()
        io.bind_ortvalue_input("source", self.select_rows([value], rows)[0])
        io.bind_ortvalue_output("target", value)
        self._copy.run_with_iobinding(io)


def _shared_start(a: list[int], b: list[int]) -> int:
    """How many first tokens two token lists share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n
