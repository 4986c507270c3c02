"""One onnxruntime session over an exported GPT-2 graph, and its key/value cache.

Every run goes through IO binding: the `present.*` outputs stay where onnxruntime put them (host memory
on CPU, device memory on CUDA) and are bound as the next step's `past_key_values.*` inputs as they are,
so the cache is never copied between steps. Only the last position's logits come back to numpy.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ModelFolderError, ProviderError

Provider = Literal["cpu", "cuda"]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ProviderError(
            "onnxruntime is not installed: pip install 'onnxgen[cpu]' (or 'onnxgen[gpu]' for CUDA, never both)"
        ) from None
    return onnxruntime


Cache = list[Any]  # past_key_values for every layer, as OrtValues in the order the graph names them


class Runtime:
    def __init__(self, model_path: Path, dims: dict[str, int], provider: Provider = "cpu", threads: int | None = None) -> None:
        ort = _onnxruntime()
        self.ort = ort
        self.n_layer, self.n_head = dims["n_layer"], dims["n_head"]
        self.head_dim = dims["n_embd"] // dims["n_head"]
        self.n_positions = dims["n_positions"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are noise here
        if provider == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ProviderError("CUDA was requested but this onnxruntime has no CUDA provider: pip install 'onnxgen[gpu]' (and uninstall onnxruntime)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
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
            raise ProviderError("CUDA was requested but onnxruntime could not start it (CUDA/cuDNN libraries missing?)")
        self.device = provider
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(self.n_layer) for kind in ("key", "value")]
        self.present_names = [f"present.{i}.{kind}" for i in range(self.n_layer) for kind in ("key", "value")]
        self._keep_last = np.array([1], dtype=np.int64)
        self.step_ends: list[float] = []  # perf_counter() after each forward, for time-to-first-token and tok/s

    def empty_cache(self, batch: int) -> Cache:
        empty = np.zeros((batch, self.n_head, 0, self.head_dim), dtype=np.float32)
        value = self.ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0)
        return [value] * len(self.past_names)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        """Run new tokens (batch, n) after `cache`; return the last position's logits (batch, vocab) and the new cache."""
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", attention_mask)
        io.bind_cpu_input("position_ids", position_ids)
        io.bind_cpu_input("logits_to_keep", self._keep_last)
        for name, value in zip(self.past_names, cache):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        logits = outputs[0].numpy()[:, -1, :]
        self.step_ends.append(time.perf_counter())
        return logits, outputs[1:]

    def all_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits at every position of `input_ids` (batch, n) with no cache: for scoring text, not generating."""
        feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
                "position_ids": np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape).copy(),
                "logits_to_keep": np.array([0], dtype=np.int64)}
        empty = np.zeros((input_ids.shape[0], self.n_head, 0, self.head_dim), dtype=np.float32)
        feed.update({name: empty for name in self.past_names})
        return self.session.run(["logits"], feed)[0]

    def reorder(self, cache: Cache, rows: np.ndarray, buffers: list[np.ndarray]) -> Cache:
        """Select cache rows (beam search keeps the beams it continues), copying the cache once.

        On CPU numpy gathers straight from onnxruntime's memory (no `OrtValue.numpy()` copy) into
        `buffers`, which the caller keeps from step to step (start with []): fresh arrays cost a page
        fault per 4 KB, which for gpt2-large's four beams took four times longer than the copy itself.
        The returned cache lives in them, so it is valid until the next reorder into the same buffers.
        On CUDA the rows go through the host. The cache is float32 in every variant (fp16 keeps its I/O).
        """
        if self.device != "cpu":
            return [self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows]), self.device, 0) for v in cache]
        selected = []
        for i, value in enumerate(cache):
            shape = value.shape()
            size = int(np.prod(shape))
            source = np.ctypeslib.as_array((ctypes.c_float * size).from_address(value.data_ptr())).reshape(shape)
            if i == len(buffers):
                buffers.append(np.empty(0, np.float32))
            if buffers[i].size < size:  # grow ahead, up to the context window: the cache gains a position per step
                buffers[i] = np.empty(min(2 * size, size // max(1, shape[2]) * self.n_positions), np.float32)
            target = buffers[i][:size].reshape(shape)
            np.take(source, rows, axis=0, out=target, mode="clip")  # mode="clip": "raise" would buffer the output
            selected.append(self.ort.OrtValue.ortvalue_from_numpy(target))
        return selected
