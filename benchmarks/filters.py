"""What top-k and top-p cost per row and step at GPT-2's vocabulary, by how peaked the row is, against transformers.

    python benchmarks/filters.py [--out DIR] [--name filters]

A trained model's row keeps tens to hundreds of GPT-2's 50,257 tokens at top_p 0.9; a model with random weights
(every benchmark folder here) gives near-flat rows that keep tens of thousands. The rows are normal scores
times a spread (the larger, the more peaked; the table shows how many tokens top-p keeps), 8 of each;
onnxgen's filter and transformers' warper (torch, CPU, one thread) filter the same rows in turns, and the table
gives the median time per row. To compare with another checkout, run this file with that checkout first on
PYTHONPATH (`PYTHONPATH=DIR python benchmarks/filters.py --name NAME`): the reference is timed again in the
same run. Results: benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import onnxgen
from onnxgen import logits

HERE = Path(__file__).resolve().parent
VOCAB = 50257
SPREADS = [1.0, 2.0, 3.0, 4.0, 6.0]
FILTERS = ["top_k 50", "top_p 0.9", "top_p 0.95"]


def steady_heap() -> None:
    """Keep freed memory in the process, as it is in a decode loop (where glibc's heap stays large): by default glibc
    maps every array over 128 KiB afresh and hands it back when freed, so a loop of filters alone page-faults on
    each new row-sized array (550 faults a call here), which inflated the timings by up to 2x."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 28)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD


def measure(spread: float, name: str, rows: int, turns: int) -> dict[str, Any]:
    import torch
    from transformers.generation.logits_process import (
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.set_num_threads(1)
    scores = np.random.default_rng(int(spread * 10)).normal(size=(rows, VOCAB)).astype(np.float32) * np.float32(spread)
    kind, value = name.split()
    if kind == "top_k":
        ours, reference = logits.top_k(int(value)), TopKLogitsWarper(int(value))
    else:
        ours, reference = logits.top_p(float(value)), TopPLogitsWarper(float(value))
    ids = torch.zeros((rows, 1), dtype=torch.long)
    as_torch = torch.from_numpy(scores)
    kept = np.isfinite(logits.top_p(0.9)(scores, [], 0)).sum(axis=1)
    times: dict[str, list[float]] = {"onnxgen": [], "transformers": []}
    for _ in range(turns):
        start = time.perf_counter()
        ours(scores, [], 0)
        times["onnxgen"].append((time.perf_counter() - start) / rows)
        start = time.perf_counter()
        reference(ids, as_torch.clone())
        times["transformers"].append((time.perf_counter() - start) / rows)
    return {"spread": spread, "filter": name, "kept_median": int(np.median(kept)), "kept_min": int(kept.min()), "kept_max": int(kept.max()),
            **{f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}}


def markdown(result: dict[str, Any]) -> str:
    header = (f"onnxgen from {result['onnxgen']}; {result['rows']} rows of {VOCAB} scores per case, medians of {result['turns']} "
              f"turns; `{result['command']}`")
    lines = [header, "",
             "| spread | tokens top_p 0.9 keeps (min-max) | filter | onnxgen ms/row | transformers ms/row | onnxgen / transformers |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["cases"]:
        lines.append(f"| {r['spread']:g} | {r['kept_min']:,}-{r['kept_max']:,} | {r['filter']} | {r['onnxgen_ms']:.3f} | "
                     f"{r['transformers_ms']:.3f} | {r['onnxgen_ms'] / r['transformers_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--turns", type=int, default=15)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="filters")
    args = ap.parse_args()
    steady_heap()
    cases = [measure(spread, name, args.rows, args.turns) for spread in SPREADS for name in FILTERS]
    command = f"python benchmarks/filters.py --rows {args.rows} --turns {args.turns} --name {args.name}"
    result = {"onnxgen": str(Path(onnxgen.__file__).parent.parent), "rows": args.rows, "turns": args.turns, "command": command, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
