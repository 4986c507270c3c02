"""The benchmark harnesses run and write well-formed output (a benchmark is not a unit test: no timings are asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_onnxgen_bench_json(exported: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "onnxgen", "bench", "--model", str(exported), "--batch", "1", "--batch", "2",
                        "--strategy", "greedy", "--strategy", "beam", "--new-tokens", "5", "--runs", "2", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [(c["batch"], c["strategy"]) for c in result["cases"]] == [(1, "greedy"), (1, "beam"), (2, "greedy"), (2, "beam")]
    for c in result["cases"]:
        assert 0 < c["decode_tokens_per_s"]["min"] <= c["decode_tokens_per_s"]["median"] <= c["decode_tokens_per_s"]["max"]
        assert c["time_to_first_token_ms"]["median"] > 0
    assert result["load_s"] > 0 and result["model_file_mb"] > 0
    # every case reports its own peak against the file; the whole run's peak is the largest of them and the load's
    for c in result["cases"]:
        assert c["peak_rss_over_model_file"] == pytest.approx(c["peak_rss_mb"] / result["model_file_mb"]) and c["peak_rss_mb"] > 0
    assert result["peak_rss_mb"] == max(result["load_peak_rss_mb"], *(c["peak_rss_mb"] for c in result["cases"]))
    assert result["peak_rss_over_model_file"] == pytest.approx(result["peak_rss_mb"] / result["model_file_mb"])
    assert result["mapped_weights"] is False
    from onnxgen.bench import machine

    assert result["machine"] == machine()
    r = subprocess.run([sys.executable, "-m", "onnxgen", "bench", "--model", str(exported), "--new-tokens", "3", "--runs", "1",
                        "--mapped-weights", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mapped_weights"] is True
    r = subprocess.run([sys.executable, "-m", "onnxgen", "bench", "--model", str(exported), "--prompt-tokens", "200"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "context window" in r.stderr


def test_onnxgen_bench_table_keeps_its_figures_whole_in_a_file(exported: Path) -> None:
    """Redirected to a file (not a terminal), the table is not cut to 80 columns: each figure and its range whole."""
    r = subprocess.run([sys.executable, "-m", "onnxgen", "bench", "--model", str(exported), "--new-tokens", "3", "--runs", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert len(re.findall(r"\d+\.\d \(\d+\.\d-\d+\.\d\)", row)) == 2 and "…" not in r.stdout, r.stdout


def test_the_machine_names_its_cpu_and_widest_vector_instructions(tmp_path: Path) -> None:
    """What benchmark results say of the host: its kernels' speed (and whether a row computes alone as beside
    others) differ between AVX2 and AVX-512, as sessions on such hosts found."""
    import os

    from onnxgen.bench import machine

    x86, arm = tmp_path / "x86", tmp_path / "arm"
    for cpu in range(2):  # /proc/cpuinfo repeats its block for each CPU
        with x86.open("a") as f:
            f.write(f"processor\t: {cpu}\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n")
        with arm.open("a") as f:
            f.write(f"processor\t: {cpu}\nFeatures\t: fp asimd evtstrm asimddp\nCPU part\t: 0xd0c\n\n")
    assert machine(x86) == f"AMD EPYC 9R14, {os.cpu_count()} cores, AVX-512 VNNI"
    assert machine(arm).endswith(f", {os.cpu_count()} cores, NEON dot product")
    assert machine(tmp_path / "none").endswith(f", {os.cpu_count()} cores")  # no /proc/cpuinfo (macOS, Windows)
    (x86).write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2\n")
    assert machine(x86) == f"Some CPU, {os.cpu_count()} cores, AVX2"


def _harness() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    return run


def test_the_bound_counts_a_tied_heads_bytes_and_no_table_only_gathered_from(tmp_path: Path) -> None:
    """The bandwidth bound's bytes are those a decode step reads: a table only gathered from (a row a token) is
    not; row blocks that point into the embedding's bytes (the fp32 tied head, graph.split_tied_head) are read
    whole."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    embedding, positions, weight = (np.ones(shape, np.float32) for shape in ((8, 4), (6, 4), (4, 4)))
    (tmp_path / "model.onnx.data").write_bytes(embedding.tobytes() + positions.tobytes())

    def stored(name: str, dims: list[int], offset: int) -> TensorProto:
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "model.onnx.data"), ("offset", offset), ("length", dims[0] * dims[1] * 4)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    initializers = [stored("wte", [8, 4], 0), stored("rows.0", [5, 4], 0), stored("rows.1", [3, 4], 80),  # 5 rows of 16 bytes
                    stored("wpe", [6, 4], 128), numpy_helper.from_array(weight, "w")]
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["t"]), helper.make_node("Gather", ["wpe", "ids"], ["p"]),
             helper.make_node("Add", ["t", "p"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["x"]),
             helper.make_node("MatMul", ["x", "rows.0"], ["a"]), helper.make_node("MatMul", ["x", "rows.1"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["logits"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializers)
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    run = _harness()
    assert run.streamed_bytes("onnxgen", tmp_path) == embedding.nbytes + weight.nbytes  # the head's rows and w; not wpe


def test_the_bound_leaves_out_an_int8_folders_gathered_embeddings(quantized_folder: Any) -> None:
    """An int8 folder keeps the token embedding as a uint8 table for the Gather and again as the transposed int8
    head: a step reads the head whole and one row of the table, so the bound counts all but the tables."""
    import onnx
    from onnx import numpy_helper

    folder = quantized_folder("int8")
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    tables = tensors["transformer.wte.weight_quantized"].nbytes + tensors["transformer.wpe.weight_quantized"].nbytes
    run = _harness()
    assert run.streamed_bytes("onnxgen", folder) == sum(t.nbytes for t in tensors.values()) - tables
    assert run.streamed_bytes("onnxgen", folder) <= run.weight_bytes("onnxgen", folder) - tables  # the file counted them


def test_the_cpu_profile_harness_splits_decode_steps_by_operator(exported: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_ops.py"), str(exported), "--prompt-tokens", "8", "--steps", "4",
                        "--runs", "2", "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (result,) = json.loads((tmp_path / "cpu_ops.json").read_text())["results"]
    ops = result["op_ms_per_step"]
    assert {"GroupQueryAttention", "SkipLayerNormalization"} <= set(ops) and all(ms > 0 for ms in ops.values())
    assert sum(ops.values()) <= result["step_ms"]["profiled"]  # per step: the nodes' time fits in the step's
    assert result["products_gbs"] > 0 and result["attention_gbs"] > 0
    assert "| GroupQueryAttention |" in (tmp_path / "cpu_ops.md").read_text()


def test_reset_peak_rss_starts_the_peak_afresh() -> None:
    import numpy as np

    from onnxgen.bench import peak_rss_mb, reset_peak_rss

    touched = np.ones(96 << 20, np.uint8)  # 96 MiB resident, then given back (numpy unmaps a block this large)
    del touched
    before = peak_rss_mb()
    assert reset_peak_rss()  # Linux, as CI
    assert peak_rss_mb() < before - 64


@pytest.fixture(scope="module")
def bench_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harness's --work folder, shared by its tests: the folders it makes once are reused, as in real runs."""
    return tmp_path_factory.mktemp("bench-work")


def test_suite_harness_writes_json_markdown_and_chart(checkpoint: Path, bench_work: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", "--checkpoint", str(checkpoint),
           "--competitors", "pytorch", "onnxgen-fp32", "onnxgen-int8", "--threads", "1", "--runs", "2", "--new-tokens", "4",
           "--out", str(tmp_path / "results"), "--work", str(bench_work)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert result["environment"]["threads"] == 1
    (model,) = result["models"]
    for bandwidth in model["bandwidth_gbs"]["read"], model["bandwidth_gbs"]["copy"]:
        assert 0 < bandwidth["min"] <= bandwidth["median"] <= bandwidth["max"]
    assert [c["competitor"] for c in model["competitors"]] == ["pytorch", "onnxgen-fp32", "onnxgen-int8"]
    for comp in model["competitors"]:
        assert {c["key"] for c in comp["cases"]} >= {"b1 p32 greedy", "b1 p32 top-k-top-p", "b1 p32 beam"}
        assert all(0 < c["decode_tps"]["min"] <= c["decode_tps"]["median"] <= c["decode_tps"]["max"] for c in comp["cases"])
        assert comp["peak_rss_mb"] >= max(comp["load_peak_rss_mb"], *(c["peak_rss_mb"] for c in comp["cases"])) > 0
    assert "| onnxgen-int8 |" in (tmp_path / "results" / "latest.md").read_text()
    assert list(result["import_s"]) == ["import torch, transformers", "import onnxgen"]  # the run's competitors' imports
    assert all(seconds > 0 for seconds in result["import_s"].values())
    assert (tmp_path / "results" / "latest.png").read_bytes()[:4] == b"\x89PNG"


def test_suite_harness_pairs_two_competitors(checkpoint: Path, bench_work: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", "--checkpoint", str(checkpoint),
           "--pair", "pytorch", "onnxgen-fp32", "--threads", "1", "--runs", "2", "--new-tokens", "4",
           "--out", str(tmp_path / "results"), "--work", str(bench_work)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert r.returncode == 0, r.stderr[-2000:]
    (pair,) = json.loads((tmp_path / "results" / "pair-pytorch-onnxgen-fp32.json").read_text())["pairs"]
    a, b = pair["decode_tps"]["pytorch"], pair["decode_tps"]["onnxgen-fp32"]
    assert 0 < a["min"] <= a["max"] and 0 < b["min"] <= b["max"]
    assert b["min"] / a["max"] <= pair["ratio"]["min"] <= pair["ratio"]["max"] <= b["max"] / a["min"]
    read = pair["bandwidth_gbs"]["read"]
    assert 0 < read["min"] <= read["median"] <= read["max"]
    assert pair["streamed_bytes"]["pytorch"] > 0 and pair["streamed_bytes"]["onnxgen-fp32"] > 0
    assert "| onnxgen-fp32 |" in (tmp_path / "results" / "pair-pytorch-onnxgen-fp32.md").read_text()


def test_the_ctranslate2_competitor_decodes_the_checkpoint_as_transformers_does(checkpoint: Path, torch_model: Any,
                                                                                 tmp_path: Path) -> None:
    """run.py's CTranslate2 side does the work the others are timed on: its conversion of the checkpoint (made by
    prepare, as for a run) decodes greedily what transformers' generate does, and every strategy of the table makes
    exactly the new tokens asked for in every row, in float32 and int8; no row ends early, even where its end token
    is one that greedy decoding picks (a copy of the float32 folder told so)."""
    import json
    import shutil

    import numpy as np
    import torch

    run = _harness()
    folders = run.prepare("tiny", checkpoint, tmp_path, ["ctranslate2-fp32", "ctranslate2-int8"], fresh=False)
    ids, new = np.random.default_rng(0).integers(0, torch_model.config.vocab_size, (2, 7)).tolist(), 6
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor(ids), attention_mask=torch.ones(2, 7, dtype=torch.long), max_new_tokens=new,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)[:, 7:].tolist()
    ends = shutil.copytree(folders["ctranslate2-fp32"], tmp_path / "ends-early")
    spelled = json.loads((ends / "vocabulary.json").read_text())
    config = json.loads((ends / "config.json").read_text())
    (ends / "config.json").write_text(json.dumps({**config, "eos_token": spelled[expected[0][2]]}))
    for folder in (folders["ctranslate2-fp32"], folders["ctranslate2-int8"], ends):
        generate, vocab = run.load(f"ctranslate2-{folder.name}", str(folder), 1)
        assert vocab == torch_model.config.vocab_size
        for strategy in ("greedy", run.SAMPLING, "beam"):
            made = [result.sequences_ids[0] for result in generate(ids, new, strategy)]  # type: ignore[attr-defined]
            assert [len(row) for row in made] == [new, new], (folder.name, strategy)
            if folder.name != "int8" and strategy == "greedy":
                assert made == expected
