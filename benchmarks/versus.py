"""This checkout's `onnxgen bench` against another checkout's (a git worktree of an earlier commit), in turns.

    git worktree add /tmp/base HEAD~1
    python benchmarks/versus.py benchmarks/exports/gpt2/int8 --baseline /tmp/base --strategy beam --prompt-tokens 32 512 \
        --name beam-prompt

Each round runs every folder's `onnxgen bench --json` once with each checkout's code, each in a process of its own,
who goes first alternating, so that a drift of the machine's speed reaches both sides alike. Reported per case:
the medians over the rounds of the time to the first token, decode tok/s and the whole call (first token, then
new_tokens - 1 at the decode rate), and this checkout's ratio to the baseline's. Results: <out>/<name>.{json,md}.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import host, write_results  # the suite's own


def bench(checkout: Path, folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One `onnxgen bench --json` run of `folder` with the onnxgen package of `checkout`; its cases."""
    command = [sys.executable, "-m", "onnxgen", "bench", "--model", str(folder.resolve()), "--batch", str(args.batch),
               "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--threads", str(args.threads), "--json",
               *(f"--strategy={s}" for s in args.strategy), *(f"--prompt-tokens={n}" for n in args.prompt_tokens)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["cases"]


def summary(runs: list[list[dict[str, Any]]], new_tokens: int) -> list[dict[str, Any]]:
    """Per case, the medians over the rounds, and each round's figure (a first token can vary far more than decoding)."""
    cases = []
    for i, case in enumerate(runs[0]):
        ttfts = [r[i]["time_to_first_token_ms"]["median"] for r in runs]
        tpss = [r[i]["decode_tokens_per_s"]["median"] for r in runs]
        calls = [ttft + 1000 * (new_tokens - 1) * case["batch"] / tps for ttft, tps in zip(ttfts, tpss)]
        cases.append({"case": f"b{case['batch']} p{case['prompt_tokens']} {case['strategy']}", "ttft_ms": statistics.median(ttfts),
                      "decode_tps": statistics.median(tpss), "call_ms": statistics.median(calls),
                      "rounds": {"ttft_ms": ttfts, "decode_tps": tpss}})
    return cases


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['name']}: this checkout against {result['baseline']}", "",
             (f"{result['environment']}; {result['threads']} threads, {result['new_tokens']} new tokens, medians of "
              f"{result['rounds']} rounds in turns; `{result['command']}`."), "",
             ("| folder | case | first token ms (base -> this) | its rounds' range | decode tok/s (base -> this) | call ms (base -> this) "
              "| call, base / this |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for folder, sides in result["folders"].items():
        for base, this in zip(sides["baseline"], sides["this"]):
            spans = [f"{min(side['rounds']['ttft_ms']):.0f}-{max(side['rounds']['ttft_ms']):.0f}" for side in (base, this)]
            lines.append(f"| {folder} | {this['case']} | {base['ttft_ms']:.0f} -> {this['ttft_ms']:.0f} | {spans[0]} -> {spans[1]} | "
                         f"{base['decode_tps']:.1f} -> {this['decode_tps']:.1f} | {base['call_ms']:.0f} -> {this['call_ms']:.0f} | "
                         f"{base['call_ms'] / this['call_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--baseline", type=Path, required=True, help="another onnxgen checkout")
    ap.add_argument("--strategy", nargs="+", default=["greedy"])
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[32])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per case within one bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="versus")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    sides = {"this": HERE.parent, "baseline": args.baseline.resolve()}
    folders: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for folder in args.folders:
        runs: dict[str, list[list[dict[str, Any]]]] = {"this": [], "baseline": []}
        for round_ in range(args.rounds):
            for side in (["this", "baseline"] if round_ % 2 == 0 else ["baseline", "this"]):
                print(f"[{folder}] round {round_ + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                runs[side].append(bench(sides[side], folder, args))
        folders[str(folder)] = {side: summary(r, args.new_tokens) for side, r in runs.items()}
    result = {"name": args.name, "environment": host(), "baseline": str(args.baseline), "threads": args.threads,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "command": " ".join(["python", *sys.argv]), "folders": folders}
    write_results(args.out, args.name, result, markdown(result))


if __name__ == "__main__":
    main()
