"""onnxruntime's int4 kernel alone: one MatMulNBits node at batch 1 (a decode step's matrix-vector product) for
GPT-2's matrix shapes and int4 block sizes, against the read bandwidth measured in the same run.

    python benchmarks/matmulnbits.py --threads 2

Each case is a graph of copies of one node (random 4-bit weights, accuracy level 4: int8 compute, quantize's
default), enough of them that the weights are past the L3 cache, as a model's are; the time is the median of
15 runs over the copies. Reported: GB/s of file bytes (4-bit weights and fp32 scales) and that over the read
bandwidth. Results: benchmarks/results/matmulnbits.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import bandwidth_gbs, host, write_results  # noqa: E402  (the suite's own measure)

# (in, out) of each weight matrix: attention's packed QKV, its projection, the MLP's two, the tied head
SHAPES = {"gpt2": [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)],
          "gpt2-large": [(1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280), (1280, 50257)]}
BLOCKS = [32, 64, 128, 256]
PAST_CACHE_BYTES = 96 * 2**20  # copies until the weights are this large


def graph(k: int, n: int, block: int, copies: int) -> tuple[bytes, int]:
    """A model of `copies` MatMulNBits nodes on one input, and the bytes of their weights and scales."""
    from onnx import TensorProto, helper, numpy_helper

    blocks, rng = -(-k // block), np.random.default_rng(0)
    inits, nodes, outputs = [], [], []
    for i in range(copies):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), f"w{i}"),
                  numpy_helper.from_array((rng.random(n * blocks) * 0.01).astype(np.float32), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=block, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1, n]))
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                                                outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString(), copies * n * blocks * (block // 2 + 4)


def measure(k: int, n: int, block: int, threads: int) -> float:
    """GB/s of file bytes through one node."""
    import onnxruntime as ort

    per_copy = n * -(-k // block) * (block // 2 + 4)
    model, size = graph(k, n, block, max(1, -(-PAST_CACHE_BYTES // per_copy)))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).random((1, 1, k), dtype=np.float32)}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return size / float(np.median(times)) / 1e9


def markdown(result: dict[str, Any]) -> str:
    lines = ["# MatMulNBits alone: int4 GB/s of file bytes at batch 1 (CPU)", "",
             f"{result['environment']}; {result['threads']} threads; accuracy level 4; read bandwidth {result['bandwidth_gbs']:.1f} GB/s "
             "(measured first); `python benchmarks/matmulnbits.py`.", "",
             "| model | in x out | " + " | ".join(f"block {b} GB/s (of bound)" for b in BLOCKS) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in BLOCKS) + " |"]
    for row in result["rows"]:
        cells = [f"{row[str(b)]:.1f} ({row[str(b)] / result['bandwidth_gbs']:.2f})" for b in BLOCKS]
        lines.append(f"| {row['model']} | {row['k']} x {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    bandwidth = bandwidth_gbs(args.threads)["read"]
    rows = [{"model": model, "k": k, "n": n, **{str(b): measure(k, n, b, args.threads) for b in BLOCKS}}
            for model in args.models for k, n in SHAPES[model]]
    result = {"environment": host(),
              "threads": args.threads, "bandwidth_gbs": bandwidth, "rows": rows}
    write_results(args.out, "matmulnbits", result, markdown(result))


if __name__ == "__main__":
    main()
