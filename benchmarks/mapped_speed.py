"""Decode speed with `mapped_weights` against the default, both models loaded in one process and their calls
taken in turns, so that both see the same machine (footprint.py runs each case in a process of its own, where
this host's bandwidth drifts between them).

    python benchmarks/mapped_speed.py benchmarks/exports/gpt2-large/memory-parts-{fp32,int8,int4} --threads 2

Batch 1, 32-token prompt, 64 greedy tokens, --rounds calls each after a warm-up; the packed copies are made
first (prepacked.py, in $ONNXGEN_CACHE). Results: benchmarks/results/mapped_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

import onnxgen

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    rows = []
    for folder in args.folders:
        models = {"default": onnxgen.load(folder, threads=args.threads), "mapped": onnxgen.load(folder, threads=args.threads, mapped_weights=True)}
        prompt = np.random.default_rng(0).integers(0, models["default"].dims.vocab_size, size=(1, 32)).tolist()
        speeds: dict[str, list[float]] = {name: [] for name in models}
        for model in models.values():
            model.generate(prompt, max_new_tokens=8, eos_token_id=None, min_new_tokens=0)
        for r in range(args.rounds):
            for name in (list(models) if r % 2 == 0 else list(reversed(models))):
                models[name].generate(prompt, max_new_tokens=64, eos_token_id=None, min_new_tokens=0)
                speeds[name].append(models[name].last_stats.decode_tokens_per_s)
        rows.append({"folder": str(folder), **{f"{name}_tok_s": statistics.median(v) for name, v in speeds.items()}, "raw": speeds})
        print(rows[-1], flush=True)
        del models
    lines = [f"# mapped_weights against the default, one process, calls in turns ({args.threads} threads)", "",
             f"`python benchmarks/mapped_speed.py FOLDER... --threads {args.threads} --rounds {args.rounds}`; batch 1, "
             "32-token prompt, 64 greedy tokens, medians.", "",
             "| folder | default tok/s | mapped tok/s | mapped / default |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['folder']} | {r['default_tok_s']:.1f} | {r['mapped_tok_s']:.1f} | {r['mapped_tok_s'] / r['default_tok_s']:.3f} |" for r in rows]
    (HERE / "results" / "mapped_speed.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "results" / "mapped_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
