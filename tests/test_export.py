from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import onnxgen
from onnxgen import manifest as manifest_mod
from onnxgen.errors import ExportError, OnnxgenError
from onnxgen.export import ExportOptions, export

from .conftest import make_adapter, make_checkpoint

EXPECTED_FILES = {"model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json", "onnxgen.json"}


def test_folder_holds_what_the_runtime_needs_and_nothing_else(exported: Path) -> None:
    assert {p.name for p in exported.iterdir()} == EXPECTED_FILES


def test_manifest_describes_the_folder(exported: Path, checkpoint: Path) -> None:
    m = json.loads((exported / "onnxgen.json").read_text())
    assert m["source"]["model"] == str(checkpoint)
    assert m["dtype"] == "float32" and m["opset"] >= 14
    assert m["dims"] == {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 400, "n_positions": 128}
    assert m["inputs"][:1] == ["input_ids"]
    assert {"position_ids", "seqlens_k", "total_sequence_length", "past_key_values.0.key", "past_key_values.1.value"} <= set(m["inputs"])
    assert "attention_mask" not in m["inputs"]  # each row's length is in seqlens_k
    assert m["outputs"][0] == "logits" and "present.1.value" in m["outputs"]
    for name, info in m["files"].items():
        assert info["bytes"] == (exported / name).stat().st_size
        assert info["sha256"] == manifest_mod.sha256(exported / name)
    assert m["validation"]["passed"] and m["validation"]["max_abs_diff_prompt"] <= 1e-4
    assert {"torch", "transformers", "onnxruntime", "onnx"} <= set(m["versions"])
    assert m["graph"]["tied_head_deduplicated"] is True
    assert m["graph"]["attention_fused"] == 2 and m["graph"]["attention_biases_folded"] == 2 and m["graph"]["cache_in_place"]


def test_attention_is_one_node_per_layer(exported: Path, exported_growing: Path) -> None:
    from onnxgen import graph as graph_mod

    for folder, attention in ((exported, "GroupQueryAttention"), (exported_growing, "MultiHeadAttention")):
        model = onnx.load(str(folder / "model.onnx"))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count(attention) == 2 and ops.count("GroupQueryAttention") + ops.count("MultiHeadAttention") == 2
        # The step no longer transposes the key cache, nor builds a 4-D causal mask.
        assert not any(n.op_type == "Transpose" and n.input[0].startswith("present.") for n in model.graph.node)
        assert "Expand" not in ops and "IsNaN" not in ops
        # A layer is nine kernels: MatMul, Split (MultiHeadAttention adds c_attn's bias) or Add of that bias
        # (GroupQueryAttention has no bias input), attention, MatMul, SkipLayerNorm (with c_proj's bias),
        # MatMul, FastGelu, MatMul, SkipLayerNorm; none of the Conv1D reshapes is left.
        assert ops.count("MatMul") == 4 * 2 + 1 and "Reshape" not in ops and "Shape" not in ops
        biases = [n for n in model.graph.node if n.op_type == "Add" and n.name.endswith("/QkvBias")]
        assert (ops.count("Split"), len(biases)) == ((2, 0) if attention == "MultiHeadAttention" else (0, 2))
        assert all(len(n.input) == 5 and n.input[4] for n in model.graph.node if n.op_type == "SkipLayerNormalization")
        assert graph_mod.fuse_attention(model, 4, [0.125] * 2) == 0  # a graph it does not recognise is left as it is
        assert graph_mod.fold_attention_biases(model) == 0
        if attention == "GroupQueryAttention":
            assert graph_mod.cache_in_place(model) == 0
        assert [n.op_type for n in model.graph.node] == ops


