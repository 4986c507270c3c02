"""The weights packed once for this machine, in a file that every process maps (load's `mapped_weights`).

onnxruntime packs each weight into its CPU kernels' layout at every load, into memory private to the process:
N processes that load one folder hold N copies. An optimized model saved with
`session.save_external_prepacked_constant_initializers` keeps the packed weights in its external data file,
and a session over it maps them instead of packing: the processes share one copy (the file's page cache),
which the kernel can also reclaim under pressure, and decode at the packed kernels' full speed.

The packing is specific to onnxruntime's version and to the CPU's instruction set, so the copy cannot ship with
a folder: it is made on the machine that uses it, at the first such load, into a cache folder named after the
folder's files (their sha256 in the manifest), onnxruntime's version and the CPU. $ONNXGEN_CACHE, else
$XDG_CACHE_HOME/onnxgen, else ~/.cache/onnxgen holds them, under prepacked/. A copy is kept only once its
logits match the folder's for a short prompt; a new copy of a folder replaces the one made from its earlier
files on the same machine and onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import check_disk
from .errors import OnnxgenError, OptionsError
from .folder import (
    ATTENTION_MASK,
    DATA_FILE,
    ELEMENT_TYPES,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    MODEL_FILE,
    POSITION_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    ModelFolder,
)

SOURCE = "source.json"  # in each copy: what it was packed from (the folder, its files, onnxruntime, the CPU)


def cache_root() -> Path:
    if os.environ.get("ONNXGEN_CACHE"):
        return Path(os.environ["ONNXGEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxgen"


def cpu() -> str:
    """The processor as the packing sees it: its architecture and instruction-set flags (Linux), else its name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    flags = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {' '.join(sorted(flags.split()))}"


def _key(folder: ModelFolder, ort: Any) -> dict[str, Any]:
    """What a packed copy depends on: the folder's files, onnxruntime's version and the CPU."""
    files = folder.manifest.get("files", {})
    return {"files": {name: files.get(name, {}).get("sha256") for name in (MODEL_FILE, DATA_FILE)},
            "onnxruntime": ort.__version__, "cpu": cpu()}


def location(folder: ModelFolder, ort: Any) -> Path:
    """Where this machine keeps the folder's packed copy."""
    return cache_root() / "prepacked" / hashlib.sha256(json.dumps(_key(folder, ort), sort_keys=True).encode()).hexdigest()[:32]


