"""What a quantized model costs: compare it with its fp32 parent on the evaluation text that ships with
onnxgen (public-domain prose: Austen, Melville, a State of the Union address; see onnxgen/data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import manifest
from .logits import log_softmax
from .model import Model
from .runtime import Provider, runs_on_cuda

EVAL_TEXT = Path(__file__).parent / "data" / "eval.txt"


def _windows(model: Model, max_tokens: int) -> list[np.ndarray]:
    ids = model.tokenizer.encode(EVAL_TEXT.read_text(encoding="utf-8"))[:max_tokens]
    width = min(model.context_length, 512)
    return [np.asarray([ids[i : i + width]], dtype=np.int64) for i in range(0, len(ids) - 1, width) if len(ids[i : i + width]) > 1]


def _outputs(folder: Path, provider: Provider, max_tokens: int, greedy_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """One model's evaluation windows, its logits on them and its greedy continuation of the first
    window's start. The models run one after the other: two gpt2-large sessions at once would add up."""
    # An fp32 parent with the cache in place has no CUDA kernel for its attention: it is judged on the CPU.
    model = Model(folder, provider if runs_on_cuda(manifest.read(folder)) else "cpu")
    windows = _windows(model, max_tokens)
    logits = [model.runtime.all_logits(window)[0, :-1] for window in windows]
    prompt = windows[0][0, :32].tolist()
    new = min(greedy_tokens, model.context_length - len(prompt))
    greedy = model.generate(prompt, max_new_tokens=new, do_sample=False, num_beams=1, repetition_penalty=1.0, min_new_tokens=0, eos_token_id=None)
    return windows, logits, greedy[0].token_ids


def compare(reference: Path, candidate: Path, provider: Provider = "cpu", max_tokens: int = 1024, greedy_tokens: int = 48) -> dict[str, Any]:
    windows, ref_logits, ga = _outputs(reference, provider, max_tokens, greedy_tokens)
    _, cand_logits, gb = _outputs(candidate, provider, max_tokens, greedy_tokens)
    nll = {"fp32": [], "quantized": []}  # type: dict[str, list[np.ndarray]]
    agree, max_diff, diff_sum, count = 0, 0.0, 0.0, 0
    for window, a, b in zip(windows, ref_logits, cand_logits):
        targets = window[0, 1:]
        for name, scores in (("fp32", a), ("quantized", b)):
            nll[name].append(-log_softmax(scores.astype(np.float64))[np.arange(len(targets)), targets])
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        diff = np.abs(a - b)
        max_diff, diff_sum, count = max(max_diff, float(diff.max())), diff_sum + float(diff.sum()), count + diff.size
    positions = sum(len(x) for x in nll["fp32"])
    same = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), len(ga))
    return {
        "eval_text": EVAL_TEXT.name,
        "eval_tokens": positions,
        "perplexity_fp32": float(np.exp(np.concatenate(nll["fp32"]).mean())),
        "perplexity_quantized": float(np.exp(np.concatenate(nll["quantized"]).mean())),
        "top1_agreement": agree / positions,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": diff_sum / count,
        "greedy_tokens": len(ga),
        "greedy_tokens_agreeing": same,
    }
