"""The prompt cache (`load(prompt_cache_mib=...)`) against computing every prompt whole: a chat's turns, each
prompt the conversation so far and a new message, on the CPU, in one run.

    python benchmarks/prompt_cache.py --threads 2

For each gpt2-shaped folder (random weights; the in-place folders benchmarks/cache.py makes), the same folder is
loaded twice in one process, with a prompt cache and without, and each runs the same --turns turns in turns with
the other (greedy, 32 new tokens a turn): the first prompt is --first tokens of onnxgen/data/eval.txt, each next
one the prompt before, its completion and 20 more tokens. Reported: time to the first token of turn 1 and the
median over the later turns, and how many turns gave the same text. A case named "... server" runs the turns
through the server's batcher instead (onnxgen/batcher.py, in this process, no HTTP), each turn beside another
request that decodes all the while, the time to the first token counted from the submit to the first event.
Results: benchmarks/results/prompt_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cache import prepare  # noqa: E402  (the in-place folders)
from run import host, write_results  # noqa: E402

NEW, MESSAGE = 32, 20
EVAL = HERE.parent / "onnxgen" / "data" / "eval.txt"


class Served:
    """A model behind its own batcher: generate() submits a job and waits for it (server's time to first event)."""

    def __init__(self, model: Any) -> None:
        from onnxgen.batcher import Batcher

        self.model, self.batcher, self.last_ttft_ms = model, Batcher(model, max_batch=4), 0.0
        self.tokenizer = model.tokenizer

    def submit(self, prompt: list[int], **options: Any) -> queue.Queue[tuple[str, Any]]:
        from onnxgen.batcher import Job

        inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        opts = self.model.options(**options)
        self.batcher.submit(Job(self.model.prompt_ids([prompt], opts), opts, lambda kind, value: inbox.put((kind, value))))
        return inbox

    def generate(self, prompt: list[int], **options: Any) -> list[Any]:
        start = time.perf_counter()
        inbox = self.submit(prompt, **options)
        kind, value = inbox.get()
        self.last_ttft_ms = (time.perf_counter() - start) * 1000
        while kind == "event":
            kind, value = inbox.get()
        assert kind == "done", value
        return value[0]


def measure(folder: str, threads: int, turns: int, first: int, server: bool) -> dict[str, Any]:
    import onnxgen

    models: dict[str, Any] = {"cached": onnxgen.load(folder, threads=threads, prompt_cache_mib=512), "whole": onnxgen.load(folder, threads=threads)}
    if server:
        models = {name: Served(model) for name, model in models.items()}
    text = models["whole"].tokenizer.encode(EVAL.read_text())
    options = dict(max_new_tokens=NEW, min_new_tokens=0, do_sample=False, eos_token_id=None, repetition_penalty=1.0)
    models["whole"].generate(text[:8], **{**options, "max_new_tokens": 2})  # warm-up, no cache to keep
    models["cached"].generate(text[-40:], **{**options, "max_new_tokens": 2})  # warm-up, shares nothing with the turns
    prompt, used = text[:first], first
    ttft: dict[str, list[float]] = {name: [] for name in models}
    same = 0
    for turn in range(turns):
        completions = {}
        for name in models if turn % 2 == 0 else reversed(list(models)):
            beside = models[name].submit(text[-60:], **{**options, "max_new_tokens": 200}) if server else None
            completions[name] = models[name].generate(prompt, **options)[0].token_ids
            if server:
                ttft[name].append(models[name].last_ttft_ms)
                while beside.get()[0] == "event":  # type: ignore[union-attr]
                    pass
            else:
                stats = models[name].last_stats
                assert stats is not None
                ttft[name].append(stats.time_to_first_token_s * 1000)
        same += completions["cached"] == completions["whole"]
        prompt = prompt + completions["whole"] + text[used : used + MESSAGE]
        used += MESSAGE
    return {"first_ms": {name: values[0] for name, values in ttft.items()},
            "later_ms": {name: statistics.median(values[1:]) for name, values in ttft.items()},
            "last_prompt_tokens": len(prompt) - NEW - MESSAGE, "same_turns": same}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Prompt cache: a chat's turns (CPU)", "",
             f"{result['environment']}; {result['threads']} threads; greedy, {NEW} new tokens a turn, {result['turns']} turns, "
             f"the first prompt {result['first']} tokens, each next one the prompt before, its completion and {MESSAGE} tokens; "
             "time to first token. `python benchmarks/prompt_cache.py`.", "",
             "| model | turn 1, whole / cached (ms) | later turns, whole (ms) | later turns, cached (ms) | speed-up | same text |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        first, later = r["first_ms"], r["later_ms"]
        lines.append(f"| {r['model']} | {first['whole']:.0f} / {first['cached']:.0f} | {later['whole']:.0f} | {later['cached']:.0f} | "
                     f"{later['whole'] / later['cached']:.1f}x | {r['same_turns']} of {result['turns']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["gpt2 fp32", "gpt2 int8", "gpt2 int4", "gpt2-large int8", "gpt2 int8 server"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--first", type=int, default=300)
    ap.add_argument("--work", type=Path, default=HERE / "exports")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        name, variant, *where = case.split()
        folders = prepare(name, HERE / "models" / name, args.work / name)
        print(f"{case} ...", file=sys.stderr, flush=True)
        rows.append({"model": case, **measure(str(folders["in-place", variant]), args.threads, args.turns, args.first, where == ["server"])})
    result = {"environment": host(),
              "threads": args.threads, "turns": args.turns, "first": args.first, "rows": rows}
    write_results(args.out, "prompt_cache", result, markdown(result))


if __name__ == "__main__":
    main()
