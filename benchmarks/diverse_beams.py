"""Diverse beam search (`num_beam_groups`, `diversity_penalty`) against beam search: how much a prompt's returned
beams differ from one another, what that costs in score and in speed; and, where a folder holds transformers 4.55
(the last with group beam search in its generate), onnxgen checked against it on random cases.

    python benchmarks/diverse_beams.py [--speed benchmarks/exports/gpt2/in-place-int8] [--prompts 40]
    pip install --no-deps --target /tmp/tf455 "transformers==4.55.4" "tokenizers==0.21.4"
    python benchmarks/diverse_beams.py --against-transformers /tmp/tf455 --cases 300

Text: `--prompts` windows of 32 tokens of onnxgen/data/eval.txt (text the bundled model was not trained on), 48 tokens
apart, each continued by 24 tokens, every beam returned (4). Reported per prompt, then averaged: distinct-2, the share
of the returned beams' bigrams that are different (1: no two beams share a bigram), the first new tokens that differ
among them, and the mean score (log-probability per token) of the best and of all returned beams. Speed: decode tok/s
at batch 1 after a 32-token prompt, 2 threads, each strategy in turns, medians of --rounds. Results:
benchmarks/results/diverse_beams.{json,md}.

Against transformers: a tiny checkpoint (tests/conftest.py's), exported; `--cases` random cases (1 to 3 prompts of
different lengths, 2 to 4 groups of 1 to 3 beams, penalties, lengths, length penalties, early stopping, with and
without a raised end token, repetition penalty, n-gram bans and min_new_tokens; prompts of equal lengths where a
repetition penalty or n-gram ban is on, which onnxgen applies without the left padding, README); transformers'
generate runs in a subprocess on the folder's transformers. Every returned sequence and score is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnxgen

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from run import held_out_prompts, host, speeds_table, strategy_speeds, write_results  # noqa: E402

BEAMS = 4
STRATEGIES: dict[str, dict[str, Any]] = {
    "beam search, 4 beams": {"num_beams": BEAMS},
    "diverse, 2 groups of 2, penalty 1.0": {"num_beams": BEAMS, "num_beam_groups": 2, "diversity_penalty": 1.0},
    "diverse, 4 groups of 1, penalty 1.0": {"num_beams": BEAMS, "num_beam_groups": 4, "diversity_penalty": 1.0},
}
# Run by the subprocess, on transformers 4.55 from the folder put first on PYTHONPATH: each case's sequences and scores
REFERENCE = """
import json, sys, torch, transformers
from transformers import GPT2LMHeadModel
assert transformers.__version__.startswith("4.55"), transformers.__version__
model = GPT2LMHeadModel.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
eos = model.config.eos_token_id
results = []
for case in json.loads(open(sys.argv[2]).read()):
    width = max(map(len, case["prompts"]))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in case["prompts"]])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in case["prompts"]])
    bias = {"sequence_bias": {(eos,): case["eos_bias"]}} if case["eos_bias"] else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=eos, eos_token_id=eos, do_sample=False,
                             return_dict_in_generate=True, output_scores=True, **case["options"], **bias)
    rows = [row[: row.index(eos) + 1] if eos in row else row for row in out.sequences[:, width:].tolist()]
    results.append({"tokens": rows, "scores": out.sequences_scores.tolist()})
