"""Where the model file's pages live: read on demand after a load (pages.py), and with mapped_weights, the weights
read in place from the mapped file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import onnxgen
from onnxgen import pages, runtime
from onnxgen.errors import OptionsError


def resident_kib(path: Path) -> int:
    """Resident KiB of every mapping of `path` in this process."""
    return sum(kib["Rss"] for _, _, kib in pages.mappings(path))


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


# -- mapped_weights: the weights read in place from the mapped file, shared between processes ----------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_mapped_weights_stay_in_the_file_and_decode_the_same(exported: Path, quantized_folder, tmp_path: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    source = exported if mode == "fp32" else quantized_folder("int8")
    packed, mapped = tmp_path / "packed", tmp_path / "mapped"  # two copies: each model's mappings are told apart by path
    shutil.copytree(source, packed)
    shutil.copytree(source, mapped)
    prompts = ["It is a truth", "Call me"]
    calls = [dict(max_new_tokens=8), dict(max_new_tokens=8, do_sample=True, top_p=0.9, seed=3), dict(max_new_tokens=6, num_beams=3)]
    default = onnxgen.load(packed, threads=1)
    shared = onnxgen.load(mapped, threads=1, mapped_weights=True)
    for options in calls:
        assert [c.token_ids for c in default.generate(prompts, **options)] == [c.token_ids for c in shared.generate(prompts, **options)]
    weights_kib = (mapped / "model.onnx.data").stat().st_size // 1024
    # What decoding read stays page cache of the file (shareable, reclaimable): every layer's weights and the head
    # (the embedding rows of the tokens seen besides); the packed model reads only embedding rows from its file.
    assert resident_kib(mapped / "model.onnx.data") > 0.6 * weights_kib
    assert resident_kib(packed / "model.onnx.data") < 0.4 * weights_kib


def test_mapped_weights_are_not_read_a_page_at_a_time(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every step reads mapped weights through: MADV_RANDOM would read a cold file in 4 KiB pieces (README).
    advised: list[Path] = []
    monkeypatch.setattr(runtime, "page_on_demand", lambda path: advised.append(path) or 0)
    onnxgen.load(exported, threads=1, mapped_weights=True)
    assert advised == []
    onnxgen.load(exported, threads=1)
    assert advised == [exported / "model.onnx.data"]


def test_mapped_weights_are_refused_where_they_cannot_apply(quantized_folder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionsError, match="int4"):
        onnxgen.load(quantized_folder("int4"), mapped_weights=True)
    with pytest.raises(OptionsError, match="CPU option"):
        onnxgen.load(quantized_folder("int8"), provider="cuda", mapped_weights=True)  # refused before CUDA is looked for
    with pytest.raises(OptionsError, match="model.onnx.data"):
        onnxgen.load(None, mapped_weights=True)  # the bundled model is one file


def test_cli_mapped_weights(quantized_folder) -> None:  # type: ignore[no-untyped-def]
    int8 = quantized_folder("int8")
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is", "-m", str(int8), "--mapped-weights", "--strategy", "greedy",
                        "--max-new-tokens", "4", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = onnxgen.load(int8).generate("It is", max_new_tokens=4, do_sample=False, num_beams=1)[0].token_ids
    assert json.loads(r.stdout)["completions"][0]["token_ids"] == expected
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is", "-m", str(quantized_folder("int4")), "--mapped-weights"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("onnxgen: error: ") and r.stderr.count("\n") == 1 and "int4" in r.stderr
