"""What each element type of the key/value cache costs GroupQueryAttention itself on the CPU: one decode step
of every layer's attention alone, with the cache in fp32 (the default), fp16 and int8 (quantize --kv-cache
int8: per-channel scales), at a short and a long context.

    python benchmarks/attention.py --threads 2

The decode step of a model is its weights' MatMuls plus this; benchmarks/cache.py measures whole models.
Each layer has a cache of its own (a model's working set, not one layer's that fits in the CPU's caches),
bound in place as the runtime binds it; the figure is the median over --runs passes over all layers, the
cache types taken in turns, each turn in a session of its own after an untimed pass.
fp16 is here because it is the other way to halve the cache: onnxruntime's CPU kernel converts it to fp32
to compute, so it is judged by this measure, not assumed. Results: benchmarks/results/attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from onnxgen.folder import past_names, present_names

HERE = Path(__file__).resolve().parent
SHAPES = {"gpt2": (12, 12, 64), "gpt2-large": (36, 20, 64)}  # layers, heads, head size
CACHES = ["fp32", "fp16", "int8"]


PAST, PRESENT = past_names(1), present_names(1)  # one layer's names, as the model's graph has them
SCALE = 0.02  # the int8 cache's scale for every channel: values of about +-2, as the float caches get


def attention_session(cache: str, heads: int, head_dim: int, threads: int) -> Any:
    """One GroupQueryAttention over GPT-2's packed QKV (fp32, as the model gives it), its cache in `cache`: the
    int8 one made by graph.quantize_cache, the edit `quantize --kv-cache int8` makes."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper

    from onnxgen.graph import quantize_cache

    hidden, query, out = heads * head_dim, "qkv", "out"
    element = T.FLOAT16 if cache == "fp16" else T.FLOAT
    nodes = []
    if cache == "fp16":  # the kernel's inputs and cache share one type: the query converts on the way in and out
        query, out = "qkv16", "out16"
        nodes += [helper.make_node("Cast", ["qkv"], [query], to=T.FLOAT16), helper.make_node("Cast", [out], ["out"], to=T.FLOAT)]
    nodes.insert(1 if cache == "fp16" else 0, helper.make_node(
        "GroupQueryAttention", [query, "", "", *PAST, "seqlens_k", "total"], [out, *PRESENT], name="attention",
        domain="com.microsoft", num_heads=heads, kv_num_heads=heads))
    cache_shape = [1, heads, "capacity", head_dim]
    graph = helper.make_graph(nodes, "attention", [
        helper.make_tensor_value_info("qkv", T.FLOAT, [1, 1, 3 * hidden]),
        *(helper.make_tensor_value_info(name, element, cache_shape) for name in PAST),
        helper.make_tensor_value_info("seqlens_k", T.INT32, [1]),
        helper.make_tensor_value_info("total", T.INT32, []),
    ], [helper.make_tensor_value_info("out", T.FLOAT, [1, 1, hidden]),
        *(helper.make_tensor_value_info(name, element, cache_shape) for name in PRESENT)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    if cache == "int8":
        quantize_cache(model, {name: np.full(hidden, SCALE, np.float32) for name in PAST})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def step_ms(shape: tuple[int, int, int], positions: list[int], threads: int, runs: int) -> dict[str, dict[int, float]]:
    """Per cache type and context length: milliseconds for one decode step of every layer's attention. The
    cache types are taken in turns, so that a drift of the machine's bandwidth (a third within minutes on
    some hosts) cannot favour one."""
    import onnxruntime as ort

    layers, heads, head_dim = shape
    rng = np.random.default_rng(0)
    capacity = max(positions) + 64
    qkv = rng.standard_normal((1, 1, 3 * heads * head_dim)).astype(np.float32)
    values = {}
    for cache in CACHES:
        # Values of one size in every type (int8 ones through SCALE): a float cache of large values would
        # time softmax's underflow into subnormals instead of the attention.
        size = (1, heads, capacity, head_dim)
        make = (lambda: rng.integers(-100, 100, size, dtype=np.int8)) if cache == "int8" else \
            (lambda: (rng.integers(-100, 100, size) * SCALE).astype(np.float16 if cache == "fp16" else np.float32))
        values[cache] = [[ort.OrtValue.ortvalue_from_numpy(make()) for _ in range(2)] for _ in range(layers)]
    times: dict[tuple[str, int], list[float]] = {}
    for n in positions:
        for _ in range(runs):
            for cache in CACHES:
                # One session at a time, as a model runs: with all three alive these times doubled (their pools compete).
                session = attention_session(cache, heads, head_dim, threads)
                _pass(session, values[cache], qkv, n)  # warm-up
                times.setdefault((cache, n), []).append(_pass(session, values[cache], qkv, n))
                del session
    return {cache: {n: float(np.median(times[cache, n])) * 1e3 for n in positions} for cache in CACHES}


def _pass(session: Any, values: list[list[Any]], qkv: np.ndarray, n: int) -> float:
    """Seconds for one decode step through every layer's attention, after n positions."""
    start = time.perf_counter()
    for key, value in values:
        io = session.io_binding()
        io.bind_cpu_input("qkv", qkv)
        io.bind_cpu_input("seqlens_k", np.array([n], np.int32))
        io.bind_cpu_input("total", np.array(n + 1, np.int32))
        for past, present, buffer in zip(PAST, PRESENT, (key, value)):
            io.bind_ortvalue_input(past, buffer)
            io.bind_ortvalue_output(present, buffer)
        io.bind_output("out")
        session.run_with_iobinding(io)
    return time.perf_counter() - start


def markdown(result: dict[str, Any]) -> str:
    positions = result["positions"]
    lines = ["# GroupQueryAttention alone, by the cache's element type (CPU)", "",
             f"onnxruntime {result['onnxruntime']}, {result['threads']} threads; one decode step of every layer's attention "
             f"(batch 1), the median of {result['runs']} passes; `python benchmarks/attention.py --threads {result['threads']}`.", "",
             "| model | cache | " + " | ".join(f"ms @{n}" for n in positions) + " | " + " | ".join(f"vs fp32 @{n}" for n in positions) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in positions * 2) + " |"]
    for row in result["rows"]:
        fp32 = next(r for r in result["rows"] if r["model"] == row["model"] and r["cache"] == "fp32")
        lines.append(f"| {row['model']} | {row['cache']} | " + " | ".join(f"{row['ms'][str(n)]:.2f}" for n in positions) + " | "
                     + " | ".join(f"{row['ms'][str(n)] / fp32['ms'][str(n)]:.2f}" for n in positions) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--positions", nargs="+", type=int, default=[64, 544])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    import onnxruntime

    rows = []
    for model in args.models:
        for cache, ms in step_ms(SHAPES[model], args.positions, args.threads, args.runs).items():
            rows.append({"model": model, "cache": cache, "ms": {str(n): v for n, v in ms.items()}})
    result = {"onnxruntime": onnxruntime.__version__, "threads": args.threads, "runs": args.runs, "positions": args.positions, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "attention.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
