"""LoRA adapters at run time: one loaded model, many fine-tunes, each row of a batch with its own.

A model exported with `--lora` adds x @ A @ B to each layer's c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj output,
A and B graph inputs (graph.add_lora). An adapter folder (`onnxgen export ADAPTER --lora`) holds a PEFT LoRA
adapter's A and B by those inputs' names, its scale in B, in onnxruntime's adapter format. `Lora` reads the adapters
a model is loaded with and makes what a run binds for its rows: each row's A and B, or, where every row has the same
adapter (or none), one (1, in, rank) A and one B that onnxruntime's MatMul broadcasts over the rows. A row without an
adapter, or an adapter without that layer, gets rank 0 there: the term adds nothing and costs next to nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import manifest
from .errors import ModelFolderError, OptionsError
from .folder import ADAPTER_FILE

FEEDS_KEPT = 16  # combinations of rows' adapters whose inputs are kept made (a batcher's rows change now and then)


class Lora:
    """The graph's LoRA inputs (`shapes`: A's name -> (B's name, in, out)) and the adapters loaded for them, by name."""

    def __init__(self, ort: Any, shapes: dict[str, tuple[str, int, int]], dtype: np.dtype, adapters: dict[str, str | Path]) -> None:
        self.shapes, self.dtype = shapes, dtype
        if not isinstance(adapters, dict) or not all(isinstance(k, str) and k and isinstance(v, (str, Path)) for k, v in adapters.items()):
            raise OptionsError(f"adapters must be a dict of name to adapter folder, got {adapters!r}")
        self.adapters = {name: self._read(ort, name, Path(path)) for name, path in adapters.items()}
        self.folders = {name: Path(path) for name, path in adapters.items()}
        self._feeds: dict[tuple[str | None, ...], dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()  # calls in several threads share the made inputs

    def _read(self, ort: Any, name: str, path: Path) -> dict[str, np.ndarray]:
        """An adapter folder's A and B by input name, in the graph's element type, checked against the graph."""
        try:
            record = manifest.read(path)
        except ModelFolderError as e:
            raise ModelFolderError(f"adapter {name!r}: {e}") from None
        if record.get("kind") != "lora":
            raise ModelFolderError(f"adapter {name!r}: {path} is not a LoRA adapter folder (`onnxgen export ADAPTER --lora` makes one)")
        try:
            parameters = ort.AdapterFormat.read_adapter(str(path / ADAPTER_FILE)).get_parameters()
        except Exception as e:  # onnxruntime's own errors for a damaged file
            raise ModelFolderError(f"adapter {name!r}: cannot read {path / ADAPTER_FILE}: {str(e).splitlines()[0]}") from None
        weights = {key: np.array(value.numpy(), dtype=self.dtype) for key, value in parameters.items()}
        b_names = {b: a for a, (b, _, _) in self.shapes.items()}
        for key, value in weights.items():
            a = key if key in self.shapes else b_names.get(key)
            if a is None:
                raise ModelFolderError(f"adapter {name!r} ({path}) has {key}, which this model's graph does not take: an adapter of "
                                       "another model (its layers differ)")
            b, n_in, n_out = self.shapes[a]
            rank = weights[a].shape[1] if a in weights else -1
            want = (n_in, rank) if key == a else (rank, n_out)
            if value.shape != want or b not in weights:
                raise ModelFolderError(f"adapter {name!r} ({path}): {key} is {value.shape}, this model takes {want}: an adapter of "
                                       "another model (its sizes differ)")
        return weights

    def feeds(self, rows: tuple[str | None, ...]) -> dict[str, np.ndarray]:
        """Every LoRA input for rows with these adapters (None: none), in row order."""
        with self._lock:
            feeds = self._feeds.get(rows)
            if feeds is None:
                if len(self._feeds) >= FEEDS_KEPT:  # the oldest goes; a run that bound it holds its own reference
                    self._feeds.pop(next(iter(self._feeds)))
                feeds = self._feeds[rows] = self._make(rows)
            return feeds

    def _make(self, rows: tuple[str | None, ...]) -> dict[str, np.ndarray]:
        names = sorted(set(rows), key=str)
        alike = len(names) == 1  # one adapter for every row: (1, ...) inputs, broadcast over the rows
        feeds = {}
        for a, (b, n_in, n_out) in self.shapes.items():
            held = [self.adapters[name] for name in names if name is not None and a in self.adapters[name]]
            rank = max((weights[a].shape[1] for weights in held), default=0)
            if alike:
                feeds[a] = held[0][a][None] if held else np.zeros((1, n_in, 0), self.dtype)
                feeds[b] = held[0][b][None] if held else np.zeros((1, 0, n_out), self.dtype)
                continue
            feeds[a], feeds[b] = np.zeros((len(rows), n_in, rank), self.dtype), np.zeros((len(rows), rank, n_out), self.dtype)
            for row, name in enumerate(rows):
                weights = self.adapters[name] if name is not None else {}
                if a in weights:
                    r = weights[a].shape[1]
                    feeds[a][row, :, :r], feeds[b][row, :r] = weights[a], weights[b]
        return feeds

    def check(self, name: str | None) -> None:
        """An OptionsError unless `name` is None or a loaded adapter's name."""
        if name is not None and name not in self.adapters:
            loaded = ", ".join(map(repr, self.adapters)) or "none"
            raise OptionsError(f"adapter {name!r} is not loaded (loaded: {loaded})")


def named(specs: list[str]) -> dict[str, Path]:
    """Adapters as a command line gives them, `NAME=FOLDER` or `FOLDER` (named after the folder), by name."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=")
        name = name or Path(folder).name
        if not folder or not name or name in adapters:
            raise OptionsError(f"adapter {spec!r}: give NAME=FOLDER or FOLDER, each name once")
        adapters[name] = Path(folder)
    return adapters
