"""Token healing (GenerationConfig's `token_healing`): a prompt that ends inside what would be one token.

A byte-level BPE splits text at its prompt's end as it never does in running text: "The capital of France is "
ends with a lone space token (" " then "Paris", where the model has only seen " Paris"), "http:" with ":" (where
it has seen "://"). The model, continuing from an end it has rarely seen, writes worse text. Healing takes the
prompt's last token back and lets the model choose the first new token among those whose text begins with it
(the token taken back included), so that the text goes on as one tokenized whole would.

The call's text still continues the prompt as given: it starts after the characters the first token re-covers
(prompt + text is the whole). A prompt is left as it is where it is one token, where its last token is a special
one or no other token extends it, or where that token alone is not whole characters (part of a character's UTF-8
bytes).

transformers' generate(token_healing=True) runs a one-token generate with a bias of +10 on the extensions, after
stripping the prompt's surrounding spaces (so a trailing space is dropped, not healed); here the extensions are
a hard constraint, and the prompt is taken as it is.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np

from .tokenizer import Tokenizer

LAST = "\U0010ffff"  # sorts after every character: the end of a prefix's range among sorted strings


@dataclass(frozen=True)
class Healed:
    """One prompt, healed: the prompt without its last token, the text that token spelled (the new text's first
    characters re-cover it), and the tokens the first new token may be (its extensions)."""

    prompt: list[int]
    tail: str
    extensions: np.ndarray


@functools.lru_cache(maxsize=4)
def _spellings(tokenizer: Tokenizer) -> tuple[list[str], np.ndarray]:
    """The vocabulary's tokens as it writes them ("Ġthe": a byte-level BPE's own characters, whose prefixes are the
    bytes' prefixes), sorted, with their ids; special tokens left out (no text continues into "<|endoftext|>")."""
    ordered = sorted(tokenizer.vocabulary().items())
    return [token for token, _ in ordered], np.array([i for _, i in ordered], dtype=np.int64)


def first_tokens(healing: list[Healed | None] | None, repeat: int) -> list[np.ndarray | None] | None:
    """Scoring's `first`, per row: the extensions of each prompt's healed token, for its `repeat` neighbouring rows
    (return sequences, beams, contrastive search's candidates); None where no prompt was healed."""
    return [h.extensions if h else None for h in healing for _ in range(repeat)] if healing else None


def heal(tokenizer: Tokenizer, prompt: list[int]) -> Healed | None:
    """The prompt healed, or None where it is left as it is (see the module's docstring)."""
    written = tokenizer.id_to_token(prompt[-1]) if len(prompt) > 1 else None
    if written is None:
        return None
    spellings, ids = _spellings(tokenizer)
    first, end = bisect.bisect_left(spellings, written), bisect.bisect_left(spellings, written + LAST)
    tail = tokenizer.decode(prompt[-1:], clean=False)
    if first == end or ids[first] != prompt[-1] or not tail or "\ufffd" in tail:  # a special token, or part of a character
        return None
    if end - first == 1:  # no token extends it: nothing to heal
        return None
    return Healed(prompt[:-1], tail, np.sort(ids[first:end]))
