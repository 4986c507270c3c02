"""onnxgen on CUDA against transformers' PyTorch on the same GPU, in one command.

    python benchmarks/gpu.py --tokenizer ../shared/data/gpt2-tokenizer --out benchmarks/results/gpu

Makes a random-weight checkpoint of the gpt2-large shape (speed does not depend on weight values), exports
it, quantizes it (accuracy checked on the GPU), and times each competitor one at a time: PyTorch eager (no
compile; transformers' default attention) in fp16 and fp32; onnxgen fp16 with the cache in place, with and
without CUDA graphs (`onnxgen-fp16+graph`); onnxgen int4 weights in an fp16 graph with the cache in place
(`onnxgen-int4-fp16+graph`, quantize --float16); onnxgen fp32 and int4 with the growing cache
(GroupQueryAttention runs on CUDA in fp16 only); at batch 1 and 8, 32- and 512-token prompts, greedy and 4 beams. Decode tok/s is
batch x (N - 1) / (T(N) - T(1)), where T(n) is the fastest of --runs wall times of a whole generate call
making n tokens per prompt (no eos): the prompt pass cancels out. The first-token time is T(1). The fastest
run, not the median: on the H200 one run in two of a PyTorch case now and then took 3-4x the other.

Export and quantize run as `onnxgen` commands in their own processes: timed in the process that had just
quantized, fp16 decoded at 145 tok/s instead of 243. Results are written after every competitor (JSON
with every raw time, and Markdown, in --out), so a run cut short still leaves what it measured;
`--report FILE.json` renders the Markdown again from the raw times.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_models import SHAPES, TOKENIZER, make  # noqa: E402

import onnxgen  # noqa: E402
from onnxgen.options import STRATEGIES  # noqa: E402

Generate = Callable[[np.ndarray, int, str], None]  # (prompts, new tokens per prompt, strategy): runs to completion


@dataclass(frozen=True)
class Case:
    batch: int
    prompt_tokens: int
    strategy: str  # a key of onnxgen.options.STRATEGIES


CASES = [Case(b, p, s) for s in ("greedy", "beam") for b in (1, 8) for p in (32, 512)]


def pytorch(checkpoint: Path, dtype: str, device: str) -> Generate:
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()
    eos = model.config.eos_token_id

    def generate(prompts: np.ndarray, new: int, strategy: str) -> None:
        ids = torch.from_numpy(prompts).to(device)
        with torch.no_grad():  # min_new_tokens: no row stops early, as onnxgen's runs have no eos
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=eos, **STRATEGIES[strategy])
        if device == "cuda":
            torch.cuda.synchronize()

    return generate


def onnxgen_runner(folder: Path, device: str, cuda_graph: bool) -> Generate:
    model = onnxgen.load(folder, provider=device, cuda_graph=cuda_graph)  # type: ignore[arg-type]

    def generate(prompts: np.ndarray, new: int, strategy: str) -> None:
        model.generate(prompts.tolist(), max_new_tokens=new, min_new_tokens=0, eos_token_id=None, **STRATEGIES[strategy])

    return generate


def measure(generate: Generate, case: Case, new_tokens: int, runs: int, vocab: int) -> dict[str, Any]:
    prompts = np.random.default_rng(0).integers(0, vocab, size=(case.batch, case.prompt_tokens))

    def timed(n: int) -> float:
        start = time.perf_counter()
        generate(prompts, n, case.strategy)
        return time.perf_counter() - start

    timed(1), timed(4)  # warm-up: the prompt pass's and a decode step's shapes
    one, many = [], []
    for _ in range(runs):
        one.append(timed(1))
        many.append(timed(new_tokens))
    return {**asdict(case), "new_tokens": new_tokens, "t1_s": one, "tn_s": many}


def figures(raw: dict[str, Any]) -> tuple[float, float]:
    """(decode tok/s, first-token ms) from a case's raw times."""
    t1, tn = min(raw["t1_s"]), min(raw["tn_s"])
    return raw["batch"] * (raw["new_tokens"] - 1) / (tn - t1), t1 * 1000


# Each variant's folder and how it is made: (onnxgen command, the folder it starts from).
BUILDS = {
    "in-place-fp32": (["export", "{checkpoint}", "-o", "{out}"], None),
    "growing-fp32": (["export", "{checkpoint}", "-o", "{out}", "--growing-cache"], None),
    "fp16": (["quantize", "-m", "{parent}", "-o", "{out}", "--mode", "fp16", "--provider", "{device}"], "in-place-fp32"),
    "int4": (["quantize", "-m", "{parent}", "-o", "{out}", "--mode", "int4", "--provider", "{device}"], "growing-fp32"),
    "int4-fp16": (["quantize", "-m", "{parent}", "-o", "{out}", "--mode", "int4", "--float16", "--provider", "{device}"], "in-place-fp32"),
}
FOLDERS = {"fp32": "growing-fp32", "fp16": "fp16", "int4": "int4", "int4-fp16": "int4-fp16"}  # a competitor's variant -> its folder


