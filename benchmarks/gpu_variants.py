"""Candidate changes to an fp16 folder's decode step on CUDA, timed side by side with CUDA graphs (issue 14: 600
tok/s for gpt2-large fp16 at batch 1 needs the whole step under 1.67 ms, after a 32-token prompt and after 512).

    python benchmarks/gpu_variants.py /tmp/onnxgen-gpu/onnx/fp16 --out benchmarks/results/gpu

Variants (each made once, next to the folder, then timed in a process of its own, one after another):
- `base`: the folder as quantize makes it.
- `transb`: every weight stored transposed, (out, in) as PyTorch's Linear keeps it, and multiplied through
  FusedMatMul(transB=1): at batch 1 cuBLAS then reads each output's weights as one contiguous row. The tied
  head multiplies the embedding itself (no transposed copy folded at load: 129 MB less GPU memory for
  gpt2-large).
- GroupQueryAttention's kernels, chosen by onnxruntime's environment variables (read when a session is made):
  onnxruntime 1.31 runs a decode step's attention as XQA (`kernel_mha`) by default; `flash-decode` turns XQA off
  (ORT_ENABLE_XQA=0: flash attention's split-KV decoding), `cudnn` turns XQA off and cuDNN's attention on
  (ORT_ENABLE_CUDNN_FLASH_ATTENTION=1), `no-flash` turns flash attention off (ORT_DISABLE_FLASH_ATTENTION=1; on
  onnxruntime 1.31 XQA runs the decode step still), `transb-no-flash` that and `transb`.
- The weights' products, fp16 MatMuls that cuBLAS runs at ~1.7 TB/s for one row (a third of an H200's bandwidth).
  onnxruntime 1.31's CUDA MatMul has two kernels of its own for few rows besides cuBLAS, off by default:
  `small-n-gemv` forces its GEMV wherever the shape allows (ORT_ENABLE_SMALL_N_GEMV=1); `gemm-tune` times cuBLAS,
  that GEMV and `tinygemm2` (a Hopper kernel) once per shape and keeps the fastest, if 5% ahead of cuBLAS
  (ORT_CUDA_GEMM_AUTO_TUNE=1, the session config `ep.cuda.enable_gemm_auto_tune`'s fallback); `gemm-tune-replay`
  times them inside a replayed CUDA graph, as a captured step runs them (ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING=1).
Each is timed as benchmarks/overhead.py times a greedy step at batch 1, after each of --prompt-tokens.
Results: <out>/variants.{json,md}. A win on one machine is one machine's: cuDNN's attention beat XQA by 9% on one
H200 and by nothing on another (results/gpu/h200-s25.md); confirm on a second before changing a default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NO_FLASH = {"ORT_DISABLE_FLASH_ATTENTION": "1"}
VARIANTS = {"base": (False, {}), "transb": (True, {}), "no-flash": (False, NO_FLASH), "transb-no-flash": (True, NO_FLASH),
            "flash-decode": (False, {"ORT_ENABLE_XQA": "0", "ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"}),
            "cudnn": (False, {"ORT_ENABLE_XQA": "0", "ORT_ENABLE_CUDNN_FLASH_ATTENTION": "1"}),
            "small-n-gemv": (False, {"ORT_ENABLE_SMALL_N_GEMV": "1"}),
            "gemm-tune": (False, {"ORT_CUDA_GEMM_AUTO_TUNE": "1"}),
            "gemm-tune-replay": (False, {"ORT_CUDA_GEMM_AUTO_TUNE": "1", "ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING": "1"})}  # name -> (transposed, environment)


def transposed(folder: Path, out: Path) -> None:
    """`folder` with its weights transposed and multiplied by FusedMatMul(transB=1), written to `out`."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from onnxgen import manifest

    model = onnx.load(str(folder / "model.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    done: dict[str, str] = {}  # weight -> its transposed initializer (weights shared between MatMuls stay shared)
    for i, node in enumerate(list(g.node)):
        if node.op_type != "MatMul":
            continue
        weight = node.input[1]
        tied = producers.get(weight)
        if tied is not None and tied.op_type == "Transpose" and tied.input[0] in inits:
            source = tied.input[0]  # the head: Transpose(embedding) is already the transposed weight
        elif weight in inits and len(inits[weight].dims) == 2:
            if weight not in done:
                t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), f"{weight}.T")
                g.initializer.append(t)
                done[weight] = t.name
            source = done[weight]
        else:
            continue
        g.node.remove(node)
        g.node.insert(i, helper.make_node("FusedMatMul", [node.input[0], source], list(node.output), name=node.name,
                                          domain="com.microsoft", transB=1))
    used = {name for n in g.node for name in n.input}
    for node in [n for n in g.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]:
        g.node.remove(node)
    used = {name for n in g.node for name in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    record = manifest.read(folder)
    manifest.write(out, {k: v for k, v in record.items() if k not in ("format_version", "files")})


def time_step(folder: Path, runs: int, device: str, prompt_tokens: list[int]) -> dict[str, Any]:
    """Each prompt length's greedy step (keyed by the length as text: JSON's keys are), timed in this process."""
    sys.path.insert(0, str(HERE))
    from overhead import STRATEGIES, measure

    timed = {}
    for n in prompt_tokens:
        row = measure(folder, 1, 64, runs, device, cuda_graph=device == "cuda", strategies={"greedy": STRATEGIES["greedy"]}, prompt_tokens=n)[0]
        timed[str(n)] = {k: row[k] for k in ("step_ms", "run_ms", "outside_ms", "tokens_per_s")}
    return timed


def best(results: dict[str, Any]) -> str:
    """The environment of the fastest variant that changes nothing but the environment, as `KEY=VALUE ...`, where it
    beats base (see --best); "" otherwise."""
    if "error" in results.get("base", {"error": ""}):
        return ""
    base = results["base"]
    longest = max(base, key=int)
    winners = [name for name, timed in results.items() if name in VARIANTS and not VARIANTS[name][0] and VARIANTS[name][1] and "error" not in timed
               and timed[longest]["step_ms"] <= 0.99 * base[longest]["step_ms"]
               and all(timed[n]["step_ms"] <= 1.01 * base[n]["step_ms"] for n in base)]
    if not winners:
        return ""
    fastest = min(winners, key=lambda name: results[name][longest]["step_ms"])
    return " ".join(f"{k}={v}" for k, v in VARIANTS[fastest][1].items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="an fp16 onnxgen folder")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    ap.add_argument("--make", action="store_true", help="only make the variants' folders (on the CPU)")
    ap.add_argument("--best", type=Path, metavar="VARIANTS_JSON",
                    help="only print the environment (KEY=VALUE ...) of the fastest environment-only variant in a saved result, "
                         "where it beats base by 1%% or more at the longest prompt and is not 1%% slower at any other; nothing otherwise")
    ap.add_argument("--time", action="store_true", help=argparse.SUPPRESS)  # one folder, in this process: JSON on stdout
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    args = ap.parse_args()
    if args.best:
        print(best(json.loads(args.best.read_text())))
        return
    if args.time:
        print(json.dumps(time_step(args.folder, args.runs, args.device, args.prompt_tokens)))
        return
    transb = args.folder.with_name(f"{args.folder.name}-transb")
    folders = {name: transb if VARIANTS[name][0] else args.folder for name in args.variants}
    if transb in folders.values() and not (transb / "onnxgen.json").is_file():
        transposed(args.folder, transb)
    if args.make:
        return
    results = {}
    for name, folder in folders.items():
        done = subprocess.run([sys.executable, __file__, str(folder), "--time", "--runs", str(args.runs), "--device", args.device,
                               "--prompt-tokens", *map(str, args.prompt_tokens)], check=False, capture_output=True, text=True,
                              env={**os.environ, **VARIANTS[name][1]})
        results[name] = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr.strip()[-500:]}
        print(name, results[name], flush=True)
    lines = ["# fp16 decode-step variants with CUDA graphs (batch 1, greedy)", "",
             f"`python benchmarks/gpu_variants.py {args.folder}`; medians of {args.runs} runs of 64 tokens.", "",
             "| variant | prompt tokens | step ms | session.run ms | outside ms | tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, timed in results.items():
        if "error" in timed:
            lines.append(f"| {name} | failed: {' '.join(timed['error'][-200:].split())} | | | | |")
            continue
        for n, r in timed.items():
            lines.append(f"| {name} | {n} | " + " | ".join(f"{r[k]:.3f}" for k in ("step_ms", "run_ms", "outside_ms")) + f" | {r['tokens_per_s']:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
