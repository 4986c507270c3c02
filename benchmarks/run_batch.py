"""`onnxgen run-batch` (a file of requests through the server's batcher, in-process) against answering the same
requests one after another with model.generate, on the CPU, in one run.

    python benchmarks/run_batch.py --threads 2 [--model DIR ...]

Each model (default: the bundled one) answers --requests completions (greedy, --new-tokens each, no end token, so
every one makes as many; prompts of 16 to 64 tokens of onnxgen/data/eval.txt) both ways, in --rounds alternating
rounds, each way's first call a warm-up. Reported: new tokens a second each way (the median round), run-batch's
speed-up, and whether each request's text was the same both ways. Results: benchmarks/results/run_batch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import environment, host, write_results  # noqa: E402

EVAL = HERE.parent / "onnxgen" / "data" / "eval.txt"


def measure(folder: Path, threads: int, requests: int, new_tokens: int, max_batch: int, rounds: int) -> dict[str, Any]:
    import onnxgen
    from onnxgen import batch
    from onnxgen.serve import Limits

    model = onnxgen.load(folder, threads=threads)
    text = model.tokenizer.encode(EVAL.read_text())
    prompts = [text[i * 50 : i * 50 + 16 + (i * 7) % 49] for i in range(requests)]
    lines = [json.dumps({"custom_id": str(i), "url": "/v1/completions", "body": {
        "prompt": p, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}}) for i, p in enumerate(prompts)]
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "requests.jsonl"
        source.write_text("\n".join(lines) + "\n")
        parsed = batch.read(source)

        def sequential() -> list[str]:
            return [model.generate([p], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)[0].text for p in prompts]

        def batched() -> list[str]:
            out = Path(work) / "out.jsonl"
            batch.run(model, parsed, out, "m", Limits(max_batch=max_batch), force=True, quiet=True)
            return [json.loads(line)["response"]["body"]["choices"][0]["text"] for line in out.read_text().splitlines()]

        ways = {"sequential": sequential, "run-batch": batched}
        for way in ways.values():  # warm-up
            way()
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        texts: dict[str, list[str]] = {}
        for r in range(rounds):
            for name in ways if r % 2 == 0 else reversed(list(ways)):
                start = time.perf_counter()
                texts[name] = ways[name]()
                seconds[name].append(time.perf_counter() - start)
    tokens = requests * new_tokens
    speed = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    same = sum(a == b for a, b in zip(texts["sequential"], texts["run-batch"]))
    return {"model": folder.name, "requests": requests, "new_tokens": new_tokens, "max_batch": max_batch,
            "tok_s": speed, "seconds": seconds, "speedup": speed["run-batch"] / speed["sequential"], "same_text": same}


def main() -> None:
    from onnxgen.model import BUNDLED

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="model folder (repeatable; default: the bundled model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    cases = [measure(folder, args.threads, args.requests, args.new_tokens, args.max_batch, args.rounds) for folder in args.model or [BUNDLED]]
    table = (f"# run-batch against one request after another (CPU)\n\n{host()}; {args.threads} threads; {args.requests} greedy "
             f"completions of {args.new_tokens} tokens each (prompts of 16-64 tokens), run-batch with --max-batch {args.max_batch}; "
             f"median of {args.rounds} alternating rounds. `python benchmarks/run_batch.py`.\n\n"
             "| model | one after another (tok/s) | run-batch (tok/s) | speed-up | same text |\n| --- | ---: | ---: | ---: | ---: |\n")
    for c in cases:
        table += (f"| {c['model']} | {c['tok_s']['sequential']:.0f} | {c['tok_s']['run-batch']:.0f} | {c['speedup']:.2f}x | "
                  f"{c['same_text']} of {c['requests']} |\n")
    write_results(args.out, "run_batch", {"environment": environment(args.threads), "cases": cases}, table)


if __name__ == "__main__":
    main()
