"""How much of the cache beam search's reorders copy: the positions past where each moved beam parted from the beam
it becomes (Rows.alike, since session 33), against each moved beam's positions past the prompt (what session 32's
reorders copied) and its whole written length (before that).

    python benchmarks/beam_copies.py onnxgen/bundled/prose-mini benchmarks/exports/gpt2/int8 --beams 4 --new-tokens 128

A count, not a timing: it says how much of their history a model's beams share, which decides what the reorders
cost (for gpt2 int8, 4 beams x 256 tokens, a third of the call before). One call per folder, from a line of prose
(a trained model's beams are what matters; a random-weight folder's are shown beside it). Results:
<out>/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

import onnxgen
from onnxgen.cache import InPlaceCache

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import host, write_results  # the suite's own

PROSE = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness,"


def copies(folder: str, beams: int, new_tokens: int) -> dict[str, Any]:
    """Positions that one beam search call's reorders copy: with Rows.alike, past the prompt, whole."""
    model = onnxgen.load(folder, threads=2)
    prompt = len(model.tokenizer.encode(PROSE))
    counted: list[tuple[int, int, int]] = []
    reorder = InPlaceCache.reorder

    def counting(cache: InPlaceCache, source: np.ndarray, alike: np.ndarray | None = None) -> None:
        moved = np.flatnonzero(source != np.arange(cache.rows))
        lengths = cache.lengths[source[moved]]
        starts = np.zeros(len(moved), np.int64) if alike is None else alike[moved]
        counted.append((int(np.maximum(lengths - starts, 0).sum()), int((lengths - prompt).sum()), int(lengths.sum())))
        reorder(cache, source, alike)

    InPlaceCache.reorder = counting  # type: ignore[method-assign]
    try:
        model.generate(PROSE, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    finally:
        InPlaceCache.reorder = reorder  # type: ignore[method-assign]
    steps = counted[1:]  # the first reorder copies the prompt's pass to the other beams (InPlaceCache.spread)
    now, past_prompt, whole = (sum(c[i] for c in steps) for i in range(3))
    return {"folder": folder, "prompt_tokens": prompt, "reorders": len(steps), "positions_copied": now,
            "positions_past_prompt": past_prompt, "positions_whole": whole}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="beam_copies")
    args = ap.parse_args()
    rows = [copies(folder, args.beams, args.new_tokens) for folder in args.folders]
    command = f"python benchmarks/beam_copies.py {' '.join(args.folders)} --beams {args.beams} --new-tokens {args.new_tokens}"
    lines = [f"# Positions beam search's reorders copy ({args.beams} beams, {args.new_tokens} new tokens)", "",
             f"{host()}; `{command}`.", "",
             "| folder | prompt tokens | reorders | copied past where a beam parted | past the prompt (session 32) | whole (before) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['folder']} | {r['prompt_tokens']} | {r['reorders']} | {r['positions_copied']:,} | "
              f"{r['positions_past_prompt']:,} ({r['positions_copied'] / r['positions_past_prompt']:.1%}) | "
              f"{r['positions_whole']:,} ({r['positions_copied'] / r['positions_whole']:.1%}) |" for r in rows]
    write_results(args.out, args.name, {"beams": args.beams, "new_tokens": args.new_tokens, "command": command, "rows": rows},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
