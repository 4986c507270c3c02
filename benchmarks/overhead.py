"""The per-token cost outside onnxruntime: what onnxgen's own loop adds to each decode step, by strategy.

    python benchmarks/overhead.py onnxgen/bundled/prose-mini benchmarks/exports/gpt2/int8 --threads 2

A decode step is onnxruntime's forward plus onnxgen's Python around it: the IO binding, the score filters,
the draw, the stop checks and the streaming detokenizer. For each folder and strategy (batch 1, a 32-token
prompt or --prompt-tokens, transformers' default options otherwise) this times whole steps (the generator's clock after each
forward) and the `run_with_iobinding` call inside each, and reports the medians and their difference. On a
small or quantized model that difference decides the speed: the model's forward is short, and the filters
work on the whole vocabulary (50,257 scores for GPT-2). Results: benchmarks/results/overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import onnxgen
from onnxgen.model import BUNDLED
from onnxgen.options import STRATEGIES as PRESETS

HERE = Path(__file__).resolve().parent
STRATEGIES: dict[str, dict[str, Any]] = {  # `onnxgen bench`'s, and the filters they leave out
    "greedy": PRESETS["greedy"],
    "top-k 50 + top-p 0.9": PRESETS["top-k-top-p"],
    "top-p 0.9 alone": {**PRESETS["top-k-top-p"], "top_k": 0},  # the bundled model's choice
    "sampling, no filter": {**PRESETS["top-k-top-p"], "top_k": 0, "top_p": 1.0, "temperature": 1.0},
    # llama.cpp's samplers (logits.dry, logits.xtc), at their usual settings
    "greedy + DRY 0.8": {**PRESETS["greedy"], "dry_multiplier": 0.8},
    "top-k 50 + top-p 0.9 + XTC 0.5": {**PRESETS["top-k-top-p"], "xtc_probability": 0.5},
    # beam search and beam sampling (4 beams: 4 rows a step; beam sampling draws 8 continuations from 4 x vocabulary)
    "4 beams": {**PRESETS["greedy"], "num_beams": 4},
    "4 beams, sampling top-k 50": {**PRESETS["greedy"], "num_beams": 4, "do_sample": True, "top_k": 50},
    # classifier-free guidance: a second forward a step (its twin rows'), counted outside the step's first forward
    "greedy + guidance 1.5": {**PRESETS["greedy"], "guidance_scale": 1.5},
    # constrained decoding's mask (guidance.py), on a text that cannot end early: a string of 200 characters or more
    "greedy, held to a JSON schema": {**PRESETS["greedy"], "json_schema": {"type": "object", "required": ["text"],
                                                                          "properties": {"text": {"type": "string", "minLength": 200}}}},
    # the watermark (watermark.py): a green list a step (a shuffle of the vocabulary's first quarter, kept by seed);
    # selfhash judges the 40 best tokens each by a list of its own
    "greedy + watermark": {**PRESETS["greedy"], "watermarking_config": {"hashing_key": 1}},
    "top-p 0.9 alone + watermark": {**PRESETS["top-k-top-p"], "top_k": 0, "watermarking_config": {"hashing_key": 1}},
    "greedy + watermark, selfhash": {**PRESETS["greedy"], "watermarking_config": {"hashing_key": 1, "seeding_scheme": "selfhash"}},
}


def measure(folder: Path, threads: int, new_tokens: int, runs: int, provider: str = "cpu", cuda_graph: bool = False,
            strategies: dict[str, dict[str, Any]] = STRATEGIES, prompt_tokens: int = 32) -> list[dict[str, Any]]:
    model = onnxgen.load(folder, threads=threads, provider=provider, cuda_graph=cuda_graph)  # type: ignore[arg-type]
    session = model.runtime.session
    run = session.run_with_iobinding
    inside: list[float] = []

    def timed(*args: Any) -> None:  # (binding, run options with CUDA graphs)
        start = time.perf_counter()
        run(*args)
        inside.append(time.perf_counter() - start)

    session.run_with_iobinding = timed  # the runtime calls it once per forward
    prompt = list(range(100, 100 + prompt_tokens))
    rows = []
    for name, options in strategies.items():
        steps, forwards = [], []
        for i in range(runs + 1):
            inside.clear()
            ends_text = {"eos_token_id": model.defaults.eos_token_id} if "json_schema" in options else {}  # a constraint needs one
            generator = model.generator([prompt], onnxgen.GenerationOptions(), max_new_tokens=new_tokens, **ends_text, **options)
            while not generator.done:
                generator.step()
            if i:  # the first run warms up
                ends = generator.step_ends
                steps.append(statistics.median(b - a for a, b in zip(ends, ends[1:])))
                forwards.append(statistics.median(inside[1:]))  # inside[0] is the prompt pass
        step_ms, run_ms = statistics.median(steps) * 1e3, statistics.median(forwards) * 1e3
        rows.append({"strategy": name, "step_ms": step_ms, "run_ms": run_ms, "outside_ms": step_ms - run_ms,
                     "tokens_per_s": 1e3 / step_ms})
    return rows


def markdown(result: dict[str, Any]) -> str:
    where = "CUDA" + (" with CUDA graphs" if result.get("cuda_graph") else "") if result.get("provider") == "cuda" else f"{result['threads']} threads"
    lines = [f"{where}, batch 1, {result.get('prompt_tokens', 32)}-token prompt, {result['new_tokens']} new tokens; medians of "
             f"{result['runs']} runs.", "",
             "| model | strategy | step ms | session.run ms | outside ms | outside share | tok/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for model in result["models"]:
        for r in model["rows"]:
            lines.append(f"| {model['name']} | {r['strategy']} | {r['step_ms']:.3f} | {r['run_ms']:.3f} | "
                         f"{r['outside_ms']:.3f} | {r['outside_ms'] / r['step_ms']:.0%} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, default=[BUNDLED], help="onnxgen model folders (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cuda-graph", action="store_true", help="CUDA: replay the decode step as a captured CUDA graph")
    ap.add_argument("--strategy", action="append", choices=list(STRATEGIES), help="only these (repeatable; default: all)")
    ap.add_argument("--name", default="overhead", help="results file name, without its extension")
    args = ap.parse_args()
    strategies = {name: STRATEGIES[name] for name in args.strategy} if args.strategy else STRATEGIES
    result: dict[str, Any] = {"threads": args.threads, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "runs": args.runs,
                              "provider": args.provider,
                              "cuda_graph": args.cuda_graph, "models": []}
    for folder in args.folders:
        print(f"{folder} ...", file=sys.stderr, flush=True)
        result["models"].append({"name": str(folder), "rows": measure(folder, args.threads, args.new_tokens, args.runs, args.provider, args.cuda_graph,
                                                                          strategies, args.prompt_tokens)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
