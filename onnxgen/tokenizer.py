"""The folder's tokenizer.json through the `tokenizers` library, and incremental detokenization."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _Tokenizer

from .errors import ModelFolderError, OptionsError, shown


# transformers' clean_up_tokenization, in its order. A checkpoint's tokenizer_config.json can ask for it
# (clean_up_tokenization_spaces: true, the default before transformers 4.45), and transformers' decoded text then
# drops the space before these: text written "Hello , world ." (WikiText's style) comes out "Hello, world.".
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"),
            (" 've", "'ve"), (" 're", "'re"))


# What those patterns are made of. No pattern can hold a character outside these, at any stage of the chain (a
# replacement only deletes a space), so the text up to such a character cleans up the same whatever follows it.
PATTERN_CHARACTERS = frozenset("".join(old for old, _ in CLEAN_UP))


def clean_up(text: str) -> str:
    for old, new in CLEAN_UP:
        text = text.replace(old, new)
    return text


class Tokenizer:
    def __init__(self, path: Path, clean_up_spaces: bool = False) -> None:
        """`clean_up_spaces`: decode as transformers does with clean_up_tokenization_spaces (the folder's manifest says)."""
        self.clean_up_spaces, self.path = clean_up_spaces, path
        self._spelled: dict[int, str] = {}  # spell's answers
        if not path.is_file():
            raise ModelFolderError(f"no tokenizer.json in {path.parent}")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
            raise ModelFolderError(f"{path} is not a usable tokenizer: {str(e).splitlines()[0]}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise OptionsError(f"text to encode must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], clean: bool = True, after: int = 0) -> str:
        """The text of `ids`, cleaned up where the folder asks (`clean=False`: as the tokens spell it), from character
        `after` of their spelling on (token healing: what lies before is the prompt's). An id past the vocabulary
        spells nothing, as in the tokenizers library."""
        try:
            text = self._tok.decode(ids, skip_special_tokens=True)[after:]
        except (TypeError, OverflowError):  # checked here only when it fails: a stream decodes at every token
            raise OptionsError(f"ids to decode must be a list of non-negative integer token ids, got {shown(ids)}") from None
        return clean_up(text) if clean and self.clean_up_spaces else text

    def spell(self, token_id: int) -> str:
        """One token's text alone, as transformers' stop strings read it: special tokens as written, no clean-up
        (kept for the model's life: stop strings read the last few tokens of every row at every step)."""
        spelled = self._spelled.get(token_id)
        if spelled is None:
            spelled = self._spelled[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return spelled

    def token_to_id(self, token: str) -> int | None:
        """The id of a token as the vocabulary spells it ("Ġthe": GPT-2 writes a leading space as Ġ), or None."""
        if not isinstance(token, str):
            raise OptionsError(f"token must be a string (as the vocabulary spells it), got {type(token).__name__}")
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """A token as the vocabulary writes it (token_to_id's reverse), or None."""
        return self._tok.id_to_token(token_id)

    def vocabulary(self) -> dict[str, int]:
        """Every token as the vocabulary writes it, with its id; special tokens left out."""
        special = {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}
        return {token: i for token, i in self._tok.get_vocab(with_added_tokens=True).items() if i not in special}

    @functools.lru_cache(maxsize=8)  # noqa: B019  (a model's tokenizer lives as long as the model; a few breaker sets)
    def holding(self, texts: tuple[str, ...]) -> np.ndarray:
        """A mask over the vocabulary: the tokens whose text holds one of `texts` (DRY's sequence breakers: logits.dry)."""
        spelled = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return np.array([any(t in token for t in texts) for token in spelled], dtype=bool)


class TextStream:
    """Turns tokens into text as they arrive. A character whose UTF-8 bytes span several byte-level
    tokens is held back until it is complete, so no piece ever carries a replacement character. With the
    clean-up, so is the text after the last character that no pattern holds (" n" waits for "'t" or another
    word), so that the pieces add up to the whole text's clean-up."""

    def __init__(self, tokenizer: Tokenizer, after: int = 0) -> None:
        """`after`: the first characters the tokens spell are not the text's (token healing: the prompt's end)."""
        self._tokenizer = tokenizer
        self._after = after
        self._ids: list[int] = []
        self._start = 0  # first token not yet fully emitted
        self._unsettled = ""  # with the clean-up: complete characters after the last that no pattern holds
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        pending = self._tokenizer.decode(self._ids[self._start :], clean=False)
        if pending.endswith("\ufffd"):
            return ""
        self._start = len(self._ids)
        dropped = min(self._after, len(pending))
        pending, self._after = pending[dropped:], self._after - dropped
        if self._tokenizer.clean_up_spaces:
            # Text up to a character that no pattern holds cleans up alone: the pieces add up to the whole's clean-up.
            spelled = self._unsettled + pending
            settled = len(spelled)
            while settled and spelled[settled - 1] in PATTERN_CHARACTERS:
                settled -= 1
            pending, self._unsettled = clean_up(spelled[:settled]), spelled[settled:]
        self.text += pending
        return pending
