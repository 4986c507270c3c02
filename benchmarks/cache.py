"""The key/value cache in place (GroupQueryAttention, the export default) against the growing cache
(MultiHeadAttention, `--growing-cache`), on the CPU, in one run.

    python benchmarks/cache.py --models gpt2 gpt2-large --threads 2

For each model shape (random weights, make_models.py) and variant (fp32, int8, int4) it makes both folders
once (kept in benchmarks/exports/<model>/<layout>-<variant>), then, each in a process of its own:
- decode tok/s at batch 1 after a 32- and a 512-token prompt (64 new tokens; decode = (N-1) / (T(N) - T(1)),
  best of --runs), and the ratio of the two;
- the ceiling those figures are held to: a decode step reads the weights and, once, the cache, so at the
  read bandwidth measured in the same run it can make at most bandwidth / (weight bytes + cache bytes)
  steps a second (the cache's size at the middle of the 64 new tokens);
- peak RSS of a batch 8 x 512-token call (64 new tokens), the process's own high-water mark.
Results: benchmarks/results/cache.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import bandwidth_gbs, weight_bytes  # noqa: E402  (the suite's own measures)

LAYOUTS = {"growing": ["--growing-cache"], "in-place": []}
VARIANTS = ["fp32", "int8", "int4"]
NEW = 64


def prepare(name: str, checkpoint: Path, work: Path) -> dict[tuple[str, str], Path]:
    if not (checkpoint / "config.json").exists():
        from make_models import make

        make(name, checkpoint.parent)
    cli = [sys.executable, "-m", "onnxgen"]
    folders = {}
    for layout, flags in LAYOUTS.items():
        for variant in VARIANTS:
            folder = folders[layout, variant] = work / f"{layout}-{variant}"
            if (folder / "onnxgen.json").exists():
                continue
            if variant == "fp32":
                subprocess.run([*cli, "export", str(checkpoint), "-o", str(folder), "--force", *flags], check=True)
            else:  # random weights make perplexity meaningless: the accuracy budget is opened
                subprocess.run([*cli, "quantize", "--model", str(work / f"{layout}-fp32"), "-o", str(folder), "--mode", variant,
                                "--force", "--max-ppl-increase", "100"], check=True)
    return folders


def measure(folder: str, threads: int, runs: int, batch: int, prompts: list[int]) -> dict[str, Any]:
    """In this process: decode tok/s per prompt length (batch rows), and the peak RSS."""
    import resource

    import onnxgen

    model = onnxgen.load(folder, threads=threads)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {}
    for prompt in prompts:
        ids = rng.integers(0, model.dims.vocab_size, size=(batch, prompt)).tolist()

        def seconds(new: int) -> float:
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, min_new_tokens=0, repetition_penalty=1.0)
            return time.perf_counter() - start

        seconds(2)  # warm-up
        best = 0.0
        for _ in range(runs):
            first, full = seconds(1), seconds(NEW)
            best = max(best, batch * (NEW - 1) / (full - first))
        result[str(prompt)] = best
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def in_subprocess(folder: Path, threads: int, runs: int, batch: int, prompts: list[int]) -> dict[str, Any]:
    job = json.dumps([str(folder), threads, runs, batch, prompts])
    out = subprocess.run([sys.executable, __file__, "--job", job], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def cache_bytes(folder: Path, positions: int) -> int:
    dims = json.loads((folder / "onnxgen.json").read_text())["dims"]
    dtype = 2 if json.loads((folder / "onnxgen.json").read_text())["dtype"] == "float16" else 4
    return 2 * dims["n_layer"] * dims["n_embd"] * positions * dtype


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The key/value cache in place against the growing cache (CPU)", "",
             f"{result['environment']}; {result['threads']} threads, batch 1, {NEW} new tokens, best of {result['runs']} runs; "
             "the ceiling is the read bandwidth over weights + one read of the cache at the middle of the new tokens.", ""]
    for model in result["models"]:
        lines += [f"## {model['name']} (read bandwidth {model['bandwidth_gbs']:.1f} GB/s)", "",
                  "| variant | layout | tok/s @32 | tok/s @512 | @512 / @32 | ceiling @512 | of ceiling | peak RSS b8x512 (MiB) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in model["rows"]:
            lines.append(f"| {row['variant']} | {row['layout']} | {row['32']:.1f} | {row['512']:.1f} | {row['512'] / row['32']:.2f} | "
                         f"{row['ceiling_512']:.1f} | {row['512'] / row['ceiling_512']:.2f} | {row['peak_rss_b8_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gpt2"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "exports")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: one measurement, in a process of its own
    args = ap.parse_args()
    if args.job:
        print(json.dumps(measure(*json.loads(args.job))))
        return
    import platform

    result: dict[str, Any] = {"environment": f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
                              "threads": args.threads, "runs": args.runs, "models": []}
    for name in args.models:
        folders = prepare(name, HERE / "models" / name, args.work / name)
        bandwidth = bandwidth_gbs(args.threads)["read"]
        rows = []
        for variant in args.variants:
            for layout in LAYOUTS:
                folder = folders[layout, variant]
                print(f"[{name}] {layout} {variant} ...", file=sys.stderr, flush=True)
                speed = in_subprocess(folder, args.threads, args.runs, 1, [32, 512])
                memory = in_subprocess(folder, args.threads, 1, 8, [512])
                step_bytes = weight_bytes("onnxgen", folder) + cache_bytes(folder, 512 + NEW // 2)
                rows.append({"variant": variant, "layout": layout, "32": speed["32"], "512": speed["512"],
                             "ceiling_512": bandwidth * 1e9 / step_bytes, "peak_rss_b8_mb": memory["peak_rss_mb"]})
        result["models"].append({"name": name, "bandwidth_gbs": bandwidth, "rows": rows})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cache.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