def test_a_raw_graph_with_its_constants_in_a_data_file_fuses_as_fully(checkpoint: Path, exported: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """optimum writes a model over 2 GB with its large tensors in a data file, graph constants too (eager attention's
    causal mask in gpt2-large); onnxruntime's shape inference could not read one there and its fusions that check
    shapes were skipped without a word. Here the tiny model's raw export is written that way: the same graph results."""
    from onnxgen import export as export_mod

    optimize = export_mod._optimize
    raw = tmp_path / "raw" / "model.onnx"

    def from_data_file(path: Path, cfg: Any, fuse: bool) -> Any:
        raw.parent.mkdir()
        model = onnx.load(str(path))
        assert any(a.type == onnx.AttributeProto.TENSOR for n in model.graph.node if n.op_type == "Constant" for a in n.attribute)
        onnx.save_model(model, str(raw), save_as_external_data=True, location="model.onnx_data", size_threshold=0,
                        convert_attribute=True)
        return optimize(raw, cfg, fuse)

    monkeypatch.setattr(export_mod, "_optimize", from_data_file)
    export(str(checkpoint), tmp_path / "out", quiet=True)
    assert raw.exists()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node]
    assert ops == [n.op_type for n in onnx.load(str(exported / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("SkipLayerNormalization") == 4 and "Reshape" not in ops


def test_an_export_whose_fusions_lose_shape_inference_says_so(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Should onnxruntime's shape inference fail on some other graph, the export still works, and says it runs slower
    (onnxruntime itself only prints a line to stdout, where results go, and leaves the fusions out)."""
    import onnxruntime.transformers.onnx_model  # noqa: F401  (puts its folder on sys.path, where shape_infer_helper lives)
    import shape_infer_helper

    def fail(*args: Any, **kwargs: Any) -> bool:
        raise onnx.checker.ValidationError("simulated")

    monkeypatch.setattr(shape_infer_helper.SymbolicShapeInferenceHelper, "infer", fail)
    capsys.readouterr()
    with pytest.warns(onnxgen.PerformanceWarning, match="shape inference failed .* runs slower"):
        export(str(checkpoint), tmp_path / "out", quiet=True)
    assert capsys.readouterr().out == ""
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("SkipLayerNormalization") < 4  # what the warning is about


def test_tied_head_is_stored_once(exported: Path, torch_model: torch.nn.Module) -> None:
    graph = onnx.load(str(exported / "model.onnx")).graph
    weight_bytes = sum(t.ByteSize() for t in graph.initializer)
    torch_bytes = sum(p.numel() * 4 for p in torch_model.parameters())  # parameters() counts the tied tensor once
    assert weight_bytes < torch_bytes * 1.05
    assert not any(n.op_type == "Gemm" for n in graph.node)  # every weight is in a quantizable MatMul


def test_head_in_parts_reads_the_embeddings_own_bytes(exported_parts: Path, exported: Path, torch_model: torch.nn.Module) -> None:
    import onnxgen

    from .conftest import HEAD_PART_BYTES

    g = onnx.load(str(exported_parts / "model.onnx"), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    parts = [n for n in g.node if n.name.startswith("/lm_head/Part.")]
    assert len(parts) == -(-400 * 64 * 4 // HEAD_PART_BYTES) == json.loads((exported_parts / "onnxgen.json").read_text())["graph"]["head_parts"]
    assert all(n.op_type == "FusedMatMul" and n.attribute[0].name == "transB" and n.attribute[0].i == 1 for n in parts)
    assert not any(n.name == "/lm_head/TiedTranspose" for n in g.node)
    # The parts point, row range after row range, into the embedding's bytes: nothing is stored twice.
    emb = {e.key: e.value for e in inits["transformer.wte.weight"].external_data}
    ranges = [{e.key: e.value for e in inits[n.input[1]].external_data} for n in parts]
    assert all(r["location"] == emb["location"] for r in ranges)
    assert int(ranges[0]["offset"]) == int(emb.get("offset", 0))
    assert all(int(a["offset"]) + int(a["length"]) == int(b["offset"]) for a, b in itertools.pairwise(ranges))
    assert int(ranges[-1]["offset"]) + int(ranges[-1]["length"]) == int(emb.get("offset", 0)) + int(emb["length"])
    assert (exported_parts / "model.onnx.data").stat().st_size == (exported / "model.onnx.data").stat().st_size
    # logits as PyTorch's at every position, and at the last one alone
    runtime = onnxgen.load(exported_parts, threads=1).runtime
    ids = np.random.default_rng(1).integers(0, 400, size=(1, 20))
    logits = runtime.all_logits(ids)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - ref).max() <= 1e-4
    last = runtime.new_cache(1, 20).prefill([ids[0].tolist()])
    assert np.allclose(last[0], logits[0, -1], atol=1e-5)


def test_unoptimized_export_splits_its_head_too(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxgen
    from onnxgen import graph

    from .conftest import HEAD_PART_BYTES

    monkeypatch.setattr(graph, "HEAD_PART_BYTES", HEAD_PART_BYTES)
    m = export(str(checkpoint), tmp_path / "plain", ExportOptions(optimize=False), quiet=True)
    assert m["graph"]["head_parts"] > 1 and m["validation"]["passed"]
    onnx.checker.check_model(str(tmp_path / "plain" / "model.onnx"))  # FusedMatMul's domain is declared (no fusion did it)
    assert len(onnxgen.load(tmp_path / "plain", threads=1).generate([5, 17, 33], max_new_tokens=4)[0].token_ids) == 4


def test_exported_graphs_pass_onnx_checker(exported: Path, exported_growing: Path, exported_parts: Path) -> None:
    for folder in exported, exported_growing, exported_parts:  # nodes in topological order, data where it says
        onnx.checker.check_model(str(folder / "model.onnx"))


@pytest.mark.parametrize("layout", ["in place", "growing"])
def test_onnx_logits_match_pytorch_on_every_position(exported: Path, exported_growing: Path, torch_model: torch.nn.Module, layout: str) -> None:
    import onnxgen

    runtime = onnxgen.load(exported if layout == "in place" else exported_growing, threads=1).runtime
    ids = np.random.default_rng(1).integers(0, 400, size=(1, 20))
    logits = runtime.all_logits(ids)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids)).logits.numpy()
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() <= 1e-4
    last = runtime.new_cache(1, 20).prefill([ids[0].tolist()])  # logits_to_keep=1: the head at the last position only
    assert last.shape == (1, 400) and np.allclose(last[0], logits[0, -1], atol=1e-5)


@pytest.mark.parametrize("cache_in_place", [True, False], ids=["in place", "growing"])
@pytest.mark.parametrize("scaling", [{"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
                                     {"scale_attn_weights": False}], ids=["by layer", "unscaled"])
def test_attention_scale_options_are_exported(tmp_path: Path, scaling: dict[str, bool], cache_in_place: bool) -> None:
    """stanford-crfm's GPT-2s divide each layer's attention scores by the layer's number as well (their
    config: scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn). transformers' SDPA attention, the
    default up to 4.57, ignores that, so the export follows eager attention, the model's definition."""
    import onnxgen
    from transformers import GPT2LMHeadModel

    checkpoint = make_checkpoint(tmp_path / "ckpt", **scaling)
    out = tmp_path / "out"
    assert export(str(checkpoint), out, ExportOptions(cache_in_place=cache_in_place), quiet=True)["validation"]["passed"]
    eager = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    plain = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager", scale_attn_weights=True,
                                            scale_attn_by_inverse_layer_idx=False).eval()
    prompt = torch.tensor([[5, 17, 33, 2, 90, 41]])
    with torch.no_grad():  # the option changes the model's scores: the case below can tell the two apart
        assert (eager(prompt).logits - plain(prompt).logits).abs().max() > 0.1
        reference = eager.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    completion = onnxgen.load(out, threads=1).generate(prompt[0].tolist(), max_new_tokens=16)[0]
    assert completion.token_ids == reference


def test_external_data_and_unoptimized_export(checkpoint: Path, exported: Path, tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    import onnxgen

    assert (exported / "model.onnx.data").stat().st_size > (exported / "model.onnx").stat().st_size
    out = tmp_path / "one-file"
    m = export(str(checkpoint), out, ExportOptions(external_data_threshold=1 << 40, optimize=False), quiet=True)
    assert not (out / "model.onnx.data").exists()
    assert not m["graph"]["external_data"] and "model.onnx.data" not in m["files"] and m["validation"]["passed"]
    ext = onnxgen.load(out, threads=1)
    prompt = [5, 17, 33, 2]
    assert ext.generate(prompt, max_new_tokens=8)[0].token_ids == model.generate(prompt, max_new_tokens=8)[0].token_ids


def test_existing_output_is_refused_unless_forced(checkpoint: Path, exported: Path) -> None:
    with pytest.raises(OnnxgenError, match="already exists"):
        export(str(checkpoint), exported, quiet=True)


def test_force_replaces_and_interrupt_leaves_nothing(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    export(str(checkpoint), out, quiet=True)
    before = json.loads((out / "onnxgen.json").read_text())

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("onnxgen.export._validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(str(checkpoint), out, ExportOptions(force=True), quiet=True)
    assert json.loads((out / "onnxgen.json").read_text()) == before  # the old folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folders left behind
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export(str(checkpoint), fresh, quiet=True)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_validation_is_an_error(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="validation failed"):
        export(str(checkpoint), tmp_path / "out", ExportOptions(atol=-1.0), quiet=True)  # no diff passes a negative bound
    assert list(tmp_path.iterdir()) == []


def test_a_hub_out_of_reach_is_one_error_not_a_page_of_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """huggingface_hub retries an unreachable hub 5 times, a warning line each (12 lines, 23 s): the export's
    error is its only output. (Where the hub answers, a model it does not have is refused at once.)"""
    import huggingface_hub.utils._http as hub_http
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_warning()  # as a process starts, whatever exports ran before in this one
    monkeypatch.setattr(hub_http, "time", SimpleNamespace(sleep=lambda seconds: None))  # its waits between retries
    with pytest.raises(ExportError, match="cannot load 'no-such-org/no-such-model'"):
        export("no-such-org/no-such-model", tmp_path / "out", quiet=True)
    assert capfd.readouterr().err == "" and list(tmp_path.iterdir()) == []


def _hub_cache(checkpoint: Path, root: Path) -> tuple[str, str]:
    """A hub cache in huggingface_hub's layout holding two commits of `onnxgen-tests/tiny`, main at the newer (their
    generation configs set top_k 7 and 9); returns (older, newer)."""
    repo = root / "models--onnxgen-tests--tiny"
    older, newer = "a" * 40, "b" * 40
    for commit, top_k in ((older, 7), (newer, 9)):
        snapshot = shutil.copytree(checkpoint, repo / "snapshots" / commit)
        generation = json.loads((snapshot / "generation_config.json").read_text())
        (snapshot / "generation_config.json").write_text(json.dumps({**generation, "top_k": top_k}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(newer)
    return older, newer


def _refusals(cases: list[tuple[str, str | None]], out: Path, env: dict[str, str] | None = None) -> list[str]:
    """In a fresh interpreter, as a user's command runs: the ExportError of exporting each (source, revision) to `out`,
    then which of transformers, torch and optimum that imported (none, where each was refused before the imports)."""
    code = ("import sys\n"
            "from onnxgen.errors import ExportError\n"
            "from onnxgen.export import ExportOptions, export\n"
            f"for source, revision in {cases!r}:\n"
            "    try:\n"
            f"        export(source, {str(out)!r}, ExportOptions(revision=revision), quiet=True)\n"
            "    except ExportError as e:\n"
            "        print(e)\n"
            "print(sorted(m for m in ('transformers', 'torch', 'optimum') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()


def test_a_hub_out_of_reach_loads_from_the_cache_without_retrying(checkpoint: Path, tmp_path: Path) -> None:
    """No network and no HF_HUB_OFFLINE (an edge box, an air-gapped server): a cached hub id exports from the cache
    without huggingface_hub's 5 retries (~23 s; here a retry ends the process), and an id not cached says so at once."""
    _hub_cache(checkpoint, tmp_path / "hub")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and "proxy" not in k.lower()}
    env |= {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}
    script = ("import sys, huggingface_hub.utils._http as http\n"
              "http.time = type('NoRetry', (), {'sleep': staticmethod(lambda seconds: sys.exit('retried'))})\n"
              "from onnxgen.export import export\n"
              "print(export(sys.argv[1], sys.argv[2], quiet=True)['source'])\n")
    try:
        done = subprocess.run([sys.executable, "-c", script, "onnxgen-tests/tiny", str(tmp_path / "out")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "'commit': 'bbbbbbbb" in done.stdout, done.stderr[-2000:]
        missing = subprocess.run([sys.executable, "-m", "onnxgen", "export", "onnxgen-tests/other", "-o", str(tmp_path / "o2")], env=env,
                                 capture_output=True, text=True, timeout=300)
    finally:
        closed.close()
    assert missing.returncode == 1 and missing.stderr.strip().endswith(f"is not in the local cache ({tmp_path / 'hub'})"), missing.stderr
    assert "cannot load 'onnxgen-tests/other': the hub (http://127.0.0.1:" in missing.stderr
    # Offline, an id or a revision the cache lacks is refused before transformers (seconds of imports) is loaded.
    cases = [("onnxgen-tests/other", None), ("onnxgen-tests/tiny", "v9")]  # (source, revision)
    assert _refusals(cases, tmp_path / "o3", {**env, "HF_HUB_OFFLINE": "1"}) == [
        f"cannot load {source!r}: HF_HUB_OFFLINE is set and {source!r} is not in the local cache ({tmp_path / 'hub'})"
        for source, _ in cases] + ["[]"]


def test_a_hub_id_exports_the_revision_asked_for_and_records_its_commit(checkpoint: Path, tmp_path: Path) -> None:
    """The hub's code path without a network: a hub cache in huggingface_hub's layout holding two commits of one
    model id, main at the newer; `--revision` the older exports the older's files (its generation config here),
    and the manifest records the commit they came from. That config sets top_k without do_sample, as many hub
    checkpoints' do: transformers refuses to save it again, and the export failed on it."""
    import onnxgen

    older, newer = _hub_cache(checkpoint, tmp_path / "hub")
    done = subprocess.run([sys.executable, "-m", "onnxgen", "export", "onnxgen-tests/tiny", "--revision", older, "-o", str(tmp_path / "out"),
                           "--json"], env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"]["commit"] == older
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["top_k"] == 7
    defaults = onnxgen.load(tmp_path / "out").defaults
    assert defaults.top_k == 7 and not defaults.do_sample  # greedy, as transformers reads that config
    with pytest.raises(ExportError, match="a revision names a commit of a hub id"):
        export(str(checkpoint), tmp_path / "o", ExportOptions(revision=older), quiet=True)


def test_generation_options_in_config_json_become_the_folders_defaults_quietly(checkpoint: Path, tmp_path: Path,
                                                                              capfd: pytest.CaptureFixture[str]) -> None:
    """Older checkpoints keep their generation options in config.json and have no generation_config.json: they are
    the folder's defaults, as transformers reads them, and optimum's notice that it moves them is not printed."""
    from optimum.utils import logging as optimum_logging

    import onnxgen

    optimum_logging.set_verbosity_warning()  # as a process starts, whatever exports ran before in this one
    source = shutil.copytree(checkpoint, tmp_path / "old")
    (source / "generation_config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "do_sample": True, "top_k": 0, "temperature": 0.7, "max_length": 100}))
    export(str(source), tmp_path / "out", quiet=True)
    defaults = onnxgen.load(tmp_path / "out").defaults
    assert (defaults.do_sample, defaults.top_k, defaults.temperature, defaults.max_length) == (True, 0, 0.7, 100)
    assert capfd.readouterr().err == ""


def test_input_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a transformers checkpoint"):
        export(str(tmp_path / "empty"), tmp_path / "o1", quiet=True)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="GPT-2 models only"):
        export(str(bert), tmp_path / "o2", quiet=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="cannot load 'no-such-org/no-such-model'"):
        export("no-such-org/no-such-model", tmp_path / "o3", quiet=True)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OnnxgenError, match="is not a folder"):
        export(str(checkpoint), tmp_path / "a-file" / "out", quiet=True)
    monkeypatch.setattr("onnxgen.atomic.shutil.disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(OnnxgenError, match="not enough disk"):
        export(str(checkpoint), tmp_path / "o4", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bert", "empty"]


def test_arguments_are_refused_before_the_export_stack_is_imported(checkpoint: Path, tmp_path: Path) -> None:
    """A mistyped folder, a folder without config.json, a revision for a folder: refused before transformers (and torch,
    seconds of imports) is loaded, in a fresh interpreter as a user's command runs."""
    (tmp_path / "empty").mkdir()
    cases = [(str(tmp_path / "nope"), None), (str(tmp_path / "empty"), None), (str(checkpoint), "main")]  # (source, revision)
    assert _refusals(cases, tmp_path / "out") == [f"{tmp_path / 'nope'}: no such folder",
                                                  f"{tmp_path / 'empty'} is not a transformers checkpoint folder (no config.json)",
                                                  f"{checkpoint} is a folder: a revision names a commit of a hub id", "[]"]


def test_a_checkpoint_that_cleans_up_spaces_decodes_as_transformers(checkpoint: Path, exported: Path, tmp_path: Path) -> None:
    """Checkpoints saved before transformers 4.45 say clean_up_tokenization_spaces: true in tokenizer_config.json, and
    transformers' text then drops the space before punctuation and contractions: the export records it, and the
    runtime's completions and streams decode so (the tokens are the same either way)."""
    import onnxgen
    from transformers import AutoTokenizer

    source = shutil.copytree(checkpoint, tmp_path / "ckpt")
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    assert export(str(source), tmp_path / "out", quiet=True)["tokenizer"]["clean_up_tokenization_spaces"] is True
    assert json.loads((exported / "onnxgen.json").read_text())["tokenizer"]["clean_up_tokenization_spaces"] is False
    hf = AutoTokenizer.from_pretrained(source)
    prompt, forced = hf.encode("It is"), hf.encode(" Hello , world . I do n't know !")

    def write_forced(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:  # the model writes `forced`, token by token
        scores[:] = -np.inf
        scores[:, forced[input_ids.shape[1] - len(prompt)]] = 0.0
        return scores

    options = {"max_new_tokens": len(forced), "logits_processors": [write_forced], "eos_token_id": None}
    cleaned, spelled = (onnxgen.load(folder, threads=1) for folder in (tmp_path / "out", exported))
    c = cleaned.generate(prompt, **options)[0]
    assert c.token_ids == forced and c.text == hf.decode(forced, skip_special_tokens=True) == " Hello, world. I don't know!"
    assert "".join(cleaned.stream(prompt, **options)) == c.text
    assert spelled.generate(prompt, **options)[0].text == " Hello , world . I do n't know !"  # the default: as the tokens spell it


def test_damaged_checkpoints_are_named_errors(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint transformers cannot load is the user's error, said in one line, not an internal one."""
    def damaged(name: str, change: Callable[[Path], object]) -> Path:
        folder = shutil.copytree(checkpoint, tmp_path / name)
        change(folder)
        return folder

    def resized(folder: Path) -> None:  # weights of other shapes than the config says
        (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "n_embd": 128}))

    weights = "model.safetensors"
    cases = {damaged("no-weights", lambda f: (f / weights).unlink()): "cannot load {}: .*no file named",
             damaged("truncated", lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:5000])): "cannot load {}: .*deserializing header",
             damaged("resized", resized): "cannot load {}: .*size mismatch for .* copying a param with shape",
             damaged("no-tokenizer", lambda f: [p.unlink() for p in f.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges", "special"))]):
                 "{} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt"}
    for folder, reason in cases.items():
        with pytest.raises(ExportError, match=reason.format(folder)):
            export(str(folder), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "onnxgen", "export", str(tmp_path / "empty"), "-o", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("onnxgen: error: ")
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_json_prints_the_manifest(checkpoint: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "onnxgen", "export", str(checkpoint), "-o", str(tmp_path / "x"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((tmp_path / "x" / "onnxgen.json").read_text())
    assert r.stderr == ""  # progress goes to a terminal only; the libraries' notices (shape inference's) are held back


def test_a_killed_build_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    from onnxgen import atomic

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its id now names no process, as a SIGKILLed export's would
    dead, alive = finished.pid, os.getppid()
    left = [f".out.partial-{dead}-work", f".out.partial-{dead}", f".out.raw-{dead}-x1y2", f".out.prep-{dead}-x3y4"]
    kept = [f".out.partial-{alive}-work", f".other.partial-{dead}-work", ".out.notes", f".out.old-{dead}-replaced"]
    for name in left + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_text("half")
    with atomic.building(tmp_path / "out", force=False) as work:
        (work / "model.onnx").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *kept])  # a running build's folder stays
    assert (tmp_path / "out" / "model.onnx").read_text() == "whole"


def test_optimum_runs_the_exported_folder(exported_growing: Path, model, torch_model: torch.nn.Module) -> None:  # type: ignore[no-untyped-def]
    """Users switching either way: optimum's ORTModelForCausalLM generates from an onnxgen fp32 folder exported
    with --growing-cache (it feeds the inputs it knows; logits_to_keep defaults to every position), the same
    tokens as PyTorch and onnxgen (whose default folder keeps the cache in place, which optimum cannot run)."""
    exported = exported_growing
    from optimum.onnxruntime import ORTModelForCausalLM

    ids = torch.tensor([[12, 40, 7, 99, 150]])
    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    ours = ORTModelForCausalLM.from_pretrained(exported).generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
    with torch.no_grad():
        reference = torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
    assert ours[0, 5:].tolist() == reference[0, 5:].tolist() == model.generate([ids[0].tolist()], max_new_tokens=10, eos_token_id=None)[0].token_ids
    assert "logits_to_keep" in json.loads((exported / "onnxgen.json").read_text())["inputs"]


@pytest.fixture(scope="module")
def lora(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(checkpoint, tmp_path_factory.mktemp("lora") / "adapter")


def test_a_lora_adapter_exports_merged_into_its_base(lora: Path, checkpoint: Path, exported: Path, tmp_path: Path) -> None:
    """A PEFT adapter folder exports as its base with the adapter merged: greedy text token for token what peft's own
    model (the adapter beside the base's weights, unmerged) generates, and not the base's; the manifest says so."""
    import peft
    from transformers import GPT2LMHeadModel

    import onnxgen

    result = export(str(lora), tmp_path / "merged", quiet=True)
    assert result["source"]["adapter"] == "LORA" and result["source"]["base"]["model"] == str(checkpoint)
    assert result["source"]["model"] == str(lora) and result["source"]["commit"] is None
    reference = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager"), str(lora)).eval()
    merged, plain = onnxgen.load(tmp_path / "merged", threads=1), onnxgen.load(exported, threads=1)
    for prompt in ("It is a truth", "Call me"):
        ids = merged.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
        tokens = merged.generate([ids], max_new_tokens=12, do_sample=False, eos_token_id=None)[0].token_ids
        assert tokens == expected.tolist()
        assert tokens != plain.generate([ids], max_new_tokens=12, do_sample=False, eos_token_id=None)[0].token_ids


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_an_adapter_with_tokens_of_its_own_brings_its_tokenizer(checkpoint: Path, tmp_path: Path) -> None:
    """A fine-tune that added tokens (a chat format's) saves its tokenizer and its embeddings with the adapter: the
    base's embeddings grow to the tokenizer before the adapter goes on (as peft asks), the folder has the adapter's
    tokenizer and chat template, and greedy text is peft's own model's."""
    import peft
    from transformers import AutoTokenizer, GPT2LMHeadModel

    import onnxgen

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    base = GPT2LMHeadModel.from_pretrained(checkpoint)
    base.resize_token_embeddings(len(tokenizer))
    base.save_pretrained(tmp_path / "resized")  # only to make the adapter: the export starts from `checkpoint`
    adapter = make_adapter(tmp_path / "resized", tmp_path / "adapter", modules_to_save=["wte"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(checkpoint)}))
    with torch.no_grad():  # the adapter's own embeddings, trained too
        weights = peft.PeftModel.from_pretrained(base, str(adapter))
        weights.base_model.model.transformer.wte.modules_to_save["default"].weight.normal_(0.0, 0.3)
        weights.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    export(str(adapter), tmp_path / "out", quiet=True)
    model = onnxgen.load(tmp_path / "out", threads=1)
    ids = model.tokenizer.encode(model.apply_chat_template([{"role": "user", "content": "Hi"}]))
    assert model.dims.vocab_size == len(tokenizer) and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    fresh = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager")
    fresh.resize_token_embeddings(len(tokenizer))
    reference = peft.PeftModel.from_pretrained(fresh, str(adapter)).eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    assert model.generate([ids], max_new_tokens=10, do_sample=False, eos_token_id=None)[0].token_ids == expected.tolist()


def test_an_adapters_base_can_be_named_and_what_cannot_be_merged_is_refused(lora: Path, checkpoint: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import peft
    from transformers import GPT2LMHeadModel

    moved = shutil.copytree(lora, tmp_path / "moved")  # trained on another machine: its base's path is not here
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/gpt2"}))
    with pytest.raises(ExportError, match="PEFT adapter of '/nowhere/gpt2', which cannot be loaded .*no such folder.*give its base with --base"):
        export(str(moved), tmp_path / "o1", quiet=True)
    named = export(str(moved), tmp_path / "o2", ExportOptions(base=str(checkpoint)), quiet=True)
    assert named["source"]["base"]["model"] == str(checkpoint) and (tmp_path / "o2" / "model.onnx").is_file()
    with pytest.raises(ExportError, match="is a checkpoint: a base model is for a PEFT adapter"):
        export(str(checkpoint), tmp_path / "o3", ExportOptions(base=str(checkpoint)), quiet=True)
    prompt = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(checkpoint), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt.save_pretrained(tmp_path / "prompt")
    with pytest.raises(ExportError, match="is a PROMPT_TUNING adapter, which adds no weights to merge"):
        export(str(tmp_path / "prompt"), tmp_path / "o4", quiet=True)
    nameless = shutil.copytree(lora, tmp_path / "nameless")
    (nameless / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ExportError, match="names no base model: give it with --base"):
        export(str(nameless), tmp_path / "o5", quiet=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # not installed
    with pytest.raises(ExportError, match=r"merging it into .* needs peft \(pip install 'onnxgen\[export\]'\)"):
        export(str(lora), tmp_path / "o6", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved", "nameless", "o2", "prompt"]  # nothing half-written


def test_a_hub_adapter_and_its_hub_base_export_from_the_cache(checkpoint: Path, lora: Path, tmp_path: Path) -> None:
    """The hub's code path for adapters without a network: an adapter repository (no config.json) and the base it
    names, both in a hub cache; the manifest records both commits."""
    older, newer = _hub_cache(checkpoint, tmp_path / "hub")
    commit = "c" * 40
    snapshot = shutil.copytree(lora, tmp_path / "hub" / "models--onnxgen-tests--tiny-lora" / "snapshots" / commit)
    config = json.loads((snapshot / "adapter_config.json").read_text())
    (snapshot / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "onnxgen-tests/tiny"}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    done = subprocess.run([sys.executable, "-m", "onnxgen", "export", "onnxgen-tests/tiny-lora", "-o", str(tmp_path / "out"), "--json"],
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    source = json.loads(done.stdout)["source"]
    assert (source["model"], source["commit"], source["adapter"]) == ("onnxgen-tests/tiny-lora", commit, "LORA")
    assert (source["base"]["model"], source["base"]["commit"]) == ("onnxgen-tests/tiny", newer) and older != newer
    assert "Warning" not in done.stderr


def _nanogpt_logits(weights: dict[str, torch.Tensor], args: dict[str, Any], ids: list[int], gelu: str = "none") -> torch.Tensor:
    """nanoGPT's forward (its model.py, followed line by line): Linear layers, optional biases, exact GELU (llm.c's:
    `gelu` "tanh"), LayerNorm eps 1e-5, causal attention, the head tied to the token embedding. Every position's logits."""
    import torch.nn.functional as F

    idx, width, heads = torch.tensor([ids]), args["n_embd"], args["n_head"]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (width,), weights[name + ".weight"], weights.get(name + ".bias"), 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, weights[name + ".weight"], weights.get(name + ".bias"))

    x = weights["transformer.wte.weight"][idx] + weights["transformer.wpe.weight"][: len(ids)]
    for layer in range(args["n_layer"]):
        at = f"transformer.h.{layer}."
        q, k, v = (t.view(1, len(ids), heads, width // heads).transpose(1, 2)
                   for t in linear(norm(x, at + "ln_1"), at + "attn.c_attn").split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, len(ids), width)
        x = x + linear(y, at + "attn.c_proj")
        x = x + linear(F.gelu(linear(norm(x, at + "ln_2"), at + "mlp.c_fc"), approximate=gelu), at + "mlp.c_proj")
    return F.linear(norm(x, "transformer.ln_f"), weights["transformer.wte.weight"])[0]


def _nanogpt_checkpoint(path: Path, bias: bool, vocab_size: int = 448) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A ckpt.pt as nanoGPT's train.py saves one after torch.compile ("_orig_mod." names, the head saved beside the
    embedding it is tied to, the causal-mask buffer of its slow attention) of _gpt2_weights."""
    weights, args = _gpt2_weights(bias, vocab_size)
    saved = {"_orig_mod." + k: v for k, v in weights.items()} | {"_orig_mod.lm_head.weight": weights["transformer.wte.weight"]}
    saved |= {f"_orig_mod.transformer.h.{layer}.attn.bias": torch.tril(torch.ones(1, 1, 128, 128)) for layer in range(2)}
    torch.save({"model": saved, "model_args": args, "iter_num": 500, "best_val_loss": torch.tensor(2.25), "config": {"dataset": "prose"}}, path)
    return weights, args


def _gpt2_weights(bias: bool, vocab_size: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Random GPT-2 weights by nanoGPT's names, in its layout (Linear: out x in), a vocabulary padded past the
    tokenizer's 400, as nanoGPT and llm.c pad 50257 to 50304; and nanoGPT's model_args for them."""
    args = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 128, "bias": bias, "vocab_size": vocab_size, "dropout": 0.0}
    generator = torch.Generator().manual_seed(5)
    weights: dict[str, torch.Tensor] = {}

    def add(name: str, *shape: int, mean: float = 0.0) -> None:
        weights[name] = mean + 0.3 * torch.randn(*shape, generator=generator)

    add("transformer.wte.weight", vocab_size, 64)
    add("transformer.wpe.weight", 128, 64)
    for layer in range(2):
        at = f"transformer.h.{layer}."
        for name, (out, inp) in {"attn.c_attn": (192, 64), "attn.c_proj": (64, 64), "mlp.c_fc": (256, 64), "mlp.c_proj": (64, 256)}.items():
            add(at + name + ".weight", out, inp)
            if bias:
                add(at + name + ".bias", out)
        for norm in ("ln_1", "ln_2"):
            add(at + norm + ".weight", 64, mean=1.0)
            if bias:
                add(at + norm + ".bias", 64)
    add("transformer.ln_f.weight", 64, mean=1.0)
    if bias:
        add("transformer.ln_f.bias", 64)
    return weights, args


@pytest.mark.parametrize("bias", [True, False])
def test_a_nanogpt_checkpoint_exports_as_the_gpt2_it_is(checkpoint: Path, tmp_path: Path, bias: bool) -> None:
    """nanoGPT's ckpt.pt (bias on and off) exports with the tokenizer it is given: every position's logits and greedy
    tokens as nanoGPT's own forward gives them (its exact GELU, not GPT-2's tanh one: that would fail here), the end
    token the tokenizer's, and the training's step and loss in the manifest."""
    import onnxgen

    weights, args = _nanogpt_checkpoint(tmp_path / "ckpt.pt", bias)
    result = export(str(tmp_path / "ckpt.pt"), tmp_path / "out", ExportOptions(tokenizer=str(checkpoint)), quiet=True)
    assert {k: result["source"][k] for k in ("format", "iter_num", "best_val_loss", "tokenizer")} == {
        "format": "nanoGPT", "iter_num": 500, "best_val_loss": 2.25, "tokenizer": str(checkpoint)}
    model = onnxgen.load(tmp_path / "out", threads=1)
    assert model.dims.vocab_size == 448 and model.defaults.eos_ids == [model.tokenizer.encode("<|endoftext|>")[0]]
    ids = model.tokenizer.encode("It is a truth universally")
    np.testing.assert_allclose(model.runtime.all_logits(np.asarray([ids]))[0], _nanogpt_logits(weights, args, ids).numpy(), atol=1e-4)
    padded = list(range(400, 448))  # no token has these ids: kept out of both sides' choices
    expected = list(ids)
    for _ in range(10):
        logits = _nanogpt_logits(weights, args, expected)[-1]
        logits[padded] = -torch.inf
        expected.append(int(logits.argmax()))
    got = model.generate([ids], max_new_tokens=10, do_sample=False, eos_token_id=None, suppress_tokens=padded)[0].token_ids
    assert got == expected[len(ids):]


def test_what_is_not_a_nanogpt_gpt2_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    _nanogpt_checkpoint(tmp_path / "ckpt.pt", bias=True)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    cases: list[tuple[Any, str]] = [
        ({**ckpt, "model_args": {**ckpt["model_args"], "use_rmsnorm": True}}, r"model_args .* are not nanoGPT's GPT-2 .* a fork's model"),
        ({k: v for k, v in ckpt.items() if k != "model_args"}, "is not a nanoGPT checkpoint"),
        ({**ckpt, "model_args": {**ckpt["model_args"], "n_embd": 32}}, "its weights do not fit its model_args"),
        ({**ckpt, "model": {k: v for k, v in ckpt["model"].items() if "ln_f" not in k}}, "not nanoGPT's GPT-2 weights .*ln_f"),
        ({**ckpt, "model_args": {**ckpt["model_args"], "vocab_size": 300}}, "do not fit"),
    ]
    for i, (content, message) in enumerate(cases):
        torch.save(content, tmp_path / f"case{i}.pt")
        with pytest.raises(ExportError, match=message):
            export(str(tmp_path / f"case{i}.pt"), tmp_path / f"o{i}", ExportOptions(tokenizer=str(checkpoint)), quiet=True)
    torch.save({"model": ckpt["model"], "model_args": ckpt["model_args"], "optimizer": SimpleNamespace(x=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ExportError, match="cannot read .*pickled.pt as a nanoGPT checkpoint"):  # loaded weights only: no code runs
        export(str(tmp_path / "pickled.pt"), tmp_path / "o", ExportOptions(tokenizer=str(checkpoint)), quiet=True)
    with pytest.raises(ExportError, match="has a tokenizer of its own: --tokenizer is for a nanoGPT or llm.c checkpoint"):
        export(str(checkpoint), tmp_path / "o", ExportOptions(tokenizer=str(checkpoint)), quiet=True)
    with pytest.raises(ExportError, match="is a checkpoint file: a revision is for a hub id"):
        export(str(tmp_path / "ckpt.pt"), tmp_path / "o", ExportOptions(tokenizer=str(checkpoint), revision="main"), quiet=True)
    with pytest.raises(ExportError, match=r"ckpt.pt holds no tokenizer, and '/nowhere' cannot give one .*--tokenizer FOLDER"):
        export(str(tmp_path / "ckpt.pt"), tmp_path / "o", ExportOptions(tokenizer="/nowhere"), quiet=True)
    big = _bigger_tokenizer(checkpoint, tmp_path)
    with pytest.raises(ExportError, match="has 460 tokens, more than the 448 of"):
        export(str(tmp_path / "ckpt.pt"), tmp_path / "o", ExportOptions(tokenizer=str(big)), quiet=True)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def _bigger_tokenizer(checkpoint: Path, tmp_path: Path) -> Path:
    """The checkpoint's tokenizer with 60 tokens added: 460, past the nanoGPT checkpoint's 448."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(60)])
    tokenizer.save_pretrained(tmp_path / "big-tokenizer")
    return tmp_path / "big-tokenizer"


@pytest.mark.parametrize("version", [3, 5])
def test_an_llmc_checkpoint_exports_as_the_gpt2_it_is(checkpoint: Path, tmp_path: Path, version: int) -> None:
    """llm.c's .bin (float32, version 3; bfloat16, version 5), written here as its train_gpt2 writes one (header, then
    every weight in its fixed order): every position's logits and greedy tokens as llm.c computes them (tanh GELU;
    softmax over the real 400 tokens of its 448 padded rows), the model's vocabulary the real one."""
    import onnxgen

    weights, args = _gpt2_weights(True, 448)
    if version == 5:  # what the file holds
        weights = {k: v.to(torch.bfloat16).float() for k, v in weights.items()}
    layers = [torch.stack([weights[f"transformer.h.{layer}.{name}"] for layer in range(2)]) for name in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
        "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    flat = torch.cat([t.reshape(-1) for t in (weights["transformer.wte.weight"], weights["transformer.wpe.weight"], *layers,
                                              weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"])])
    header = np.zeros(256, np.int32)
    header[:8] = [20240326, version, 128, 400, 2, 4, 64, 448]
    data = flat.to(torch.bfloat16).view(torch.int16).numpy() if version == 5 else flat.numpy()
    (tmp_path / "model_00000500.bin").write_bytes(header.tobytes() + data.tobytes())
    result = export(str(tmp_path / "model_00000500.bin"), tmp_path / "out", ExportOptions(tokenizer=str(checkpoint)), quiet=True)
    assert (result["source"]["format"], result["source"]["dtype"]) == ("llm.c", "bfloat16" if version == 5 else "float32")
    model = onnxgen.load(tmp_path / "out", threads=1)
    real = {**weights, "transformer.wte.weight": weights["transformer.wte.weight"][:400]}
    ids = model.tokenizer.encode("It is a truth universally")
    assert model.dims.vocab_size == 400
    np.testing.assert_allclose(model.runtime.all_logits(np.asarray([ids]))[0], _nanogpt_logits(real, args, ids, "tanh").numpy(), atol=1e-4)
    expected = list(ids)
    for _ in range(10):
        expected.append(int(_nanogpt_logits(real, args, expected, "tanh")[-1].argmax()))
    assert model.generate([ids], max_new_tokens=10, do_sample=False, eos_token_id=None)[0].token_ids == expected[len(ids):]
    (tmp_path / "cut.bin").write_bytes((tmp_path / "model_00000500.bin").read_bytes()[:-400])
    with pytest.raises(ExportError, match="cut.bin: .* weights where its header says .*: not a whole llm.c checkpoint"):
        export(str(tmp_path / "cut.bin"), tmp_path / "o", ExportOptions(tokenizer=str(checkpoint)), quiet=True)
