"""The watermark's cost a step against transformers' own processor, in the same process: onnxgen's filter
(watermark.py: numpy) and transformers' WatermarkLogitsProcessor (torch) on the same scores and token histories.

    python benchmarks/watermark.py --threads 2

GPT-2's vocabulary (50,257), one row and four, each step's last token new (lefthash shuffles afresh: no list kept
from an earlier step) or drawn from 20 tokens (as running text repeats its common tokens); selfhash judges the 40
best-scored tokens each step. The same green tokens both sides (checked on every step). Medians of the steps, in ms.
Also: detecting a 200-token text, both sides. Results: benchmarks/results/watermark.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import WatermarkDetector
from transformers.generation.logits_process import WatermarkLogitsProcessor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import host  # noqa: E402  (the suite's own description of this machine)

from onnxgen.options import WatermarkingConfig  # noqa: E402
from onnxgen.watermark import Greenlists, detect, watermark  # noqa: E402

VOCAB = 50257
CASES = [("lefthash", 1, "new"), ("lefthash", 1, "20 tokens"), ("lefthash", 4, "new"), ("selfhash", 1, "new"), ("selfhash", 4, "new")]


def step_times(scheme: str, rows: int, tokens: str, steps: int) -> dict[str, Any]:
    config = WatermarkingConfig(hashing_key=15485863, seeding_scheme=scheme)  # type: ignore[arg-type]
    ours, theirs = watermark(config, 0), WatermarkLogitsProcessor(VOCAB, "cpu", seeding_scheme=scheme)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, VOCAB, 20)
    history = [rng.integers(0, VOCAB, 32).tolist() for _ in range(rows)]
    times: dict[str, list[float]] = {"onnxgen": [], "transformers": []}
    for _ in range(steps):
        for row in history:
            row.append(int(rng.integers(0, VOCAB) if tokens == "new" else rng.choice(pool)))
        scores = rng.normal(size=(rows, VOCAB)).astype(np.float32) * 3
        start = time.perf_counter()
        mine = ours(scores, history, 0)
        times["onnxgen"].append(time.perf_counter() - start)
        ids, raw = torch.tensor(history), torch.from_numpy(scores.copy())
        start = time.perf_counter()
        reference = theirs(ids, raw).numpy()
        times["transformers"].append(time.perf_counter() - start)
        assert np.array_equal(mine, reference)
    return {"scheme": scheme, "rows": rows, "tokens": tokens,
            **{f"{side}_ms": statistics.median(t) * 1e3 for side, t in times.items()}}


def detection_times(scheme: str, length: int) -> dict[str, Any]:
    config = WatermarkingConfig(hashing_key=15485863, seeding_scheme=scheme)  # type: ignore[arg-type]
    ids = np.random.default_rng(1).integers(0, VOCAB, length)
    detector = WatermarkDetector(model_config=type("Config", (), {"bos_token_id": None, "is_encoder_decoder": False, "vocab_size": VOCAB})(),
                                 device="cpu", watermarking_config={"seeding_scheme": scheme, "hashing_key": 15485863,
                                                                    "greenlist_ratio": 0.25, "bias": 2.0, "context_width": 1})
    start = time.perf_counter()
    mine = detect(ids.tolist(), Greenlists(config, VOCAB))
    ours = time.perf_counter() - start
    start = time.perf_counter()
    reference = detector(torch.from_numpy(ids[None]), return_dict=True)
    theirs = time.perf_counter() - start
    assert mine.num_green_tokens == reference.num_green_tokens[0]
    return {"scheme": scheme, "tokens": length, "onnxgen_ms": ours * 1e3, "transformers_ms": theirs * 1e3}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['host']}; {result['threads']} threads (torch's and numpy's); GPT-2's vocabulary; medians of "
             f"{result['steps']} steps; `python benchmarks/watermark.py --threads {result['threads']}`.", "",
             "| scheme | rows | last tokens | onnxgen ms a step | transformers ms a step | transformers / onnxgen |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in result["steps_ms"]:
        lines.append(f"| {r['scheme']} | {r['rows']} | {r['tokens']} | {r['onnxgen_ms']:.2f} | {r['transformers_ms']:.2f} | "
                     f"{r['transformers_ms'] / r['onnxgen_ms']:.2f}x |")
    lines += ["", "| detection | tokens | onnxgen ms | transformers ms | transformers / onnxgen |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["detection_ms"]:
        lines.append(f"| {r['scheme']} | {r['tokens']} | {r['onnxgen_ms']:.1f} | {r['transformers_ms']:.1f} | "
                     f"{r['transformers_ms'] / r['onnxgen_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"host": host(), "threads": args.threads, "steps": args.steps,
              "steps_ms": [step_times(*case, args.steps) for case in CASES],
              "detection_ms": [detection_times(scheme, 200) for scheme in ("lefthash", "selfhash")]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "watermark.json").write_text(json.dumps(result, indent=2))
    (args.out / "watermark.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
