"""The folder's tokenizer.json through the `tokenizers` library, and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from .errors import ModelFolderError


class Tokenizer:
    def __init__(self, path: Path) -> None:
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
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class TextStream:
    """Turns tokens into text as they arrive. A character whose UTF-8 bytes span several byte-level
    tokens is held back until it is complete, so no piece ever carries a replacement character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # first token not yet fully emitted
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        pending = self._tokenizer.decode(self._ids[self._start :])
        if pending.endswith("\ufffd"):
            return ""
        self._start = len(self._ids)
        self.text += pending
        return pending
