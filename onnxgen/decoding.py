"""Greedy and sampled decoding as a step loop: each `step()` adds one token to every row.

The caller drives the loop, which is what makes streaming and cancellation free: it can read each
new token as it comes, and stop a row (`finish`) or the whole loop whenever it likes.
"""

from __future__ import annotations

import numpy as np

from . import logits
from .options import GenerationOptions
from .runtime import Runtime


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask and position ids of a left-padded batch.

    Position ids count real tokens only, so a padded prompt sees the same positions as it would alone."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(scores), by inverse CDF over the row's finite scores."""
    tokens = np.empty(scores.shape[0], dtype=np.int64)
    for row, u in enumerate(rng.random(scores.shape[0])):
        live = np.flatnonzero(scores[row] > -np.inf)  # after top-k or top-p, a few tokens out of the vocabulary
        finite = scores[row, live]
        # Unnormalised weights: float32 exp is 4x cheaper than float64's and a draw needs no more; the
        # float64 running sum keeps every token's share exact to float32's precision over 50,257 tokens.
        cdf = np.cumsum(np.exp(finite - finite.max()), dtype=np.float64)
        tokens[row] = live[min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(live) - 1)]
    return tokens


class Generator:
    def __init__(self, runtime: Runtime, prompts: list[list[int]], opts: GenerationOptions, pad_id: int) -> None:
        self.runtime, self.opts, self.pad_id = runtime, opts, pad_id
        self.filters = logits.filters_for(opts)
        self.rng = np.random.default_rng(opts.seed)
        self.eos = np.asarray(opts.eos_ids, dtype=np.int64)
        self.prompts = prompts
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self._ids, self._mask, self._positions = left_pad(prompts, pad_id)
        self._cache = runtime.empty_cache(len(prompts))

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def finish(self, row: int, reason: str) -> None:
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    def step(self) -> np.ndarray:
        """Run the model once, pick one token per row, and return them (pad for rows already finished)."""
        scores, self._cache = self.runtime.forward(self._ids, self._mask, self._positions, self._cache)
        history = [p + g for p, g in zip(self.prompts, self.generated)] if self.filters else []
        scores = logits.apply(self.filters, scores, history, len(self.generated[0]))
        tokens = sample(scores, self.rng) if self.opts.do_sample else scores.argmax(axis=-1)
        for row, token in enumerate(tokens.tolist()):
            if self.finish_reasons[row] is not None:
                tokens[row] = self.pad_id
                continue
            self.generated[row].append(token)
            if token in self.eos:
                self.finish(row, "eos")
            elif len(self.generated[row]) >= self.opts.max_new_tokens:
                self.finish(row, "length")
        self._ids = tokens.reshape(-1, 1).astype(np.int64)
        self._mask = np.concatenate([self._mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        self._positions = self._positions[:, -1:] + 1
        return tokens
