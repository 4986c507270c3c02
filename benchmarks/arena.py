"""What onnxruntime's CPU memory arena keeps after a long prompt's pass, and what giving it back costs, in one run.

    python benchmarks/arena.py --threads 2 --runs 2

onnxruntime's CPU arena never returns what a run grew it by, so a long prompt's activations stayed the process's
after the call. onnxgen runs passes over prompts (and guesses, and scored text) with the run option
`memory.enable_memory_arena_shrinkage` (Runtime.pass_options), decode steps without it. Three options, each case
in a process of its own, the cases in turns for --runs rounds so that they see the same machine:
- shrink: as onnxgen runs now;
- keep: the prompt passes without the option (what onnxgen did before 2026-11-28);
- no-arena: `enable_cpu_mem_arena=False` for the whole session (every run allocates from the system).
Each process loads the folder, makes three greedy calls of batch 8 x 512 random tokens and one new token (the
prompt pass alone: its seconds, the median), then one of 128 new tokens (decode tok/s), and reports the RSS after
the load, after the calls and the peak (VmHWM). Folders: benchmarks/exports/<model>/<variant> (run.py's; make
them with run.py or make_models.py + onnxgen export/quantize). Results: benchmarks/results/arena.{json,md}.
Run it on a quiet machine.
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
sys.path.insert(0, str(HERE))
from footprint import arena_off  # the suite's own, found through the path above
from run import host, write_results

OPTIONS = ["shrink", "keep", "no-arena"]
BATCH, PROMPT, NEW, PASSES = 8, 512, 128, 3


def _status(*keys: str) -> dict[str, float]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            values[key] = int(value.split()[0]) / 1024
    return values


def child(folder: Path, option: str, threads: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    import onnxgen

    if option == "no-arena":
        arena_off()
    model = onnxgen.load(folder, threads=threads)
    if option == "keep":
        model.runtime.pass_options = ort.RunOptions()
    loaded = _status("VmRSS")["VmRSS"]
    prompts = np.random.default_rng(0).integers(0, model.dims.vocab_size, size=(BATCH, PROMPT)).tolist()
    passes = []
    for _ in range(PASSES):
        model.generate(prompts, max_new_tokens=1, do_sample=False)
        passes.append(model.last_stats.time_to_first_token_s)
    model.generate(prompts, max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    after = _status("VmRSS", "VmHWM")
    return {"rss_loaded_mb": loaded, "rss_after_mb": after["VmRSS"], "peak_mb": after["VmHWM"],
            "prompt_pass_s": statistics.median(passes), "decode_tokens_per_s": model.last_stats.decode_tokens_per_s}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The CPU arena after a long prompt's pass", "",
             (f"{result['host']}; onnxruntime {result['onnxruntime']}; {result['threads']} threads; batch {BATCH} x {PROMPT} random "
              f"tokens: {PASSES} calls of one new token (the prompt pass, median), then one of {NEW} (decode); each case in a process "
              f"of its own, in turns for {result['runs']} rounds (memory: the largest; times: the median). `{result['command']}`"), "",
             "| folder | option | RSS loaded MiB | RSS after MiB | peak MiB | prompt pass s | x keep | decode tok/s | x keep |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for folder, cases in result["folders"].items():
        keep = cases["keep"]
        for option, r in cases.items():
            lines.append(f"| {folder} | {option} | {r['rss_loaded_mb']:.0f} | {r['rss_after_mb']:.0f} | {r['peak_mb']:.0f} | "
                         f"{r['prompt_pass_s']:.2f} | {r['prompt_pass_s'] / keep['prompt_pass_s']:.3f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / keep['decode_tokens_per_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folders", nargs="+", type=Path,
                    default=[HERE / "exports" / m / v for m in ("gpt2", "gpt2-large") for v in ("fp32", "int8", "int4")])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", default="arena", help="results/OUT.json and .md")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--option", default="shrink", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.option, args.threads)))
        return
    import onnxruntime

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for folder in args.folders:
        name = f"{folder.parent.name}/{folder.name}"
        for round_ in range(args.runs):
            for option in OPTIONS:
                cmd = [sys.executable, __file__, "--child", str(folder), "--option", option, "--threads", str(args.threads)]
                start = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                samples.setdefault(name, {}).setdefault(option, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{name} {option} round {round_ + 1}: {time.perf_counter() - start:.0f} s {samples[name][option][-1]}",
                      file=sys.stderr, flush=True)
    summary = {name: {option: {k: (max if k.endswith("_mb") else statistics.median)(s[k] for s in runs) for k in runs[0]}
                      for option, runs in cases.items()} for name, cases in samples.items()}
    result = {"host": host(), "onnxruntime": onnxruntime.__version__, "threads": args.threads, "runs": args.runs,
              "command": "python benchmarks/arena.py " + " ".join(sys.argv[1:]), "folders": summary, "samples": samples}
    table = markdown(result)
    write_results(HERE / "results", args.out, result, table)  # prints the table too


if __name__ == "__main__":
    main()
