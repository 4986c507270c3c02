"""The rows being decoded and what one step does to them, shared by sampling/greedy and beam search.

`Rows` holds each row's tokens (its left-padded prompt, then what was generated), the attention mask,
positions and key/value cache. A step is `scores = rows.forward()`, a choice of one token per row, then
`rows.advance(tokens)`; beam search also says which row each new row continues (`source`).
"""

from __future__ import annotations

import numpy as np

from . import logits
from .options import GenerationOptions
from .runtime import Cache, Runtime


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


class Rows:
    def __init__(self, runtime: Runtime, prompts: list[list[int]], pad_id: int, max_new_tokens: int) -> None:
        self.runtime = runtime
        self._prompts, self.mask, positions = left_pad(prompts, pad_id)
        self._new = np.full((len(prompts), max_new_tokens), pad_id, dtype=np.int64)  # a column a step
        self.steps = 0  # tokens appended to every row
        self._tokens = [list(p) for p in prompts]  # the same without padding, as lists: what processors read
        self._pending = (self._prompts, positions)  # what the next forward runs: the prompts, then one token a row
        self._cache: Cache = runtime.empty_cache(len(prompts))
        self._reorder_buffers: list[np.ndarray] = []  # kept across steps (see Runtime.reorder)

    def forward(self) -> np.ndarray:
        """Run the pending tokens; the last position's scores, (rows, vocab) float32."""
        ids, positions = self._pending
        scores, self._cache = self.runtime.forward(ids, self.mask, positions, self._cache)
        return scores

    def advance(self, tokens: np.ndarray, source: np.ndarray | None = None) -> None:
        """Append one token to every row; with `source`, row i first becomes a copy of row source[i]."""
        positions = self._pending[1][:, -1:] + 1
        if source is not None:
            self._prompts, self._new, self.mask, positions = self._prompts[source], self._new[source], self.mask[source], positions[source]
            self._tokens = [list(self._tokens[s]) for s in source.tolist()]
            self._cache = self.runtime.reorder(self._cache, source, self._reorder_buffers)
        column = tokens.reshape(-1, 1).astype(np.int64)
        self._new[:, self.steps] = column[:, 0]
        self.steps += 1
        for row, token in zip(self._tokens, column[:, 0].tolist()):
            row.append(token)
        self.mask = np.concatenate([self.mask, np.ones_like(column)], axis=1)
        self._pending = (column, positions)

    @property
    def input_ids(self) -> np.ndarray:
        """Every row's tokens so far, left-padded: what transformers hands processors and stopping criteria."""
        return np.concatenate([self._prompts, self._new[:, : self.steps]], axis=1)

    def history(self, row: int) -> list[int]:
        """The row's tokens so far without padding: its prompt, then what was generated (do not modify)."""
        return self._tokens[row]


class Scoring:
    """What turns a step's raw scores into the ones a token is chosen from: the built-in processors,
    then the caller's `logits_processors`, then sampling's warpers (transformers' order)."""

    def __init__(self, opts: GenerationOptions) -> None:
        self.processors, self.warpers = logits.processors_for(opts), logits.warpers_for(opts)
        self.user = opts.logits_processors

    def __call__(self, raw: np.ndarray, rows: Rows, step: int) -> np.ndarray:
        if not (self.processors or self.user or self.warpers):  # greedy's usual case: the raw scores
            return raw
        history = [rows.history(r) for r in range(len(raw))] if self.processors else []
        scores = logits.apply(self.processors, raw, history, step)
        for processor in self.user:
            scores = np.asarray(processor(rows.input_ids, scores), dtype=np.float32)
        return logits.apply(self.warpers, scores, history, step)
