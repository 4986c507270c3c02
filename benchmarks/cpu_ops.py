"""Where a CPU decode step goes, by onnxruntime operator, and how fast its two big readers read: the weights'
products (MatMul and its quantized kinds) over the weight bytes a step reads, attention over the cache's bytes,
beside the read bandwidth probed in the same process (issue 14: what keeps int8 and int4 below 0.9 of the
ceiling when the cache costs one read).

    python benchmarks/cpu_ops.py benchmarks/exports/gpt2-large/in-place-int8 --prompt-tokens 512

onnxruntime's profiler times every node of every run. onnxgen.load makes its own session options, so the
profiler is switched on by wrapping onnxruntime's SessionOptions for that load. The profiler adds a few us to
each node, so the rates are a little low and the profiled step a little long: the step is also timed without
the profiler (a second load, turns alternating). At batch 1, --steps decode steps after the prompt, medians per
step over --runs calls. Results: benchmarks/results/cpu_ops.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cache import cache_bytes, step_seconds  # noqa: E402  (the suite's own measures)
from run import bandwidth_gbs, host, streamed_bytes, write_results  # noqa: E402

PRODUCTS = {"MatMul", "FusedMatMul", "Gemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "MatMulNBits"}
ATTENTION = {"GroupQueryAttention", "MultiHeadAttention", "Attention"}


def load(folder: Path, threads: int, profile_prefix: str | None) -> Any:
    import onnxruntime as ort

    import onnxgen

    if profile_prefix is None:
        return onnxgen.load(folder, threads=threads)
    plain = ort.SessionOptions

    def profiled() -> Any:
        options = plain()
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
        return options

    ort.SessionOptions = profiled
    try:
        return onnxgen.load(folder, threads=threads)
    finally:
        ort.SessionOptions = plain


def measure(folder: Path, threads: int, prompt_tokens: int, steps: int, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        profiled, plain = load(folder, threads, f"{tmp}/ort"), load(folder, threads, None)
        ids = np.random.default_rng(0).integers(0, plain.dims.vocab_size, size=(1, prompt_tokens)).tolist()
        wall = {"profiled": [], "plain": []}
        bandwidths = []
        for round_ in range(runs):
            bandwidths.append(bandwidth_gbs(threads)["read"])
            for name, model in [("profiled", profiled), ("plain", plain)][:: 1 if round_ % 2 == 0 else -1]:
                wall[name].append(step_seconds(model, ids, steps))
        events = json.loads(Path(profiled.runtime.session.end_profiling()).read_text())
    runs_ = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    # Each call is one prompt pass and then decode runs: keep the decode runs, every call's but its first run.
    calls = [runs_[i:i + steps] for i in range(0, len(runs_), steps)]
    decode_runs = [run for call in calls for run in call[1:]]
    op_us: Counter[str] = Counter()
    for run in decode_runs:
        end = run["ts"] + run["dur"]
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and run["ts"] <= e["ts"] <= end:
                op_us[e["args"]["op_name"]] += e["dur"]
    per_step = {op: us / len(decode_runs) / 1e3 for op, us in op_us.most_common()}
    weights, cache = streamed_bytes("onnxgen", folder), cache_bytes(folder, prompt_tokens + steps // 2)
    products_ms = sum(ms for op, ms in per_step.items() if op in PRODUCTS)
    attention_ms = sum(ms for op, ms in per_step.items() if op in ATTENTION)
    return {"folder": str(folder), "threads": threads, "prompt_tokens": prompt_tokens, "steps": steps, "runs": runs,
            "read_gbs": bandwidths, "streamed_bytes": weights, "cache_bytes": cache,
            "step_ms": {name: statistics.median(v) * 1e3 for name, v in wall.items()},
            "op_ms_per_step": per_step, "products_gbs": weights / products_ms / 1e6, "attention_gbs": cache / attention_ms / 1e6}


def markdown(results: list[dict[str, Any]], environment: str) -> str:
    lines = ["# Where a CPU decode step goes, by onnxruntime operator", "",
             (f"{environment}; batch 1, medians over the calls. The weights' products read the weight bytes a step reads "
              "(benchmarks/run.py streamed_bytes), attention the cache at the middle of the new tokens; the profiler adds a "
              "few us to each node, so both rates are a little low. `python benchmarks/cpu_ops.py FOLDER...`."), ""]
    for r in results:
        read = r["read_gbs"]
        lines += [f"## {Path(r['folder']).parent.name}/{Path(r['folder']).name}, {r['prompt_tokens']}-token prompt", "",
                  (f"Step {r['step_ms']['plain']:.2f} ms ({r['step_ms']['profiled']:.2f} profiled); the weights' products read "
                   f"{r['streamed_bytes'] / 1e6:.0f} MB at {r['products_gbs']:.1f} GB/s, attention {r['cache_bytes'] / 1e6:.0f} MB of "
                   f"cache at {r['attention_gbs']:.1f} GB/s; the probe read {min(read):.1f}-{max(read):.1f} GB/s."), "",
                  "| operator | ms a step | share of the profiled step |", "| --- | ---: | ---: |"]
        lines += [f"| {op} | {ms:.3f} | {ms / r['step_ms']['profiled']:.1%} |" for op, ms in r["op_ms_per_step"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    results = [measure(folder, args.threads, prompt, args.steps, args.runs) for folder in args.folders for prompt in args.prompt_tokens]
    write_results(args.out, "cpu_ops", {"environment": host(), "results": results}, markdown(results, host()))


if __name__ == "__main__":
    main()
