"""One loaded model shared by several threads, against the same calls made one after another.

    python benchmarks/threads.py onnxgen/bundled/prose-mini --threads 8 --calls 400
    python benchmarks/threads.py FOLDER --threads 8 --calls 48 --strategy greedy --out benchmarks/results

Three ways in one run, in turns: the calls one after another (onnxruntime on every core); from `--threads`
threads on a model loaded as usual (each call alone, onnxruntime on `--intra-op-threads` cores a call, so that
calls overlap); and from as many threads on a model loaded with max_batch=threads, whose calls share steps
(continuous batching, onnxruntime on every core). Each call generates from a prompt of its own, seeded sampling or
greedy. The threaded results must equal the serial ones (it exits non-zero otherwise); the batched ones
too, except on int8, whose steps quantize each step's activations with one scale for all rows (those that agree
are counted). Prints tokens per second each way and the ratios to serial. On a small model a call is mostly
Python, which holds the GIL; on a large one it is mostly onnxruntime's forward, which releases it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxgen
from onnxgen.model import BUNDLED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=BUNDLED)
    ap.add_argument("--threads", type=int, default=8, help="Python threads sharing the model (the batched model's max_batch)")
    ap.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime's threads per call, threads without batching")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--strategy", choices=["seeded", "greedy"], default="seeded")
    ap.add_argument("--rounds", type=int, default=1, help="each way this many times, in turns; the best time counts")
    ap.add_argument("--out", type=Path, help="write threads-<folder>.json there")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    alone = onnxgen.load(args.folder, threads=cores)
    overlapping = onnxgen.load(args.folder, threads=args.intra_op_threads)
    batched = onnxgen.load(args.folder, threads=cores, max_batch=args.threads)
    seeded = args.strategy == "seeded"

    def calls(model: onnxgen.Model) -> Callable[[int], list[int]]:
        return lambda i: model.generate(f"Call number {i} begins", max_new_tokens=args.new_tokens, do_sample=seeded,
                                        seed=i if seeded else None)[0].token_ids

    def serially(model: onnxgen.Model) -> list[list[int]]:
        return [calls(model)(i) for i in range(args.calls)]

    def threaded(model: onnxgen.Model) -> list[list[int]]:
        with ThreadPoolExecutor(args.threads) as pool:
            return list(pool.map(calls(model), range(args.calls)))

    ways = {"serial": (alone, serially), "threads": (overlapping, threaded), "threads, max_batch": (batched, threaded)}
    for model, _ in ways.values():
        calls(model)(0)  # warm-up
    seconds: dict[str, float] = {}
    results: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, (model, run) in ways.items():
            start = time.perf_counter()
            results[name] = run(model)
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
    tokens = sum(map(len, results["serial"]))
    agree = {name: sum(a == b for a, b in zip(got, results["serial"])) for name, got in results.items()}
    report = {"folder": str(args.folder), "calls": args.calls, "tokens": tokens, "threads": args.threads, "strategy": args.strategy,
              "tok_s": {name: tokens / s for name, s in seconds.items()}, "agree": agree,
              "batcher": {"steps": batched._batcher.steps, "jobs": batched._batcher.jobs} if batched._batcher else None}
    print(f"{args.folder}: {args.calls} calls ({args.strategy}), {tokens} tokens, {args.threads} threads")
    for name, s in seconds.items():
        print(f"  {name:20} {tokens / s:8,.0f} tok/s  {seconds['serial'] / s:5.2f}x serial  calls equal to serial: {agree[name]}/{args.calls}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"threads-{args.folder.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    quantized = (alone.manifest.get("quantization") or {}).get("mode") == "int8"
    if agree["threads"] != args.calls or (agree["threads, max_batch"] != args.calls and not quantized):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
