"""A folder's graph replaced in place, checked first: what the scripts that convert the shipped folder share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from onnxgen import manifest
from onnxgen.export import io_names
from onnxgen.folder import MODEL_FILE


def replace_graph(folder: Path, model: onnx.ModelProto, check: Callable[[Path], str], graph_record: dict[str, Any] | None = None) -> str:
    """Write `model` as the graph of a scratch copy of `folder`, its manifest's inputs, outputs and `graph_record`
    updated; `check(copy)` says how the copy compares (raising SystemExit refuses it); then the graph and the manifest
    go into `folder`. Weights inside model.onnx stay inside, a data file's stay in it (load the model without them)."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / folder.name
        shutil.copytree(folder, work)
        onnx.save_model(model, str(work / MODEL_FILE))
        record = manifest.read(folder)
        record["graph"] |= graph_record or {}
        record["inputs"], record["outputs"] = io_names(work / MODEL_FILE)
        manifest.write(work, {k: v for k, v in record.items() if k not in ("format_version", "files")})
        summary = check(work)
        for name in (MODEL_FILE, manifest.MANIFEST):
            shutil.copyfile(work / name, folder / name)
    return summary