def build(checkpoint: Path, folders: Path, name: str, device: str) -> None:
    """A folder of BUILDS unless it is made (its parent first), by the `onnxgen` command in a process of its own."""
    command, parent = BUILDS[name]
    if (folders / name / "onnxgen.json").is_file():
        return
    if parent:
        build(checkpoint, folders, parent, device)
    values = {"checkpoint": checkpoint, "out": folders / name, "parent": folders / (parent or name), "device": device}
    with making(name):
        subprocess.run([sys.executable, "-m", "onnxgen", *(part.format(**values) for part in command)], check=True)


@contextmanager
def making(what: str) -> Iterator[None]:
    """Say how long making `what` took: a device call's time goes mostly to making the folders."""
    start = time.perf_counter()
    yield
    print(f"{what}: made in {time.perf_counter() - start:.0f} s", flush=True)


def device_name() -> str:
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown GPU"


def markdown(report: dict[str, Any]) -> str:
    names = list(report["competitors"])
    lines = [f"# onnxgen on CUDA vs PyTorch: {report['shape']} shape, {report['device']}", "",
             f"{report['new_tokens']} new tokens, fastest of {report['runs']} runs; decode tok/s = batch x (N-1) / (T(N) - T(1)); "
             "first token = T(1). Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "| case | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for case in CASES:
        cells = []
        for name in names:
            found = [r for r in report["competitors"][name] if Case(r["batch"], r["prompt_tokens"], r["strategy"]) == case]
            cells.append("{:,.1f} tok/s, {:.0f} ms".format(*figures(found[0])) if found else "-")
        label = f"b{case.batch} p{case.prompt_tokens} {case.strategy if case.strategy == 'greedy' else '4 beams'}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for mode, acc in report["accuracy"].items():
        lines.append("")
        lines.append(f"{mode}: perplexity {acc['perplexity_fp32']:.3f} -> {acc['perplexity_quantized']:.3f} "
                     f"({acc['perplexity_increase']:+.2%}), top-1 agreement {acc['top1_agreement']:.2%} (random weights)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-large", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="folder with GPT-2's vocab.json and merges.txt")
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnxgen-gpu"), help="checkpoint and model folders (GBs)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", nargs="+", help="only these cases, as b1-p32-greedy (default: all eight)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    ap.add_argument("--competitors", nargs="+",
                    default=["pytorch-fp16", "pytorch-fp32", "onnxgen-fp32", "onnxgen-fp16", "onnxgen-fp16+graph", "onnxgen-int4-fp16+graph",
                             "onnxgen-int4"])
    ap.add_argument("--report", type=Path, help="only render the Markdown of a saved JSON result")
    ap.add_argument("--prepare", action="store_true",
                    help="only make the competitors' folders, side by side (on the CPU, while the GPU does something else)")
    args = ap.parse_args()
    if args.report:
        print(markdown(json.loads(args.report.read_text())), end="")
        return

    from onnxgen.export import package_versions

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work / "models" / args.shape
    if not (checkpoint / "config.json").is_file():
        with making(f"{args.shape} checkpoint"):
            make(args.shape, args.work / "models", args.tokenizer)
    if args.prepare:
        names = {FOLDERS[n.partition("-")[2].partition("+")[0]] for n in args.competitors if n.startswith("onnxgen-")}
        parents = {BUILDS[name][1] or name for name in names}  # first, or two folders made from one would both make it
        for batch in (parents, names):
            with ThreadPoolExecutor() as pool:  # each build is a process of its own
                list(pool.map(lambda name: build(checkpoint, args.work / "onnx", name, args.device), batch))
        return
    vocab = 50257
    report: dict[str, Any] = {"shape": args.shape, "device": device_name() if args.device == "cuda" else "CPU", "new_tokens": args.new_tokens, "runs": args.runs,
                              "versions": package_versions(), "competitors": {}, "accuracy": {}}
    for name in args.competitors:
        runtime, _, variant = name.partition("-")
        if runtime == "pytorch":
            generate = pytorch(checkpoint, {"fp16": "float16", "fp32": "float32"}[variant], args.device)
        else:
            variant, _, graph = variant.partition("+")
            folder = args.work / "onnx" / FOLDERS[variant]
            build(checkpoint, args.work / "onnx", FOLDERS[variant], args.device)
            if variant != "fp32":
                report["accuracy"][variant] = json.loads((folder / "onnxgen.json").read_text())["quantization"]["accuracy"]
            generate = onnxgen_runner(folder, args.device, cuda_graph=graph == "graph")
        report["competitors"][name] = []
        for case in [c for c in CASES if not args.cases or f"b{c.batch}-p{c.prompt_tokens}-{c.strategy}" in args.cases]:
            report["competitors"][name].append(measure(generate, case, args.new_tokens, args.runs, vocab))
            print(name, case, "{:.1f} tok/s".format(figures(report["competitors"][name][-1])[0]), flush=True)
            (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
            (args.out / "gpu.md").write_text(markdown(report))
        del generate
        gc.collect()
        if runtime == "pytorch" and args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
    print(markdown(report))


if __name__ == "__main__":
    main()
