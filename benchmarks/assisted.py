"""Assisted generation (`assistant_model`) against plain decoding, greedy, batch 1, on the CPU, in one run.

    python benchmarks/assisted.py --threads 2

Pairs of gpt2-shaped folders (random weights, make_models.py; the in-place folders benchmarks/cache.py makes):
a model and a draft made from the same weights by quantize (int8 drafting for fp32: the fp32 text at a speed
nearer int8's; random weights agree with their int8 copy on ~90% of tokens, as trained ones do), and gpt2
drafting for gpt2-large, whose random weights agree on nothing: what drafting costs where it never pays
(trained gpt2 and gpt2-large agree often; that pair is the usual one with real weights). Random weights give
near-uniform distributions, under the default confidence threshold (0.4) everywhere, so the draft runs with
threshold 0 and a fixed number of tokens a step (--tokens).

For each pair, in one process (both folders loaded with spinning=False, as the pair needs; load()): decode tok/s
of plain decoding and of assisted decoding, --runs calls in turns, the median; guesses taken of those drafted;
whether the text is plain decoding's. And the price of spinning=False alone: plain decoding of the model loaded
with and without it, in turns. Results: benchmarks/results/assisted.{json,md}. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cache import prepare  # noqa: E402  (the in-place folders)
from run import host, write_results  # noqa: E402

NEW = 64
PAIRS = {"gpt2 fp32 + gpt2 int8": (("gpt2", "fp32"), ("gpt2", "int8")),
         "gpt2-large fp32 + gpt2-large int8": (("gpt2-large", "fp32"), ("gpt2-large", "int8")),
         "gpt2-large int8 + gpt2 int8": (("gpt2-large", "int8"), ("gpt2", "int8"))}


def measure(target_folder: str, draft_folder: str, threads: int, runs: int, tokens: int) -> dict[str, Any]:
    import onnxgen

    target = onnxgen.load(target_folder, threads=threads, spinning=False)
    spinning = onnxgen.load(target_folder, threads=threads)  # the price of spinning=False, in the same turns
    draft = onnxgen.load(draft_folder, threads=threads, spinning=False)
    prompt = np.random.default_rng(0).integers(0, target.dims.vocab_size, size=32).tolist()
    options = dict(max_new_tokens=NEW, min_new_tokens=0, do_sample=False, eos_token_id=None, repetition_penalty=1.0)
    assisted = dict(assistant_model=draft, num_assistant_tokens=tokens, assistant_confidence_threshold=0.0)
    calls = {"plain": (target, {}), "plain, spinning": (spinning, {}), "assisted": (target, assisted)}
    speeds: dict[str, list[float]] = {name: [] for name in calls}
    texts, stats = {}, {}
    for model, extra in calls.values():
        model.generate(prompt, **{**options, "max_new_tokens": 4}, **extra)  # warm-up
    for round_ in range(runs):
        for name in calls if round_ % 2 == 0 else reversed(list(calls)):
            model, extra = calls[name]
            texts[name] = model.generate(prompt, **options, **extra)[0].token_ids
            stats[name] = model.last_stats
            speeds[name].append(stats[name].decode_tokens_per_s)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    return {"plain_tok_s": median["plain"], "spinning_tok_s": median["plain, spinning"], "assisted_tok_s": median["assisted"],
            "guessed": stats["assisted"].guessed_tokens, "taken": stats["assisted"].guesses_taken,
            "same_text": texts["assisted"] == texts["plain"]}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Assisted generation against plain decoding (CPU)", "",
             f"{result['environment']}; {result['threads']} threads; greedy, batch 1, 32-token prompt, {NEW} new tokens; the draft "
             f"drafts {result['tokens']} tokens a step (threshold 0); decode tok/s, median of {result['runs']} calls taken in turns; "
             "random weights. `python benchmarks/assisted.py`.", "",
             "| model + draft | plain tok/s | assisted tok/s | speed-up | guesses taken | same text | plain, spinning on |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['pair']} | {r['plain_tok_s']:.1f} | {r['assisted_tok_s']:.1f} | {r['assisted_tok_s'] / r['plain_tok_s']:.2f}x | "
                     f"{r['taken']} of {r['guessed']} | {'yes' if r['same_text'] else 'no'} | {r['spinning_tok_s']:.1f} "
                     f"({r['spinning_tok_s'] / r['plain_tok_s']:.2f}x) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4, help="num_assistant_tokens")
    ap.add_argument("--work", type=Path, default=HERE / "exports")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    folders = {name: prepare(name, HERE / "models" / name, args.work / name) for name in {m for pair in args.pairs for m, _ in PAIRS[pair]}}
    rows = []
    for pair in args.pairs:
        print(f"{pair} ...", file=sys.stderr, flush=True)
        (model, variant), (draft, draft_variant) = PAIRS[pair]
        row = measure(str(folders[model]["in-place", variant]), str(folders[draft]["in-place", draft_variant]), args.threads, args.runs, args.tokens)
        rows.append({"pair": pair, **row})
    result = {"environment": host(),
              "threads": args.threads, "runs": args.runs, "tokens": args.tokens, "rows": rows}
    write_results(args.out, "assisted", result, markdown(result))


if __name__ == "__main__":
    main()
