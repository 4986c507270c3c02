"""Measure export and every quantize mode for one checkpoint: wall time, peak RSS, size, accuracy, speed.

    python export/measure.py benchmarks/models/gpt2-large --out /tmp/gpt2-large --threads 2

Each step runs as the CLI under /usr/bin/time (peak RSS of the whole step); decode tok/s is
`onnxgen bench` (batch 1, 32-token prompt, 128 new tokens, greedy). Prints a Markdown table and writes
it, with the raw figures, beside the folders.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run under /usr/bin/time -v; returns (wall seconds, peak RSS GB, stdout)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    return time.perf_counter() - start, rss_kb / 1e6, done.stdout


def decode_tps(folder: Path, threads: int) -> float:
    out = subprocess.run([sys.executable, "-m", "onnxgen", "bench", "--model", str(folder), "--threads", str(threads), "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["cases"][0]["decode_tokens_per_s"]["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="hub id or transformers folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for fp32/, int8/, int4/, fp16/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-ppl-increase", default="0.10", help="passed to quantize (random weights: use a large value)")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "onnxgen"]
    rows: list[dict[str, Any]] = []
    fp32 = args.out / "fp32"
    wall, rss, _ = timed(cli + ["export", args.checkpoint, "-o", str(fp32), "--force"])
    m = json.loads((fp32 / "onnxgen.json").read_text())
    v = m["validation"]
    rows.append({"variant": "fp32 (export)", "seconds": wall, "peak_rss_gb": rss, "size_mb": sum(f["bytes"] for f in m["files"].values()) / 1e6,
                 "decode_tps": decode_tps(fp32, args.threads),
                 "accuracy": f"max abs logit diff vs PyTorch {max(v['max_abs_diff_prompt'], v['max_abs_diff_cached_step']):.1e}"})
    for mode in ("int8", "int4", "fp16"):
        folder = args.out / mode
        wall, rss, _ = timed(cli + ["quantize", "--model", str(fp32), "-o", str(folder), "--mode", mode, "--force", "--max-ppl-increase", args.max_ppl_increase])
        q = json.loads((folder / "onnxgen.json").read_text())
        a = q["quantization"]["accuracy"]
        rows.append({"variant": mode, "seconds": wall, "peak_rss_gb": rss, "size_mb": sum(f["bytes"] for f in q["files"].values()) / 1e6,
                     "decode_tps": decode_tps(folder, args.threads),
                     "accuracy": f"ppl {a['perplexity_fp32']:.2f} -> {a['perplexity_quantized']:.2f} ({a['perplexity_increase']:+.1%}), "
                                 f"top-1 {a['top1_agreement']:.1%}, logit diff max {a['max_abs_logit_diff']:.3g} / mean {a['mean_abs_logit_diff']:.3g}, "
                                 f"greedy {a['greedy_tokens_agreeing']}/{a['greedy_tokens']}"})
    lines = [f"`{args.checkpoint}`, {args.threads} threads", "",
             "| variant | time s | peak RSS GB | size MB | decode tok/s | accuracy |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['variant']} | {r['seconds']:.0f} | {r['peak_rss_gb']:.1f} | {r['size_mb']:.1f} | {r['decode_tps']:.1f} | {r['accuracy']} |" for r in rows]
    table = "\n".join(lines) + "\n"
    (args.out / "measure.md").write_text(table)
    (args.out / "measure.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
