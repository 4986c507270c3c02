"""Every rule that ends a row, in one place: the end-of-sequence token, the length limit, the time limit,
stop strings and the caller's own stopping criteria (transformers' calling convention, on numpy arrays).

A row's finish reason says which rule ended it: "eos", "length", "time" (max_time), "stop" (a stop string or
a criterion of the caller's) or "cancelled" (the caller's `finish`/`cancel`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import OptionsError
from .options import GenerationOptions, returned

# (input_ids (rows, length), scores (rows, vocab)) -> one bool per row, or one bool for all rows
StoppingCriterion = Callable[[np.ndarray, np.ndarray], "np.ndarray | bool"]


@dataclass(frozen=True)
class StopRules:
    eos: frozenset[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    criteria: tuple[StoppingCriterion, ...]
    deadline: float | None  # time.perf_counter() past which rows end (max_time after the call's start)
    include_stop: bool = False  # the text ends after the stop string that ended it, not before (vLLM's include_stop_str_in_output)
    stop_strings: tuple[str, ...] = ()  # transformers': the token that completes one ends its row (completes_stop_string)

    @classmethod
    def of(cls, opts: GenerationOptions, start: float) -> StopRules:
        deadline = None if opts.max_time is None else start + opts.max_time
        return cls(frozenset(opts.eos_ids), opts.max_new_tokens, tuple(opts.stop), tuple(opts.stopping_criteria), deadline,
                   opts.include_stop_str_in_output, tuple(opts.stop_strings))

    def after_token(self, token: int, generated: int) -> str | None:
        """The reason a row ends with `token`, its `generated`-th new token, if it does."""
        if token in self.eos:
            return "eos"
        if generated >= self.max_new_tokens:
            return "length"
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return "time"
        return None

    def criteria_met(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Rows that one of the caller's criteria ends, given every row's tokens so far (the new one included)."""
        met = np.zeros(len(input_ids), dtype=bool)
        for i, criterion in enumerate(self.criteria):
            result = criterion(input_ids, scores)
            verdict = np.asarray(result)
            if verdict.dtype != np.bool_ or verdict.shape not in ((), met.shape):
                raise OptionsError(f"stopping_criteria[{i}] returned {returned(result)}: expected a bool, or one per row ({len(met)})")
            met |= verdict
        return met

    def completes_stop_string(self, tokens: list[int], spelled: Callable[[int], str]) -> bool:
        """transformers' StopStringCriteria: whether the last of a row's tokens (its prompt's, then its new ones; `spelled`:
        a token's text alone) completes a stop string, one that the tokens' texts hold and that ends past where the
        last token begins; that token may run on past it, and the string may begin in earlier tokens. The row's
        text keeps the whole token (onnxgen's `stop` cuts the text instead)."""
        longest = max(len(s) for s in self.stop_strings)
        last = spelled(tokens[-1])
        tail = "".join(spelled(t) for t in tokens[-longest - 1 : -1]) + last  # each token spells a character at least
        begins = len(tail) - len(last)
        return any((at := tail.rfind(s)) >= 0 and at + len(s) > begins for s in self.stop_strings)

    @property
    def hold(self) -> int:
        """Characters to hold back from a stream: the tail that could still become a stop string."""
        return max((len(s) for s in self.stop), default=1) - 1

    def first_stop(self, text: str, start: int = 0) -> int | None:
        """Where the text ends at the first stop string in it, looking from `start`: where the stop string begins, or
        with include_stop, where it ends (of those that begin first, the shortest)."""
        found = [(i, len(s)) for s in self.stop if (i := text.find(s, start)) >= 0]
        if not found:
            return None
        begin, length = min(found)
        return begin + length if self.include_stop else begin
