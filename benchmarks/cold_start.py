"""Cold start of an edge service: a fresh Python process's import, load and first token (issue 16).

    python benchmarks/cold_start.py onnxgen/bundled/prose-mini benchmarks/exports/gpt2-large/memory-parts-int4 --runs 5
    python benchmarks/cold_start.py DIR --mapped DIR --drop-caches --out cold_start-dropped   # root, Linux

Each run is a new interpreter (`python -c` with nothing imported before), timed inside: `import onnxgen`, then
`onnxgen.load(folder)` (config, tokenizer, onnxruntime session: its graph passes and weight packing), then a
one-token generate from a short prompt. The interpreter's own start is timed apart (`python -c pass` from the
outside) so the total is what a service waits for. Folders are taken in turns; a folder given to --mapped is
also timed loaded with mapped_weights=True. --drop-caches empties the page cache before every process (a
service's first start after boot; needs root), else the folders' files are in it (a restart). Results:
benchmarks/results/OUT.{json,md} (OUT: cold_start).
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
model = onnxgen.load(sys.argv[1], threads={threads}, mapped_weights=sys.argv[2] == "mapped")
t2 = time.perf_counter()
model.generate("The", max_new_tokens=1, min_new_tokens=1)
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2}}))
"""


def interpreter_s() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def one(folder: str, mapped: bool, threads: int, drop_caches: bool) -> dict[str, float]:
    if drop_caches:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1")
    out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads), folder, "mapped" if mapped else "packed"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mapped", nargs="+", default=[], help="folders also timed with mapped_weights=True")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each process (root)")
    ap.add_argument("--out", default="cold_start")
    args = ap.parse_args()
    cases = [(f, False) for f in args.folders] + [(f, True) for f in args.mapped]
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {c: [] for c in cases}
    interpreter = []
    for _ in range(args.runs):
        interpreter.append(interpreter_s())
        for folder, mapped in cases:
            runs[folder, mapped].append(one(folder, mapped, args.threads, args.drop_caches))
    python = statistics.median(interpreter)
    rows: list[dict[str, Any]] = []
    for (folder, mapped), samples in runs.items():
        row: dict[str, Any] = {"folder": folder, "mapped_weights": mapped}
        for key in ("import_s", "load_s", "first_token_s"):
            values = [s[key] for s in samples]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        totals = [python + sum(s.values()) for s in samples]
        row["total_s"] = {"median": statistics.median(totals), "min": min(totals), "max": max(totals)}
        rows.append(row)
    result = {"runs": args.runs, "threads": args.threads, "drop_caches": args.drop_caches, "interpreter_s": python, "folders": rows}
    command = " ".join(["python benchmarks/cold_start.py", *sys.argv[1:]])
    lines = ["# Cold start: a new process's import, load and first token", "",
             f"`{command}`: medians (min-max) of {args.runs} fresh processes, folders in turns, "
             f"{'the page cache emptied before each' if args.drop_caches else 'the files in the page cache'}; the interpreter's "
             f"own start ({python * 1000:.0f} ms, `python -c pass`) is in the total.", "",
             "| folder | weights | import ms | load ms | first token ms | total ms |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        cells = [f"{row[k]['median'] * 1000:.0f} ({row[k]['min'] * 1000:.0f}-{row[k]['max'] * 1000:.0f})"
                 for k in ("import_s", "load_s", "first_token_s", "total_s")]
        lines.append(f"| {row['folder']} | {'mapped' if row['mapped_weights'] else 'packed'} | {' | '.join(cells)} |")
    (HERE / "results" / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "results" / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
