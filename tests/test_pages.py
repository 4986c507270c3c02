"""Where the model file's pages live: read on demand after a load (pages.py), and with mapped_weights, the weights
packed once for this machine in a file that every process maps (prepacked.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import onnxgen
from onnxgen import pages, prepacked, runtime
from onnxgen.cache import InPlaceCache
from onnxgen.errors import OnnxgenError, OptionsError
from onnxgen.folder import ModelFolder


def resident_kib(path: Path) -> int:
    """Resident KiB of every mapping of `path` in this process."""
    return sum(kib["Rss"] for _, _, kib in pages.mappings(path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_pages_the_load_read_are_given_back_and_decoding_is_unchanged(quantized_folder, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    folder = quantized_folder("int4")  # MatMulNBits packs its scales yet keeps them mapped: resident after a load
    data = folder / "model.onnx.data"
    with monkeypatch.context() as m:
        m.setattr(runtime, "page_on_demand", lambda path, random: 0)
        kept = onnxgen.load(folder, threads=1)
    assert resident_kib(data) > 0
    advised = onnxgen.load(folder, threads=1)  # advises every mapping of the file: the first model's too
    assert resident_kib(data) == 0
    prompts = ["It is a truth", "Call me"]
    assert [c.token_ids for c in kept.generate(prompts, max_new_tokens=8)] == [c.token_ids for c in advised.generate(prompts, max_new_tokens=8)]
    assert 0 < resident_kib(data) < data.stat().st_size // 1024  # what decoding read came back, and no more


# -- mapped_weights: the weights packed once for this CPU, in a file every process maps (prepacked.py) --------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
@pytest.mark.parametrize("mode", ["fp32", "int8", "int4"])
def test_mapped_weights_are_packed_in_a_file_and_decode_the_same(exported: Path, quantized_folder, mode: str) -> None:  # type: ignore[no-untyped-def]
    source = exported if mode == "fp32" else quantized_folder(mode)
    ort = runtime.import_onnxruntime()
    if mode == "int4" and ort.__version__.startswith("1.31."):  # its saved MatMulNBits weights decode to garbage
        with pytest.raises(OnnxgenError, match="does not reproduce"):
            onnxgen.load(source, threads=1, mapped_weights=True)
        assert not prepacked.location(ModelFolder.read(source), ort).exists()
        return
    prompts = ["It is a truth", "Call me"]
    calls = [dict(max_new_tokens=8), dict(max_new_tokens=8, do_sample=True, top_p=0.9, seed=3), dict(max_new_tokens=6, num_beams=3)]
    default = onnxgen.load(source, threads=1)
    shared = onnxgen.load(source, threads=1, mapped_weights=True)
    for options in calls:
        assert [c.token_ids for c in default.generate(prompts, **options)] == [c.token_ids for c in shared.generate(prompts, **options)]
    copy = prepacked.location(shared.folder, ort) / "model.onnx.data"
    # The copy holds the weights as they are and as the kernels packed them; what the process holds of the packed
    # ones is the copy's page cache (shareable, reclaimable), not memory of its own.
    assert copy.stat().st_size > 1.5 * (source / "model.onnx.data").stat().st_size
    assert resident_kib(copy) > 0.6 * (source / "model.onnx.data").stat().st_size // 1024


def test_the_packed_copy_is_made_once_per_machine_and_onnxruntime(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path))
    folder = ModelFolder.read(exported)
    ort = runtime.import_onnxruntime()
    made: list[str] = []
    session = ort.InferenceSession

    def counting(path: str, options: object = None, **kwargs: object) -> object:
        made.append(path)
        return session(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    with ThreadPoolExecutor(2) as pool:  # two loads at once: one packs (and checks its copy), the other waits for it
        first, second = pool.map(lambda _: prepacked.packed_model(folder, ort, ort.SessionOptions()), range(2))
    assert first == second and first.parent.is_dir()
    assert len(made) == 2 and made[0] == str(exported / "model.onnx")
    assert [p.name for p in first.parent.parent.iterdir() if ".partial-" in p.name] == []
    shutil.rmtree(first.parent)  # then a process killed while it packed leaves its partial copy: the next one removes it
    killed = first.parent.parent / f".{first.parent.name}.partial-killed"
    (killed / "model.onnx.data").parent.mkdir()
    (killed / "model.onnx.data").write_bytes(b"half")
    made.clear()
    assert prepacked.packed_model(folder, ort, ort.SessionOptions()) == first and not killed.exists()
    assert [p.name for p in first.parent.parent.iterdir() if ".partial-" in p.name] == []
    packs = len(made)
    assert prepacked.packed_model(folder, ort, ort.SessionOptions()) == first and len(made) == packs  # the next load maps it
    monkeypatch.setattr(prepacked, "cpu", lambda: "another instruction set")
    assert prepacked.location(folder, ort) != first.parent  # packed for another CPU: a copy of its own


def test_a_folder_packed_again_replaces_its_outdated_copy(exported: Path, quantized_folder, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder exported or quantized again at the same path: its new copy replaces the one made from its earlier
    files (each copy is the weights twice over); the copies of other folders, CPUs and onnxruntimes stay."""
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path / "cache"))
    ort = runtime.import_onnxruntime()
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    first = prepacked.packed_model(ModelFolder.read(folder), ort, ort.SessionOptions()).parent
    other = prepacked.packed_model(ModelFolder.read(quantized_folder("int8")), ort, ort.SessionOptions()).parent
    elsewhere = first.with_name("packed-on-another-cpu")  # what another machine sharing this home folder made
    shutil.copytree(first, elsewhere)
    record = json.loads((elsewhere / prepacked.SOURCE).read_text())
    (elsewhere / prepacked.SOURCE).write_text(json.dumps({**record, "cpu": "another instruction set"}))
    shutil.rmtree(folder)
    shutil.copytree(quantized_folder("int8", per_channel=True), folder)  # quantized again, into the same folder
    second = prepacked.packed_model(ModelFolder.read(folder), ort, ort.SessionOptions()).parent
    assert second not in (first, other) and not first.exists() and other.exists() and elsewhere.exists()
    assert json.loads((second / prepacked.SOURCE).read_text())["folder"] == str(folder.resolve())