def packed_model(folder: ModelFolder, ort: Any, options: Any) -> Path:
    """The model file of the folder's packed copy, made first if this machine has none.
    `options`: the session's, whose graph optimizations the copy is saved with (its graph is the one the
    session would run)."""
    out = location(folder, ort)
    if (out / MODEL_FILE).is_file() and (out / DATA_FILE).is_file():
        return out / MODEL_FILE
    try:
        import fcntl  # here: `import onnxgen` works where there is none
    except ImportError:
        raise OptionsError("mapped_weights needs POSIX file locks (Linux, macOS)") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = (out.parent / f".{out.name}.lock").open("w")
    except OSError as e:
        raise OnnxgenError(f"cannot make the packed copy of {folder.path} in {out.parent} ({e.strerror or e}): "
                           "set ONNXGEN_CACHE to a writable folder") from None
    with lock:
        # Replicas that start together on a new machine: one packs, the others wait for its copy and map it
        # (each packing at once would take each its own memory and disk). The lock goes with its process.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MODEL_FILE).is_file():
            # Holding the lock, no one else is making this copy: a partial one is what a killed process left.
            for partial in out.parent.glob(f".{out.name}.partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
            _make(folder, ort, options, out)
            _remove_outdated(folder, ort, out)
    return out / MODEL_FILE


def _remove_outdated(folder: ModelFolder, ort: Any, new: Path) -> None:
    """Copies packed earlier from the same folder, for this CPU and onnxruntime, from files it no longer holds (it was
    exported or quantized again): none can be mapped again, and each is the size of the weights twice. Copies for
    another CPU (a home folder shared across machines) or another onnxruntime (another environment) stay."""
    mine = _record(folder, ort)
    for entry in new.parent.iterdir():
        try:
            made = json.loads((entry / SOURCE).read_text())
        except (OSError, ValueError):  # a lock file, a partial copy, or a copy made before copies said where they came from
            continue
        if entry != new and isinstance(made, dict) and all(made.get(k) == mine[k] for k in ("folder", "onnxruntime", "cpu")):
            shutil.rmtree(entry, ignore_errors=True)


def _record(folder: ModelFolder, ort: Any) -> dict[str, Any]:
    return {**_key(folder, ort), "folder": str(folder.path.resolve())}


def _make(folder: ModelFolder, ort: Any, options: Any, out: Path) -> None:
    check_disk(out, 2 * folder.weight_bytes + (64 << 20))  # the weights as they are, and packed (about their size again)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        build = ort.SessionOptions()
        build.graph_optimization_level = options.graph_optimization_level
        build.intra_op_num_threads = options.intra_op_num_threads
        build.log_severity_level = 3
        build.optimized_model_filepath = str(work / MODEL_FILE)
        build.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
        build.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        build.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        packing = ort.InferenceSession(str(folder.model_file), build, providers=["CPUExecutionProvider"])  # packs, then saves
        # A copy is kept only if it reproduces the folder: onnxruntime 1.31 saves int4 (MatMulNBits) weights that
        # decode to garbage. The two sessions one after the other: never two models in memory at once.
        feed = _probe(packing, folder)
        expected = packing.run([LOGITS], feed)[0].astype(np.float32)
        del packing
        check = ort.SessionOptions()
        check.intra_op_num_threads, check.log_severity_level = options.intra_op_num_threads, 3
        got = ort.InferenceSession(str(work / MODEL_FILE), check, providers=["CPUExecutionProvider"]).run([LOGITS], feed)[0]
        if not np.allclose(got.astype(np.float32), expected, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(expected).max()))):
            raise OnnxgenError(f"onnxruntime {ort.__version__} packs {folder.path} into a copy that does not reproduce its "
                               "outputs (a known fault of onnxruntime 1.31 with int4 folders): mapped_weights cannot be used "
                               "with it here; load without it, or use onnxruntime 1.32")
        (work / SOURCE).write_text(json.dumps(_record(folder, ort), indent=1) + "\n")
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _probe(session: Any, folder: ModelFolder) -> dict[str, np.ndarray]:
    """A prompt pass over 5 tokens for any graph onnxgen makes (the cache in place or growing)."""
    n, dims = 5, folder.dims
    names = {value.name for value in session.get_inputs()}
    feed: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        if value.name == INPUT_IDS:
            feed[value.name] = (np.arange(n, dtype=np.int64) * 7919 % dims.vocab_size).reshape(1, n)
        elif value.name == POSITION_IDS:
            feed[value.name] = np.arange(n, dtype=np.int64).reshape(1, n)
        elif value.name == ATTENTION_MASK:
            feed[value.name] = np.ones((1, n), np.int64)
        elif value.name == SEQLENS_K:
            feed[value.name] = np.array([n - 1], np.int32)
        elif value.name == TOTAL_SEQUENCE_LENGTH:
            feed[value.name] = np.array(n, np.int32)
        elif value.name == LOGITS_TO_KEEP:  # the first position or every one, by the graph's kind: both sessions alike
            feed[value.name] = np.array([0], np.int64)
        elif value.name.endswith(".lora_A"):  # a LoRA base's inputs (graph.add_lora): no adapter, rank 0
            feed[value.name] = np.zeros((1, value.shape[1], 0), ELEMENT_TYPES[value.type])
        elif value.name.endswith(".lora_B"):
            feed[value.name] = np.zeros((1, 0, value.shape[2]), ELEMENT_TYPES[value.type])
        else:  # a layer's past: empty for a growing cache, a buffer of n positions for one in place
            feed[value.name] = np.zeros((1, dims.n_head, n if SEQLENS_K in names else 0, dims.head_dim), ELEMENT_TYPES[value.type])
    return feed
