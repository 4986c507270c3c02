"""The extras a user types resolve to exactly one onnxruntime package, and a broken install is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import onnxgen
from onnxgen.errors import ProviderError
from onnxgen.runtime import onnxruntime_conflict

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("extras", "expected"), [
    ("cpu", {"onnxruntime"}), ("gpu", {"onnxruntime-gpu"}),
    ("cpu,export", {"onnxruntime"}), ("gpu,export", {"onnxruntime-gpu"}),
    ("export", set()),  # export needs cpu or gpu beside it; the CLI says so
    ("gpu,export,bench,serve,ray,test", {"onnxruntime-gpu"}),  # the README's GPU install line
])
def test_extras_resolve_to_one_onnxruntime(extras: str, expected: set[str], tmp_path: Path) -> None:
    """pip's resolver on the real index (as a user's `pip install ".[gpu,export]"`), nothing installed."""
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), f"{ROOT}[{extras}]"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert names & {"onnxruntime", "onnxruntime-gpu"} == expected


def _dist_info(folder: Path, name: str, version: str) -> None:
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_both_onnxruntimes_in_one_folder_are_refused(tmp_path: Path) -> None:
    _dist_info(tmp_path / "site", "onnxruntime", "1.32.0")
    _dist_info(tmp_path / "site", "onnxruntime-gpu", "1.31.1")
    message = onnxruntime_conflict([str(tmp_path / "site")])
    assert message and "overwrite each other" in message and "pip uninstall -y onnxruntime onnxruntime-gpu" in message
    # One shadowing the other from another folder (a --target install on PYTHONPATH) is a working install.
    _dist_info(tmp_path / "gpu", "onnxruntime-gpu", "1.31.1")
    _dist_info(tmp_path / "cpu", "onnxruntime", "1.32.0")
    assert onnxruntime_conflict([str(tmp_path / "gpu"), str(tmp_path / "cpu")]) is None
    assert onnxruntime_conflict(None) is None  # this environment: one onnxruntime
    # By default the folder onnxruntime is imported from is the one looked at: a broken one first on the path.
    (tmp_path / "site" / "onnxruntime").mkdir()
    (tmp_path / "site" / "onnxruntime" / "__init__.py").write_text("")
    code = "from onnxgen.runtime import onnxruntime_conflict; print(onnxruntime_conflict())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert "overwrite each other" in r.stdout, r.stderr


def test_missing_onnxruntime_names_the_fix(exported: Path) -> None:
    code = (
        "import sys, onnxgen\n"
        "sys.modules['onnxruntime'] = None  # as if not installed: import raises ImportError\n"
        "try:\n"
        f"    onnxgen.load({str(exported)!r})\n"
        "except onnxgen.ProviderError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "pip install 'onnxgen[cpu]'" in r.stdout, r.stderr
    assert issubclass(ProviderError, onnxgen.OnnxgenError)
