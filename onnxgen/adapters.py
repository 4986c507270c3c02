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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import manifest
from .errors import AdapterWarning, ModelFolderError, OptionsError
from .folder import ADAPTER_FILE

FEEDS_KEPT = 16  # combinations of rows' adapters whose inputs are kept made (a batcher's rows change now and then)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: an adapter loaded again under its name is another
class Adapter:
    """A loaded adapter: what a row runs with. A row keeps its Adapter while it runs, so unloading the name (or loading
    it again) changes later calls only, and a prompt cache's kept rows match only the very adapter they were made with."""

    name: str
    folder: Path
    weights: dict[str, np.ndarray]  # graph input name -> A (in, rank) or B (rank, out), in the graph's element type


class Lora:
    """The graph's LoRA inputs (`shapes`: A's name -> (B's name, in, out)) and the adapters loaded for them, by name;
    `base`: the fingerprint of the model's weights (its manifest's), which each adapter's record of its base should match."""

    def __init__(self, ort: Any, shapes: dict[str, tuple[str, int, int]], dtype: np.dtype, adapters: dict[str, str | Path],
                 base: str | None = None) -> None:
        self.ort, self.shapes, self.dtype, self.base = ort, shapes, dtype, base
        if not isinstance(adapters, dict):
            raise OptionsError(f"adapters must be a dict of name to adapter folder, got {adapters!r}")
        self._lock = threading.Lock()  # calls in several threads share the adapters and the made inputs
        self.adapters: dict[str, Adapter] = {}
        self._feeds: dict[tuple[Adapter | None, ...], dict[str, np.ndarray]] = {}
        for name, folder in adapters.items():
            self.load(name, folder)

    def load(self, name: str, folder: str | Path) -> Adapter:
        """Read an adapter folder and make it available as `name` (which must be new)."""
        if not (isinstance(name, str) and name and isinstance(folder, (str, Path))):
            raise OptionsError(f"an adapter is a name (a string) and a folder, got {name!r}: {folder!r}")
        adapter = Adapter(name, Path(folder), self._read(name, Path(folder)))
        with self._lock:
            if name in self.adapters:
                raise OptionsError(f"adapter {name!r} is loaded already (unload it first)")
            self.adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> None:
        """Later calls can no longer name it; calls running with it finish with it."""
        with self._lock:
            if self.adapters.pop(name, None) is None:
                raise OptionsError(f"adapter {name!r} is not loaded")
            self._feeds = {rows: feeds for rows, feeds in self._feeds.items() if all(a is None or a.name != name for a in rows)}

    def folders(self) -> dict[str, Path]:
        """The loaded adapters' folders by name, as they are now (another thread may load or unload one meanwhile)."""
        with self._lock:
            return {name: adapter.folder for name, adapter in self.adapters.items()}

    def get(self, name: str | None) -> Adapter | None:
        """The loaded adapter called `name` (None: none), or an OptionsError naming those loaded."""
        if name is None:
            return None
        with self._lock:
            adapter = self.adapters.get(name)
            if adapter is None:
                raise OptionsError(f"adapter {name!r} is not loaded (loaded: {', '.join(map(repr, self.adapters)) or 'none'})")
            return adapter

    def _read(self, name: str, path: Path) -> dict[str, np.ndarray]:
        """An adapter folder's A and B by input name, in the graph's element type, checked against the graph."""
        try:
            record = manifest.read(path)
        except ModelFolderError as e:
            raise ModelFolderError(f"adapter {name!r}: {e}") from None
        if record.get("kind") != "lora":
            raise ModelFolderError(f"adapter {name!r}: {path} is not a LoRA adapter folder (`onnxgen export ADAPTER --lora` makes one)")
        try:
            parameters = self.ort.AdapterFormat.read_adapter(str(path / ADAPTER_FILE)).get_parameters()
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
        trained_on = (record.get("source") or {}).get("base") or {}  # warned of once it loads: a refusal says enough
        if self.base and trained_on.get("weights") and trained_on["weights"] != self.base:  # where both were recorded
            warnings.warn(f"adapter {name!r} was trained on {trained_on.get('model')!r}, whose weights are not this model's: its "
                          "changes were learned against other weights (load it beside the base it names)", AdapterWarning, stacklevel=4)
        return weights

    def feeds(self, rows: tuple[Adapter | None, ...]) -> dict[str, np.ndarray]:
        """Every LoRA input for rows with these adapters (None: none), in row order."""
        with self._lock:
            feeds = self._feeds.get(rows)
            if feeds is None:
                if len(self._feeds) >= FEEDS_KEPT:  # the oldest goes; a run that bound it holds its own reference
                    self._feeds.pop(next(iter(self._feeds)))
                feeds = self._feeds[rows] = self._make(rows)
            return feeds

    def _make(self, rows: tuple[Adapter | None, ...]) -> dict[str, np.ndarray]:
        held = list(dict.fromkeys(a for a in rows if a is not None))
        alike = len(set(rows)) == 1  # one adapter (or none) for every row: (1, ...) inputs, broadcast over the rows
        feeds = {}
        for a, (b, n_in, n_out) in self.shapes.items():
            rank = max((adapter.weights[a].shape[1] for adapter in held if a in adapter.weights), default=0)
            if alike:
                weights = held[0].weights if held else {}
                feeds[a] = weights[a][None] if a in weights else np.zeros((1, n_in, 0), self.dtype)
                feeds[b] = weights[b][None] if a in weights else np.zeros((1, 0, n_out), self.dtype)
                continue
            feeds[a], feeds[b] = np.zeros((len(rows), n_in, rank), self.dtype), np.zeros((len(rows), rank, n_out), self.dtype)
            for row, adapter in enumerate(rows):
                if adapter is not None and a in adapter.weights:
                    r = adapter.weights[a].shape[1]
                    feeds[a][row, :, :r], feeds[b][row, :r] = adapter.weights[a], adapter.weights[b]
        return feeds


def check_folder(folder: Path) -> None:
    """An adapter folder's files against its manifest (sizes, sha256), and onnxruntime's reading of its weights."""
    from .runtime import import_onnxruntime

    manifest.verify(folder, manifest.read(folder))
    try:
        import_onnxruntime().AdapterFormat.read_adapter(str(folder / ADAPTER_FILE)).get_parameters()
    except Exception as e:  # onnxruntime's own errors for a damaged file
        raise ModelFolderError(f"cannot read {folder / ADAPTER_FILE}: {str(e).splitlines()[0]}") from None


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
