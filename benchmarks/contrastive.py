"""Contrastive search (`penalty_alpha`) against greedy search and nucleus sampling: how much the text repeats itself,
on the bundled trained model and held-out prose, and what a token costs, in one run.

    python benchmarks/contrastive.py [--speed benchmarks/exports/gpt2/int8] [--prompts 40]

Text: `--prompts` windows of 32 tokens of onnxgen/data/eval.txt (text the bundled model was not trained on), 48 tokens
apart, each continued by 128 tokens. Reported as Su et al. (2022) report it: rep-n, the share of a continuation's n-grams that
occurred earlier in it, and diversity, the product of (1 - rep-n) for n = 2, 3, 4 (1: nothing repeated). Speed: decode
tok/s at batch 1 after a 32-token prompt, 2 threads, each strategy in turns, medians of --rounds (the bundled model and
any --speed folders, which need their hidden states: exported by this onnxgen). Results: benchmarks/results/contrastive.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import onnxgen

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import held_out_prompts, host, speeds_table, strategy_speeds, write_results  # noqa: E402

STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False},
    "contrastive, top_k 4, penalty_alpha 0.6": {"penalty_alpha": 0.6, "top_k": 4},
    "nucleus sampling, top_p 0.95": {"do_sample": True, "top_k": 0, "top_p": 0.95, "temperature": 1.0, "seed": 0},
}


def rep(ids: list[int], n: int) -> float:
    """The share of the n-grams of `ids` that occurred earlier in it."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def quality(model: onnxgen.Model, prompts: list[list[int]], new: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, options in STRATEGIES.items():
        texts = [c.token_ids for c in model.generate(prompts, max_new_tokens=new, eos_token_id=None, **options)]
        reps = {n: statistics.mean(rep(t, n) for t in texts) for n in (2, 3, 4)}
        diversity = statistics.mean((1 - rep(t, 2)) * (1 - rep(t, 3)) * (1 - rep(t, 4)) for t in texts)
        out[name] = {"rep-2": reps[2], "rep-3": reps[3], "rep-4": reps[4], "diversity": diversity}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--speed", type=Path, nargs="*", default=[], help="more folders to time (gpt2 shapes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    bundled = onnxgen.load(threads=2)
    prompts = held_out_prompts(bundled.tokenizer, args.prompts)
    text = quality(bundled, prompts, 128)
    timed = strategy_speeds(args.speed, STRATEGIES, args.rounds, 64)
    table = (f"# Contrastive search against greedy search and nucleus sampling\n\n{host()}; `python benchmarks/contrastive.py "
             f"--prompts {args.prompts}{' --speed ' + ' '.join(map(str, args.speed)) if args.speed else ''}`.\n\n"
             f"Repetition: the bundled model, {len(prompts)} windows of held-out prose (32-token prompts), 128 new tokens each "
             "(no end token), means over the prompts.\n\n| strategy | rep-2 | rep-3 | rep-4 | diversity |\n| --- | ---: | ---: | ---: | ---: |\n")
    for name, q in text.items():
        table += f"| {name} | {q['rep-2']:.1%} | {q['rep-3']:.1%} | {q['rep-4']:.1%} | {q['diversity']:.3f} |\n"
    table += speeds_table(timed, STRATEGIES, args.rounds)
    write_results(args.out, "contrastive", {"host": host(), "prompts": len(prompts), "repetition": text, "decode_tokens_per_s": timed}, table)


if __name__ == "__main__":
    main()
