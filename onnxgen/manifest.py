"""`onnxgen.json`: what a model folder holds, where it came from, and how it was checked.

The runtime reads it to find the graph's dimensions without opening the ONNX file; export and
quantize write it last, so a folder without one is never mistaken for a finished model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelFolderError

MANIFEST = "onnxgen.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    import hashlib  # here, not at import: hashlib maps OpenSSL's libcrypto (3 MiB resident), which only hashing needs

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_in_place(record: dict[str, Any]) -> bool:
    """Whether a folder's graph (its manifest `record`) keeps the key/value cache in place (export's default)
    rather than growing it a position a step (`--growing-cache`)."""
    return bool(record.get("graph", {}).get("cache_in_place"))


def verify(folder: Path, manifest: dict[str, Any]) -> None:
    """Hash every file and compare with the manifest (a few seconds a GB): corrupted weights that still parse would
    otherwise give wrong text without an error."""
    for name, described in manifest["files"].items():
        if sha256(folder / name) != described.get("sha256"):
            raise ModelFolderError(f"{folder / name} does not match its sha256 in the manifest: the file is corrupted or was replaced")


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Describe the folder's files (sizes, sha256) into `manifest` and save it; returns what was saved."""
    manifest = {"format_version": FORMAT_VERSION, **manifest, "files": describe_files(folder)}
    save(folder, manifest)
    return manifest


def save(folder: Path, manifest: dict[str, Any]) -> None:
    """Save a manifest as it is, for a change that leaves the files alone."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if folder.is_file():  # model.onnx or onnxgen.json given for the folder that holds it
        raise ModelFolderError(f"{folder} is a file, not a model folder"
                               + (f": give its folder, {folder.parent}" if (folder.parent / MANIFEST).is_file() else ""))
    if not folder.is_dir():
        named = str(folder)
        hub_id = not named.startswith((".", "/", "~")) and named.count("/") <= 1  # gpt2, openai-community/gpt2-large
        raise ModelFolderError(f"model folder not found: {folder}" + (f" (a hub id? `onnxgen export {named} -o {folder.name}-onnx` "
                                                                       "makes its folder)" if hub_id else ""))
    if not path.is_file():
        if (folder / "model.onnx").is_file():  # optimum's export, say: onnxgen's graph edits and checks are not in it
            raise ModelFolderError(f"{folder} holds an ONNX model but no {MANIFEST}: onnxgen runs the folders its own export "
                                   "makes; export the checkpoint with `onnxgen export`")
        if (folder / "config.json").is_file():  # the transformers checkpoint itself
            raise ModelFolderError(f"{folder} is a transformers checkpoint, not an onnxgen model folder: export it first, "
                                   f"`onnxgen export {folder} -o {folder.name}-onnx`")
        raise ModelFolderError(f"{folder} is not an onnxgen model folder (no {MANIFEST}); make one with `onnxgen export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    missing = [name for name in manifest.get("files", {}) if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"{folder} is incomplete: missing {', '.join(missing)}")
    return manifest
