"""Cold start of an edge service: a fresh Python process's import, load and first token (issue 16).

    python benchmarks/cold_start.py onnxgen/bundled/prose-mini benchmarks/exports/gpt2-large/memory-parts-int4 --runs 5

Each run is a new interpreter (`python -c` with nothing imported before), timed inside: `import onnxgen`, then
`onnxgen.load(folder)` (config, tokenizer, onnxruntime session: its graph passes and weight packing), then a
one-token generate from a short prompt. The interpreter's own start is timed apart (`python -c pass` from the
outside) so the total is what a service waits for. Folders are taken in turns. Results:
benchmarks/results/cold_start.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHILD = """
import time, json, sys
t0 = time.perf_counter()
import onnxgen
t1 = time.perf_counter()
model = onnxgen.load(sys.argv[1], threads={threads})
t2 = time.perf_counter()
model.generate("The", max_new_tokens=1, min_new_tokens=1)
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2}}))
"""


def interpreter_s() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def one(folder: str, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads), folder], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {f: [] for f in args.folders}
    interpreter = []
    for _ in range(args.runs):
        interpreter.append(interpreter_s())
        for folder in args.folders:
            runs[folder].append(one(folder, args.threads))
    python = statistics.median(interpreter)
    rows: list[dict[str, Any]] = []
    for folder, samples in runs.items():
        row: dict[str, Any] = {"folder": folder}
        for key in ("import_s", "load_s", "first_token_s"):
            values = [s[key] for s in samples]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        totals = [python + sum(s.values()) for s in samples]
        row["total_s"] = {"median": statistics.median(totals), "min": min(totals), "max": max(totals)}
        rows.append(row)
    result = {"runs": args.runs, "threads": args.threads, "interpreter_s": python, "folders": rows}
    lines = ["# Cold start: a new process's import, load and first token", "",
             f"`python benchmarks/cold_start.py {' '.join(args.folders)} --runs {args.runs} --threads {args.threads}`: medians "
             f"(min-max) of {args.runs} fresh processes, folders in turns; the interpreter's own start ({python * 1000:.0f} ms, "
             "`python -c pass`) is in the total.", "",
             "| folder | import ms | load ms | first token ms | total ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        cells = [f"{row[k]['median'] * 1000:.0f} ({row[k]['min'] * 1000:.0f}-{row[k]['max'] * 1000:.0f})"
                 for k in ("import_s", "load_s", "first_token_s", "total_s")]
        lines.append(f"| {row['folder']} | {' | '.join(cells)} |")
    (HERE / "results" / "cold_start.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "results" / "cold_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
