"""The gpt2-large shape (36 x 1280 x 20, vocab 50257, context 1024; random weights): run with -m slow.
Its 3.1 GB of weights pass protobuf's 2 GB limit, so this is the external-data path for real."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import onnxgen
from onnxgen.export import export

from .conftest import make_checkpoint


@pytest.mark.slow
def test_gpt2_large_shape_exports_and_generates(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", n_layer=36, n_embd=1280, n_head=20, n_positions=1024,
                           vocab_size=50257, initializer_range=0.02)
    out = tmp_path / "large"
    m = export(str(ckpt), out, quiet=True)
    assert m["graph"]["external_data"] and m["validation"]["passed"]
    assert m["graph"]["head_parts"] == 16  # 257 MB of embedding, 16 MiB a part, each pointing into it
    assert m["files"]["model.onnx.data"]["bytes"] > 3.0e9 and m["files"]["model.onnx"]["bytes"] < 5e6
    assert json.loads((out / "onnxgen.json").read_text())["dims"]["n_layer"] == 36
    # Every layer fused as in the tiny model (eager attention's 1024 x 1024 mask lay in the data file, and
    # onnxruntime's shape inference, unable to read it, left SkipLayerNormalization out: 73 LayerNorms and Adds).
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert (ops.count("SkipLayerNormalization"), ops.count("GroupQueryAttention"), ops.count("FastGelu")) == (72, 36, 36)
    assert ops.count("LayerNormalization") == 1 and "Reshape" not in ops and "Shape" not in ops
    model = onnxgen.load(out)
    c = model.generate([list(range(100, 140))], max_new_tokens=4)[0]
    assert len(c.token_ids) == 4
