"""pages.py: after a load, the model file's pages that onnxruntime keeps mapped are read on demand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import onnxgen
from onnxgen import runtime


def resident_kib(path: Path) -> int:
    """Resident KiB of every mapping of `path` in this process (/proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            current = len(fields) >= 6 and fields[5] == str(path.resolve())
        elif current and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_pages_the_load_read_are_given_back_and_decoding_is_unchanged(quantized_folder, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    folder = quantized_folder("int4")  # MatMulNBits packs its scales yet keeps them mapped: resident after a load
    data = folder / "model.onnx.data"
    with monkeypatch.context() as m:
        m.setattr(runtime, "page_on_demand", lambda path: 0)
        kept = onnxgen.load(folder, threads=1)
    assert resident_kib(data) > 0
    advised = onnxgen.load(folder, threads=1)  # advises every mapping of the file: the first model's too
    assert resident_kib(data) == 0
    prompts = ["It is a truth", "Call me"]
    assert [c.token_ids for c in kept.generate(prompts, max_new_tokens=8)] == [c.token_ids for c in advised.generate(prompts, max_new_tokens=8)]
    assert 0 < resident_kib(data) < data.stat().st_size // 1024  # what decoding read came back, and no more
