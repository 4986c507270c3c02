"""One loaded model shared by several threads, against the same calls made one after another.

    python benchmarks/threads.py onnxgen/bundled/prose-mini --threads 8 --calls 400

Each call is a seeded sampling generate() of a short prompt; the threaded run must return exactly the
serial results (it exits non-zero otherwise). Prints tokens per second both ways and their ratio. On a
small model a call is mostly Python, which holds the GIL; on a large one it is mostly onnxruntime's
forward, which releases it, so threads overlap more.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxgen
from onnxgen.model import BUNDLED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=BUNDLED)
    ap.add_argument("--threads", type=int, default=8, help="Python threads sharing the model")
    ap.add_argument("--intra-op-threads", type=int, default=1, help="onnxruntime's threads per call")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    model = onnxgen.load(args.folder, threads=args.intra_op_threads)

    def call(i: int) -> list[onnxgen.Completion]:
        return model.generate(f"Call number {i} begins", max_new_tokens=args.new_tokens, do_sample=True, seed=i)

    call(0)  # warm-up
    start = time.perf_counter()
    serial = [call(i) for i in range(args.calls)]
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        threaded = list(pool.map(call, range(args.calls)))
    threaded_s = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for cs in serial for c in cs)
    print(f"{args.folder}: {args.calls} calls, {tokens} tokens; serial {tokens / serial_s:,.0f} tok/s, "
          f"{args.threads} threads {tokens / threaded_s:,.0f} tok/s ({serial_s / threaded_s:.2f}x); "
          f"results identical: {threaded == serial}")
    if threaded != serial:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
