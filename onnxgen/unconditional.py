"""Classifier-free guidance (options' guidance_scale): the unconditional branch a call runs beside its rows.

Each row has a twin that starts from the negative prompt (or the row's prompt's last token, transformers' default)
and then takes every token the row takes. A step runs the twins too, and the row's log-probabilities become
    unconditional + guidance_scale x (conditional - unconditional)
before any other processor, as transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor computes them. The twins
are rows of their own cache (decoding.py's Rows), with the call's adapter; a batcher's shared step leaves them to
the call, which runs them when it takes its rows' scores.
"""

from __future__ import annotations

import numpy as np

from . import logits
from .decoding import Rows
from .runtime import Runtime


class Unconditional:
    def __init__(self, runtime: Runtime, prompts: list[list[int]], pad_id: int, max_new_tokens: int, scale: float,
                 adapter: str | None = None, repeat: int = 1) -> None:
        self.rows = Rows(runtime, prompts, pad_id, max_new_tokens, adapter, repeat)
        self.scale = np.float32(scale)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """The guided log-probabilities of a step whose conditional scores are `raw` (rows, vocab)."""
        conditional = logits.log_softmax(raw)
        unconditional = logits.log_softmax(self.rows.forward())
        return self.scale * (conditional - unconditional) + unconditional

    def advance(self, tokens: np.ndarray) -> None:
        """Each twin takes its row's token (finished rows' padding too, as their rows do)."""
        self.rows.advance(tokens)

    def release(self) -> None:
        self.rows.release()
