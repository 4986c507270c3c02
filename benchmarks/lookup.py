"""Prompt lookup decoding (`prompt_lookup_num_tokens`) against plain decoding, greedy, batch 1, on the CPU, in one run.

    python benchmarks/lookup.py --threads 2

Two texts per model, each continued NEW tokens with and without guesses (the two in turns, --runs rounds, the
median), the prompt a passage of onnxgen/data/eval.txt:
- "quote": the passage, a blank line, then its first words again, so that the continuation can repeat the
  passage (what summaries, quotes and code edits do). The bundled model is trained and continues as it will;
  the gpt2-shaped folders (random weights, make_models.py) have no notion of text, so a logits processor makes
  them quote: the passage's next token gets +30, except at every 10th token, where the model's own choice stands;
- "free": the passage alone, continued as the model will: the bundled model's prose; random weights fall into
  loops, which guesses catch;
- "backwards": a processor makes every model quote the passage backwards from its end, so that each step has a
  guess (the last token occurred before) and the guess fails: what trying costs where it never pays.
Reported: decode tok/s (the generator's own figure), guesses taken of those run, tokens a forward, and whether
the text is plain decoding's (int8 quantizes a pass's activations with one scale for all its positions, so
its near-ties can go the other way). Results: benchmarks/results/lookup.{json,md}. Run it on a quiet machine.
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
from cache import prepare  # noqa: E402  (the in-place gpt2 folders that benchmark makes)
from run import EVAL_TEXT, host, write_results  # noqa: E402

NEW = 96


class Quote:
    """A model made to quote `passage` from token `start` on, a token a step in `direction` (see the docstring);
    every 10th token the model's own when `breaks`."""

    def __init__(self, passage: list[int], prompt_length: int, start: int, direction: int, breaks: bool) -> None:
        self.passage, self.prompt_length, self.start, self.direction, self.breaks = passage, prompt_length, start, direction, breaks

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        generated = input_ids.shape[1] - self.prompt_length
        if self.breaks and generated % 10 == 9:
            return scores
        out = scores.copy()
        out[:, self.passage[(self.start + self.direction * generated) % len(self.passage)]] += 30.0
        return out


def texts(model: Any, passage_tokens: int, trained: bool) -> dict[str, tuple[list[int], list[Any]]]:
    """The prompts (token ids) and processors of the two texts (see the docstring)."""
    ids = model.tokenizer.encode(EVAL_TEXT.read_text())
    passage = ids[:passage_tokens]
    echo = model.tokenizer.encode("\n\n")
    quote = passage + echo + passage[:12]
    processors = [] if trained else [Quote(passage, len(quote), 12, 1, breaks=True)]
    return {"quote": (quote, processors), "free": (passage, []),
            "backwards": (passage, [Quote(passage, len(passage), len(passage) - 2, -1, breaks=False)])}


def measure(folder: str, threads: int, runs: int, count: int) -> list[dict[str, Any]]:
    import onnxgen

    model = onnxgen.load(folder if folder != "bundled" else None, threads=threads)
    rows = []
    passage_tokens = min(300, model.context_length - NEW - 20)
    for name, (prompt, processors) in texts(model, passage_tokens, trained=folder == "bundled").items():
        options = dict(max_new_tokens=NEW, min_new_tokens=0, do_sample=False, eos_token_id=None, repetition_penalty=1.0,
                       logits_processors=processors)
        model.generate(prompt, **options)  # warm-up
        speeds: dict[bool, list[float]] = {False: [], True: []}
        results = {}
        for round_ in range(runs):
            for guessing in (False, True) if round_ % 2 == 0 else (True, False):
                completion = model.generate(prompt, prompt_lookup_num_tokens=count if guessing else None, **options)[0]
                stats = model.last_stats
                assert stats is not None
                speeds[guessing].append(stats.decode_tokens_per_s)
                results[guessing] = (completion.token_ids, stats.guessed_tokens, stats.guesses_taken)
        tokens, guessed, taken = results[True]
        forwards = NEW - 1 - taken  # after the prompt pass
        rows.append({"model": folder, "text": name, "prompt_tokens": len(prompt), "plain_tok_s": statistics.median(speeds[False]),
                     "lookup_tok_s": statistics.median(speeds[True]), "guessed": guessed, "taken": taken,
                     "tokens_per_forward": (NEW - 1) / forwards, "same_text": tokens == results[False][0]})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Prompt lookup decoding against plain decoding (CPU)", "",
             f"{result['environment']}; {result['threads']} threads; greedy, batch 1, {NEW} new tokens, prompt_lookup_num_tokens="
             f"{result['count']}; decode tok/s, median of {result['runs']} calls taken in turns. `python benchmarks/lookup.py`.", "",
             "| model | text | prompt tokens | plain tok/s | lookup tok/s | speed-up | guesses taken | tokens a forward | same text |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['text']} | {r['prompt_tokens']} | {r['plain_tok_s']:.1f} | {r['lookup_tok_s']:.1f} | "
                     f"{r['lookup_tok_s'] / r['plain_tok_s']:.2f}x | {r['taken']} of {r['guessed']} | {r['tokens_per_forward']:.2f} | "
                     f"{'yes' if r['same_text'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=5, help="prompt_lookup_num_tokens")
    ap.add_argument("--work", type=Path, default=HERE / "exports")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    folders = prepare("gpt2", HERE / "models" / "gpt2", args.work / "gpt2")
    rows = []
    for name, folder in [("bundled prose-mini", "bundled"), *((f"gpt2 {v}", str(folders["in-place", v])) for v in args.variants)]:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows += [{**row, "model": name} for row in measure(folder, args.threads, args.runs, args.count)]
    result = {"environment": host(),
              "threads": args.threads, "runs": args.runs, "count": args.count, "rows": rows}
    write_results(args.out, "lookup", result, markdown(result))


if __name__ == "__main__":
    main()
