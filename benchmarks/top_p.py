"""What top-p costs per row and step at GPT-2's vocabulary, by how peaked the row is, against transformers.

    python benchmarks/top_p.py [--out DIR] [--name top_p]

A trained model's row keeps tens to hundreds of GPT-2's 50,257 tokens at top_p 0.9; a model with random weights
(every benchmark folder here) gives near-flat rows that keep tens of thousands. The rows are normal scores
times a spread (the larger, the more peaked; the table shows how many tokens each keeps), 8 of each; onnxgen's
`logits.top_p` and transformers' `TopPLogitsWarper` (torch, CPU, one thread) filter the same rows in turns, and
the table gives the median time per row. To compare with another checkout, run this file with that
checkout first on PYTHONPATH (`PYTHONPATH=DIR python benchmarks/top_p.py --name NAME`): the reference is timed
again in the same run. Results: benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import onnxgen
from onnxgen import logits

HERE = Path(__file__).resolve().parent
VOCAB = 50257
SPREADS = [1.0, 2.0, 3.0, 4.0, 6.0]
PS = [0.9, 0.95]


def measure(spread: float, p: float, rows: int, turns: int) -> dict[str, Any]:
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.set_num_threads(1)
    scores = np.random.default_rng(int(spread * 10)).normal(size=(rows, VOCAB)).astype(np.float32) * np.float32(spread)
    ours, reference = logits.top_p(p), TopPLogitsWarper(p)
    ids = torch.zeros((rows, 1), dtype=torch.long)
    as_torch = torch.from_numpy(scores)
    kept = np.isfinite(ours(scores, [], 0)).sum(axis=1)
    times: dict[str, list[float]] = {"onnxgen": [], "transformers": []}
    for _ in range(turns):
        start = time.perf_counter()
        ours(scores, [], 0)
        times["onnxgen"].append((time.perf_counter() - start) / rows)
        start = time.perf_counter()
        reference(ids, as_torch.clone())
        times["transformers"].append((time.perf_counter() - start) / rows)
    return {"spread": spread, "p": p, "kept_median": int(np.median(kept)), "kept_min": int(kept.min()), "kept_max": int(kept.max()),
            **{f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}}


def markdown(result: dict[str, Any]) -> str:
    header = (f"onnxgen from {result['onnxgen']}; {result['rows']} rows of {VOCAB} scores per case, medians of {result['turns']} "
              f"turns; `{result['command']}`")
    lines = [header, "",
             "| spread | top_p | tokens kept (min-max) | onnxgen ms/row | transformers ms/row | onnxgen / transformers |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["cases"]:
        lines.append(f"| {r['spread']:g} | {r['p']:g} | {r['kept_min']:,}-{r['kept_max']:,} | {r['onnxgen_ms']:.3f} | "
                     f"{r['transformers_ms']:.3f} | {r['onnxgen_ms'] / r['transformers_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--turns", type=int, default=15)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="top_p")
    args = ap.parse_args()
    cases = [measure(spread, p, args.rows, args.turns) for spread in SPREADS for p in PS]
    command = f"python benchmarks/top_p.py --rows {args.rows} --turns {args.turns} --name {args.name}"
    result = {"onnxgen": str(Path(onnxgen.__file__).parent.parent), "rows": args.rows, "turns": args.turns, "command": command, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
