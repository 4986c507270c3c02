"""The host's share of a beam search step: everything BeamSearch.step does besides the model's forward
(log-softmax, the selections over batch x beams x vocabulary scores, the bookkeeping), timed with the
forward replaced by fixed random scores and the cache left alone.

    python benchmarks/beam_host.py benchmarks/exports/gpt2/in-place-int8 --batch 8 --beams 4

On a GPU the forward of 32 rows is short, so this decides whether beam search keeps up with PyTorch's
(batch 8 x 512-token prompts, 4 beams, gpt2-large on an H100: 270 tok/s against PyTorch's 299 before the
selections moved to onnxruntime's TopK).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import onnxgen
from onnxgen.beam import BeamSearch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a model folder (its runtime and tokenizer; its vocabulary sets the scores' width)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = onnxgen.load(args.folder, threads=args.threads)
    opts = model.options(num_beams=args.beams, do_sample=False, max_new_tokens=args.steps + 1, eos_token_id=None,
                         min_new_tokens=0, repetition_penalty=1.0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, model.dims.vocab_size, size=(args.batch, 16)).tolist()
    search = BeamSearch(model.runtime, model.tokenizer, prompts, opts, 0)
    scores = [rng.standard_normal((args.batch * args.beams, model.dims.vocab_size)).astype(np.float32) * 3 for _ in range(8)]
    search.rows.forward = lambda: scores[len(search.step_ends) % len(scores)]  # type: ignore[method-assign]
    search.rows.advance = lambda tokens, source=None: None  # type: ignore[method-assign]
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        search.step()
        times.append(time.perf_counter() - start)
    print(f"{args.batch} prompts x {args.beams} beams, {model.dims.vocab_size} tokens: host {statistics.median(times) * 1e3:.2f} ms "
          f"a step (median of {args.steps}, {args.threads} threads)")


if __name__ == "__main__":
    main()