print(json.dumps(results))
"""


def distinct_2(texts: list[list[int]]) -> float:
    grams = [tuple(t[i : i + 2]) for t in texts for i in range(len(t) - 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def quality(model: onnxgen.Model, prompts: list[list[int]], new: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, options in STRATEGIES.items():
        rows = [model.generate([p], max_new_tokens=new, eos_token_id=None, num_return_sequences=BEAMS, **options) for p in prompts]
        out[name] = {"distinct-2": statistics.mean(distinct_2([c.token_ids for c in row]) for row in rows),
                     "first tokens": statistics.mean(len({c.token_ids[0] for c in row}) for row in rows),
                     "best score": statistics.mean(row[0].score for row in rows),
                     "mean score": statistics.mean(c.score for row in rows for c in row)}
    return out


def random_cases(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        groups, width = rng.choice([2, 3, 4]), rng.choice([1, 2, 3])
        options: dict[str, Any] = {
            "num_beams": groups * width, "num_beam_groups": groups, "diversity_penalty": rng.choice([0.01, 0.5, 1.0, 3.0]),
            "max_new_tokens": rng.choice([3, 8, 16]), "num_return_sequences": rng.randint(1, groups * width),
            "length_penalty": rng.choice([1.0, 0.0, 2.0, -1.0]), "early_stopping": rng.choice([False, True, "never"])}
        for name, value in (("repetition_penalty", 1.5), ("no_repeat_ngram_size", 2), ("min_new_tokens", 2)):
            if rng.random() < 0.3:
                options[name] = value
        unpadded = "repetition_penalty" in options or "no_repeat_ngram_size" in options
        size = rng.randint(1, 9)
        prompts = [[rng.randrange(1, 300) for _ in range(size if unpadded else rng.randint(1, 9))] for _ in range(rng.randint(1, 3))]
        cases.append({"prompts": prompts, "options": options, "eos_bias": rng.choice([0.0, 0.0, 2.0, 4.0])})
    return cases


def against_transformers(folder: Path, count: int, seed: int) -> dict[str, Any]:
    from onnxgen.export import export
    from tests.conftest import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "checkpoint")
        export(str(checkpoint), Path(tmp) / "onnx", quiet=True)
        model = onnxgen.load(Path(tmp) / "onnx", threads=2)
        eos = model.defaults.eos_ids[0]
        cases = random_cases(count, seed)
        (Path(tmp) / "cases.json").write_text(json.dumps(cases))
        done = subprocess.run([sys.executable, "-c", REFERENCE, str(checkpoint), str(Path(tmp) / "cases.json")],
                              env={**os.environ, "PYTHONPATH": str(folder)}, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"transformers in {folder} failed: {done.stderr[-2000:]}")
        expected = json.loads(done.stdout.strip().splitlines()[-1])
        differ = []
        for case, want in zip(cases, expected):
            bias = {"sequence_bias": {(eos,): case["eos_bias"]}} if case["eos_bias"] else {}
            got = model.generate(case["prompts"], **case["options"], **bias)
            same = [c.token_ids for c in got] == want["tokens"]
            close = all(abs(c.score - s) <= 1e-3 * max(1.0, abs(s)) for c, s in zip(got, want["scores"]))
            if not (same and close):
                differ.append(case)
    return {"cases": count, "seed": seed, "differ": len(differ), "first differing": differ[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--speed", type=Path, nargs="*", default=[], help="more folders to time (gpt2 shapes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against-transformers", type=Path, help="a folder holding transformers 4.55 (pip install --target)")
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.against_transformers is not None:
        checked = against_transformers(args.against_transformers, args.cases, args.seed)
        write_results(args.out, "diverse_beams-transformers", checked,
                      f"# Diverse beam search against transformers 4.55's group beam search\n\n{host()}; `python benchmarks/diverse_beams.py "
                      f"--against-transformers DIR --cases {args.cases} --seed {args.seed}`.\n\n{checked['cases']} random cases; "
                      f"{checked['differ']} differ in a returned sequence or its score (beyond 1e-3 relative).\n")
        raise SystemExit(1 if checked["differ"] else 0)
    bundled = onnxgen.load(threads=2)
    prompts = held_out_prompts(bundled.tokenizer, args.prompts)
    text = quality(bundled, prompts, 24)
    timed = strategy_speeds(args.speed, STRATEGIES, args.rounds, 64)
    table = (f"# Diverse beam search against beam search\n\n{host()}; `python benchmarks/diverse_beams.py --prompts {args.prompts}"
             f"{' --speed ' + ' '.join(map(str, args.speed)) if args.speed else ''}`.\n\n"
             f"The bundled model, {len(prompts)} windows of held-out prose (32-token prompts), 24 new tokens, all {BEAMS} beams "
             "returned; means over the prompts. distinct-2: the share of the returned beams' bigrams that differ; first tokens: "
             "how many different first tokens the beams start with; scores: log-probability per token.\n\n"
             "| strategy | distinct-2 | first tokens | best beam's score | all beams' score |\n| --- | ---: | ---: | ---: | ---: |\n")
    for name, q in text.items():
        table += f"| {name} | {q['distinct-2']:.3f} | {q['first tokens']:.2f} | {q['best score']:.3f} | {q['mean score']:.3f} |\n"
    table += speeds_table(timed, STRATEGIES, args.rounds)
    write_results(args.out, "diverse_beams", {"quality": text, "speed": timed, "prompts": len(prompts)}, table)


if __name__ == "__main__":
    main()
