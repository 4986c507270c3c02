"""What token healing (`token_healing`) changes in the text, on the bundled trained model and held-out prose.

    python benchmarks/healing.py [--cuts 400]

Prompts are onnxgen/data/eval.txt (text the bundled model was not trained on) cut at random places, each continued
greedily by 6 tokens with and without healing:
- "mid-word": cut inside a word, at least a letter before and two after; right where the continuation spells the
  rest of the word, then a non-letter (the word is finished as written);
- "after a space": cut just after a space; right where the continuation is the text's next word, then a non-letter.
  Beside them, the same prompts without their trailing space, whose continuation is right where it is a space and
  that word: the model reading running text ("no space" row), what healing should come close to.
Accuracy is a fraction of the cuts; a word the model was never going to guess counts against every row alike.
Results: benchmarks/results/healing.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import onnxgen

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import EVAL_TEXT, host, write_results  # noqa: E402

WORD = re.compile(r"[A-Za-z]+")
CONTEXT = 400  # characters of the text before a cut


def cuts(text: str, count: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, the rest of its word) cut mid-word, and (prompt ending in a space, the next word), `count` of each."""
    rng = random.Random(seed)
    words = [m for m in WORD.finditer(text) if m.start() > CONTEXT // 2]
    inside = [(text[max(0, w.start() - CONTEXT): cut], text[cut: w.end()])
              for w in rng.sample([w for w in words if len(w.group()) >= 3], count)
              for cut in [rng.randrange(w.start() + 1, w.end() - 1)]]
    spaced = [(text[max(0, w.start() - CONTEXT): w.start()], w.group())
              for w in rng.sample([w for w in words if text[w.start() - 1] == " "], count)]
    return inside, spaced


def accuracy(model: onnxgen.Model, cases: list[tuple[str, str]], heal: bool) -> float:
    """The fraction of (prompt, expected) cases whose continuation starts with `expected`, then a non-letter."""
    texts = [c.text for c in model.generate([p for p, _ in cases], max_new_tokens=6, do_sample=False, token_healing=heal)]
    return sum(text.startswith(want) and not text[len(want): len(want) + 1].isalpha() for text, (_, want) in zip(texts, cases)) / len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    model = onnxgen.load()
    inside, spaced = cuts(EVAL_TEXT.read_text(), args.cuts, args.seed)

    unspaced = [(prompt[:-1], " " + word) for prompt, word in spaced]  # the space where running text has it
    rows = {"mid-word": (accuracy(model, inside, False), accuracy(model, inside, True)),
            "after a space": (accuracy(model, spaced, False), accuracy(model, spaced, True)),
            "no space (running text)": (accuracy(model, unspaced, False), None)}
    table = (f"# Token healing: greedy continuations of cut held-out prose (bundled model)\n\n{host()}; "
             f"`python benchmarks/healing.py --cuts {args.cuts}`; {args.cuts} cuts of each kind from onnxgen/data/eval.txt, "
             "6 new tokens.\n\n| cut | without healing | with healing |\n| --- | ---: | ---: |\n")
    for name, (plain, healed) in rows.items():
        table += f"| {name} | {plain:.1%} | {'' if healed is None else f'{healed:.1%}'} |\n"
    write_results(args.out, "healing", {"cuts": args.cuts, "seed": args.seed, "host": host(),
                                        "accuracy": {name: {"without": plain, "with": healed} for name, (plain, healed) in rows.items()}},
                  table)


if __name__ == "__main__":
    main()
