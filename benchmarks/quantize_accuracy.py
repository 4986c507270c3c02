"""What quantize's choices cost in accuracy on trained weights (random weights say nothing: their scores are
near uniform): int8, int4 at block sizes 32 / 64 / 128, and the int8 key/value cache with its calibration
margin at 1.0 / 1.25 (the default) / 1.5 / 2.0, each measured by quantize's own report against the fp32
parent on onnxgen/data/eval.txt (held out from training).

    python models/train.py --corpus ../shared/data/corpus --out models/runs/prose-mini --max-steps 1000 --threads 2
    onnxgen export models/runs/prose-mini/hf -o /tmp/prose-mini-fp32
    python benchmarks/quantize_accuracy.py /tmp/prose-mini-fp32

Results: benchmarks/results/quantize_accuracy.{json,md}. The folders go to a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from onnxgen import quantize as quantize_module
from onnxgen.quantize import QuantizeOptions, quantize

HERE = Path(__file__).resolve().parent
CASES: list[tuple[str, dict[str, Any], float]] = [  # name, quantize options, calibration margin
    ("int8", {"mode": "int8"}, 1.25),
    ("int8, int8 cache", {"mode": "int8", "kv_cache": "int8"}, 1.25),
    ("int4 block 32", {"mode": "int4", "block_size": 32}, 1.25),
    ("int4 block 64", {"mode": "int4", "block_size": 64}, 1.25),
    ("int4 block 128", {"mode": "int4", "block_size": 128}, 1.25),
    *[(f"int4 block 32, int8 cache, margin {m}", {"mode": "int4", "kv_cache": "int8"}, m) for m in (1.0, 1.25, 1.5, 2.0)],
]


def measure(parent: Path, work: Path) -> list[dict[str, Any]]:
    rows = []
    default = quantize_module.CALIBRATION
    try:
        for i, (name, options, margin) in enumerate(CASES):
            quantize_module.CALIBRATION = dataclasses.replace(default, margin=margin)
            result = quantize(parent, work / str(i), QuantizeOptions(max_ppl_increase=100.0, **options), quiet=True)
            a = result["quantization"]["accuracy"]
            rows.append({"case": name, "mb": sum(f["bytes"] for f in result["files"].values()) / 1e6,
                         "perplexity_fp32": a["perplexity_fp32"], "perplexity": a["perplexity_quantized"],
                         "increase": a["perplexity_increase"], "top1": a["top1_agreement"], "mean_diff": a["mean_abs_logit_diff"],
                         "greedy": f"{a['greedy_tokens_agreeing']}/{a['greedy_tokens']}"})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        quantize_module.CALIBRATION = default
    return rows


def markdown(parent: Path, rows: list[dict[str, Any]]) -> str:
    lines = ["# What quantize's choices cost on trained weights", "",
             f"`python benchmarks/quantize_accuracy.py {parent.name}`: quantize's accuracy report against the fp32 parent "
             f"(perplexity {rows[0]['perplexity_fp32']:.2f}) on onnxgen/data/eval.txt, {len(rows)} folders.", "",
             "| case | MB | perplexity | increase | top-1 agreement | mean logit diff | greedy tokens agreeing |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['mb']:.2f} | {r['perplexity']:.2f} | {r['increase']:+.2%} | {r['top1']:.1%} | "
                     f"{r['mean_diff']:.4f} | {r['greedy']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent", type=Path, help="an fp32 folder of a trained model (onnxgen export)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = measure(args.parent, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_accuracy.json").write_text(json.dumps({"parent": args.parent.name, "rows": rows}, indent=1) + "\n")
    (args.out / "quantize_accuracy.md").write_text(markdown(args.parent, rows))
    print(markdown(args.parent, rows))


if __name__ == "__main__":
    main()
