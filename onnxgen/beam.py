"""Beam search, step for step the algorithm of transformers' `generate` (4.57), so results match it.

Per prompt, `num_beams` running beams; each step looks at the best 2 x num_beams continuations so that
enough stay alive when some end. Ended candidates compete for `num_beams` finished slots on their
length-penalised score; the search stops when no running beam can beat the finished ones (the
`early_stopping` rule), when the finished slots are full (`early_stopping=True`), or at max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import logits
from .decoding import left_pad
from .options import GenerationOptions
from .runtime import Runtime

NEG = np.float32(-1.0e9)


@dataclass
class Beam:
    tokens: list[int]
    score: float
    finish_reason: str


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """array[b, index[b, j], ...] for every batch b."""
    return np.take_along_axis(array, index.reshape(index.shape + (1,) * (array.ndim - 2)), axis=1)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, best first."""
    part = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def beam_search(runtime: Runtime, prompts: list[list[int]], opts: GenerationOptions, pad_id: int) -> list[list[Beam]]:
    """Returns, per prompt, the best `num_return_sequences` beams, best first."""
    b, k = len(prompts), opts.num_beams
    eos = np.asarray(opts.eos_ids, dtype=np.int64)
    keep = max(2, 1 + len(eos)) * k  # candidates looked at per step
    filters = logits.filters_for(opts)

    ids, mask, positions = left_pad([p for p in prompts for _ in range(k)], pad_id)
    prompt_len = ids.shape[1]
    max_len = prompt_len + opts.max_new_tokens
    running = np.full((b, k, max_len), pad_id, dtype=np.int64)
    running[:, :, :prompt_len] = ids.reshape(b, k, prompt_len)
    finished_seqs = running.copy()
    running_scores = np.zeros((b, k), dtype=np.float32)
    running_scores[:, 1:] = NEG  # all beams start equal: let only the first one spread at step one
    finished_scores = np.full((b, k), NEG, dtype=np.float32)
    is_finished = np.zeros((b, k), dtype=bool)
    improvable = np.ones((b, 1), dtype=bool)
    running_lens = np.zeros((b, k), dtype=np.int64)  # generated tokens per beam
    finished_lens = np.zeros((b, k), dtype=np.int64)
    top_k_mask = np.arange(keep) < k
    cache = runtime.empty_cache(b * k)
    reorder_buffers: list[np.ndarray] = []
    cur = prompt_len
    while True:
        out, cache = runtime.forward(ids, mask, positions, cache)
        flat = running.reshape(b * k, max_len)
        history = [prompts[r // k] + flat[r, prompt_len:cur].tolist() for r in range(b * k)] if filters else []
        scores = logits.apply(filters, logits.log_softmax(out), history, cur - prompt_len)
        scores = (scores.reshape(b, k, -1) + running_scores[:, :, None]).reshape(b, -1)
        vocab = out.shape[-1]

        # The best `keep` continuations over all beams of each prompt.
        top = _top(scores, keep)
        top_scores = np.take_along_axis(scores, top, axis=-1)
        top_beams, top_tokens = top // vocab, top % vocab
        top_seqs = _take(running, top_beams)
        top_seqs[:, :, cur] = top_tokens
        top_lens = _take(running_lens, top_beams) + 1
        ends = np.isin(top_tokens, eos) | (cur + 1 >= max_len)

        # Running beams for the next step: the best candidates that did not end.
        live_scores = top_scores + ends.astype(np.float32) * NEG
        chosen = _top(live_scores, k)
        running, running_scores, running_lens = _take(top_seqs, chosen), np.take_along_axis(live_scores, chosen, -1), np.take_along_axis(top_lens, chosen, -1)
        beam_rows = (np.take_along_axis(top_beams, chosen, -1) + np.arange(b)[:, None] * k).reshape(-1)

        # Finished slots: ended candidates among the top k compete on length-penalised score.
        penalised = top_scores / np.float32((cur + 1 - prompt_len) ** opts.length_penalty)
        full = is_finished.all(axis=1, keepdims=True) & (opts.early_stopping is True)
        just_ended = ends & top_k_mask[None, :]
        penalised = penalised + full * NEG + (~improvable) * NEG + (~just_ended) * NEG
        merged_scores = np.concatenate([finished_scores, penalised], axis=1)
        best = _top(merged_scores, k)
        finished_seqs = _take(np.concatenate([finished_seqs, top_seqs], axis=1), best)
        finished_scores = np.take_along_axis(merged_scores, best, -1)
        finished_lens = np.take_along_axis(np.concatenate([finished_lens, top_lens], axis=1), best, -1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, just_ended], axis=1), best, -1)

        cur += 1
        # Can a running beam still beat the worst finished one?
        horizon = (max_len if opts.early_stopping == "never" and opts.length_penalty > 0 else cur) - prompt_len
        best_running = running_scores[:, :1] / np.float32(horizon**opts.length_penalty)
        worst_finished = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG)
        improvable = improvable & (best_running > worst_finished).any(axis=-1, keepdims=True)
        if not improvable.any() or (is_finished.all() and opts.early_stopping is True) or ends.all():
            break

        cache = runtime.reorder(cache, beam_rows, reorder_buffers)
        ids = running[:, :, cur - 1].reshape(-1, 1)
        mask = np.concatenate([mask, np.ones((b * k, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1

    results = []
    for i in range(b):
        beams = []
        for j in range(opts.num_return_sequences):
            tokens = finished_seqs[i, j, prompt_len : prompt_len + finished_lens[i, j]].tolist()
            reason = "eos" if tokens and tokens[-1] in eos else "length"
            beams.append(Beam(tokens, float(finished_scores[i, j]), reason))
        results.append(beams)
    return results
