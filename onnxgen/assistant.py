"""Assisted generation's guesses (transformers' `assistant_model`): a smaller model that shares the tokenizer
drafts the next tokens greedily, and the model keeps each one it would have chosen itself (generator.py), so
the text is the one plain decoding gives. It pays where the draft agrees with the model often and costs much
less a step: distilgpt2 or gpt2 drafting for gpt2-large, or the same model's int4 folder drafting for its fp32
or int8 one (the text is then fp32's, at a speed nearer int4's).

The draft keeps a cache of its own (in place) for the call: each step it first runs the tokens it has not
seen (the model's latest token, and a draft that was taken whole), then drafts up to `count` tokens, stopping
early after a token it gives less than `threshold` probability (transformers' assistant_confidence_threshold).
Afterwards its cache is set back to the drafts that were taken. Where drafts keep failing (a draft that never
agrees: gpt2-large int8 at 0.54x its plain speed with gpt2 int8's random weights drafting 4 tokens a step), the
draft rests as prompt lookup does (lookup.Backoff), and catches up with the text when it drafts again.
"""

from __future__ import annotations

import numpy as np

from .cache import InPlaceCache
from .lookup import Backoff
from .runtime import Runtime


class Assistant:
    """A call's guesser (Generator's): a draft model's greedy tokens."""

    def __init__(self, draft: Runtime, prompt: list[int], capacity: int, count: int, threshold: float) -> None:
        # A draft loaded with a prompt cache resumes from a call before (a chat's turns), as the model does.
        resumed = draft.resume(prompt, capacity)
        cache = resumed[0] if resumed is not None else draft.new_cache(1, capacity)
        assert isinstance(cache, InPlaceCache), "Model.generator refuses a draft folder with a growing cache"
        self.draft, self.cache, self.count, self.threshold = draft, cache, count, threshold
        self._text: list[int] = []  # the call's text (the generator's own list, as it grows): what the cache holds
        self._drafted = 0  # tokens drafted this step
        self._seen = 0  # positions of the text the draft's cache held before drafting
        self.backoff = Backoff()
        self._released = False

    def guesses(self, history: list[int], most: int) -> list[int]:
        """This step's drafts, at most `most` of them."""
        if not self.backoff.ready():
            return []
        scores = self.cache.append(history[int(self.cache.lengths[0]) :])[-1]
        self._seen, self._text = len(history), history
        drafted: list[int] = []
        while True:
            token = int(scores.argmax())
            drafted.append(token)
            confidence = 1.0 / float(np.exp(scores - scores[token]).sum())  # softmax at the token, without overflow
            if len(drafted) == min(self.count, most) or confidence < self.threshold:
                break
            scores = self.cache.decode(np.array([token]))[0]
        self._drafted = len(drafted)
        return drafted

    def taken(self, taken: int) -> None:
        """Keep the draft's positions of the drafts that were taken (all but the last were written)."""
        self.cache.lengths[0] = self._seen + min(taken, self._drafted - 1)
        self.backoff.record(taken)

    def release(self) -> None:
        """The call is over: the draft's cache goes back to its runtime (with CUDA graphs, for a later call)."""
        if not self._released:
            self._released = True
            self.draft.release(self.cache, self._text[: int(self.cache.lengths[0])])

    def __del__(self) -> None:  # a call its caller let go of mid-way hands the draft's cache back too (as Rows does)
        if not getattr(self, "_released", True):  # not if __init__ failed before there was a cache
            self.release()
