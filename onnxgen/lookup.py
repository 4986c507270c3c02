"""Prompt lookup decoding's guesses: what came after the text's last few tokens where they occurred before.

A step then runs the pending token and the guesses in one pass (about the cost of one token on a CPU, whose
decode step is bound by reading the weights) and keeps each guess the model would have chosen itself, so
that the text is the one plain decoding gives (generator.py). It pays where the output repeats its input.
Saxena's prompt-lookup-decoding, as transformers' PromptLookupCandidateGenerator finds it: the longest
n-gram first, its first occurrence, cut before an end token. Where guesses keep failing, a pass of several
positions costs more than the step it replaces (gpt2 int4 at 2.4 steps for 6 positions): `Backoff` stops
guessing for a while, longer after each failure in a row.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def guesses(history: list[int], count: int, ngram_size: int, eos_ids: Collection[int]) -> list[int]:
    """Up to `count` tokens that followed the first earlier occurrence of `history`'s last n tokens, for the
    largest n <= ngram_size that occurred before; cut before an end token (a guess past it would never be
    taken); [] where no n-gram did."""
    ids = np.asarray(history, dtype=np.int64)
    for n in range(min(ngram_size, len(ids) - 1), 0, -1):
        # Windows that end before the last token: each has at least one token after it.
        hits = np.flatnonzero((sliding_window_view(ids[:-1], n) == ids[-n:]).all(axis=1))
        if hits.size:
            found = ids[hits[0] + n : hits[0] + n + count].tolist()
            ends = [i for i, token in enumerate(found) if token in eos_ids]
            return found[: ends[0]] if ends else found
    return []


MAX_WAIT = 16  # steps: where the text starts repeating its input after a long stretch, guesses resume within this


@dataclass
class Backoff:
    """After a step whose guesses all failed: no guesses for the next 1 step, then 2, 4, ... MAX_WAIT after
    failures in a row; back to guessing at every step once a guess is taken. The text is the same either way."""

    wait: int = 0  # steps left without guesses
    next_wait: int = 1  # after the next failure

    def ready(self) -> bool:
        """Whether this step guesses (a step without counts down the wait)."""
        if self.wait:
            self.wait -= 1
            return False
        return True

    def record(self, taken: int) -> None:
        if taken:
            self.next_wait = 1
        else:
            self.wait, self.next_wait = self.next_wait, min(2 * self.next_wait, MAX_WAIT)


class PromptLookup:
    """A call's guesser (Generator's): guesses from its own text, pausing where they fail."""

    def __init__(self, count: int, ngram_size: int, eos_ids: Collection[int]) -> None:
        self.count, self.ngram_size, self.eos_ids, self.backoff = count, ngram_size, eos_ids, Backoff()

    def guesses(self, history: list[int], most: int) -> list[int]:
        """This step's guesses, at most `most` of them."""
        return guesses(history, min(self.count, most), self.ngram_size, self.eos_ids) if self.backoff.ready() else []

    def taken(self, taken: int) -> None:
        self.backoff.record(taken)

    def release(self) -> None:
        pass