def test_a_copy_that_does_not_reproduce_its_folder_is_refused_and_not_kept(exported: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXGEN_CACHE", str(tmp_path))
    ort = runtime.import_onnxruntime()
    session = ort.InferenceSession

    class Corrupted:  # the copy's session, its logits off by one
        def __init__(self, path: str, *args: object, **kwargs: object) -> None:
            self.inner = session(path, *args, **kwargs)
            self.get_inputs = self.inner.get_inputs

        def run(self, names: list[str], feed: dict[str, object]) -> list[object]:
            return [out + 1 for out in self.inner.run(names, feed)]

    monkeypatch.setattr(ort, "InferenceSession", lambda path, *a, **k: (Corrupted if ".partial-" in path else session)(path, *a, **k))
    with pytest.raises(OnnxgenError, match="does not reproduce"):
        onnxgen.load(exported, threads=1, mapped_weights=True)
    assert [p.name for p in (tmp_path / "prepacked").iterdir() if not p.name.endswith(".lock")] == []


def test_mapped_weights_are_not_read_a_page_at_a_time(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every step reads mapped weights through: MADV_RANDOM would read a cold file in 4 KiB pieces (README).
    advised: list[tuple[Path, bool]] = []
    monkeypatch.setattr(runtime, "page_on_demand", lambda path, random: advised.append((path, random)) or 0)
    shared = onnxgen.load(exported, threads=1, mapped_weights=True)
    assert advised == [(prepacked.location(shared.folder, runtime.import_onnxruntime()) / "model.onnx.data", False)]
    onnxgen.load(exported, threads=1)
    assert advised[1:] == [(exported / "model.onnx.data", True)]


def test_mapped_weights_errors(quantized_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionsError, match="CPU option"):
        onnxgen.load(quantized_folder("int8"), provider="cuda", mapped_weights=True)  # refused before CUDA is looked for
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("ONNXGEN_CACHE", str(blocked))
    with pytest.raises(OnnxgenError, match="ONNXGEN_CACHE"):
        onnxgen.load(quantized_folder("int8"), mapped_weights=True)


def test_cli_mapped_weights(quantized_folder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    int8 = quantized_folder("int8")
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is", "-m", str(int8), "--mapped-weights", "--strategy", "greedy",
                        "--max-new-tokens", "4", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = onnxgen.load(int8).generate("It is", max_new_tokens=4, do_sample=False, num_beams=1)[0].token_ids
    assert json.loads(r.stdout)["completions"][0]["token_ids"] == expected
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is", "-m", str(int8), "--mapped-weights"],
                       capture_output=True, text=True, env={**os.environ, "ONNXGEN_CACHE": str(blocked)})
    assert r.returncode == 1 and r.stderr.startswith("onnxgen: error: ") and r.stderr.count("\n") == 1 and "ONNXGEN_CACHE" in r.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="madvise(2) and /proc/self/smaps are Linux's")
def test_a_key_value_cache_is_kept_in_small_pages(model: onnxgen.Model) -> None:
    """Every CPU cache (a call's own, a server's) is advised out of transparent huge pages (MADV_NOHUGEPAGE: smaps'
    VmFlags "nh"), which would zero 2 MiB around each position first written (cache.py)."""
    cache = model.runtime.new_cache(16, 128)
    assert isinstance(cache, InPlaceCache) and cache.array.nbytes >= 2**20
    page = os.sysconf("SC_PAGE_SIZE")  # madvise takes whole pages: the buffer's first and last may be shared
    start = -(-cache.array.ctypes.data // page) * page
    end = (cache.array.ctypes.data + cache.array.nbytes) // page * page
    flags: list[list[str]] = []  # VmFlags of each mapping that overlaps the buffer's whole pages
    overlaps = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            overlaps = low < end and high > start
        elif overlaps and fields and fields[0] == "VmFlags:":
            flags.append(fields[1:])
    assert flags and all("nh" in f for f in flags), flags
