"""Text held to a JSON schema, a regular expression or a Lark grammar (constrained decoding).

llguidance, the library that onnxruntime-genai, vLLM and llama.cpp use for this, reads the constraint and says
before every token which tokens of the vocabulary keep the text a valid start; the others are banned (-inf) after
every other processor, so nothing after it can bring one back. Once the text is complete only the end token is
left, and the row ends there (finish reason "eos"; "stop" over HTTP). An optional dependency: the `guidance` extra.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import OptionsError

if TYPE_CHECKING:  # options.py imports this module, and logits.py imports options.py
    from .logits import History
    from .options import GenerationOptions
    from .tokenizer import Tokenizer

CONSTRAINTS = ("json_schema", "regex", "grammar")  # the options that name one, at most one a call
# Compact JSON: a schema leaves whitespace free between tokens by default, and a weak model given that freedom can
# spend every new token on it. A schema's own "x-guidance" ({"whitespace_flexible": true}) takes it back.
JSON_DEFAULTS = {"whitespace_flexible": False}
NOT_JSON = "json_schema must be a JSON object (a dict, or its JSON text)"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise OptionsError("json_schema, regex and grammar need llguidance: pip install 'onnxgen[guidance]'") from None
    return llguidance


def grammar(json_schema: dict[str, Any] | str | None, regex: str | None, lark: str | None) -> str:
    """llguidance's grammar for the one constraint given, checked: an OptionsError says what is wrong with it."""
    _llguidance()  # installed: said at once, whatever is kept below
    if json_schema is None:
        return _checked("regex", regex) if regex is not None else _checked("grammar", lark)  # type: ignore[arg-type]
    try:
        source = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    except (TypeError, ValueError) as e:
        raise OptionsError(f"{NOT_JSON}: {e}") from None
    return _checked("json_schema", source)


@functools.lru_cache(maxsize=64)
def _checked(name: str, source: str) -> str:
    """The grammar of one constraint's text, kept for the last 64: a call checks its options, then builds its rows'
    matchers from the same text (and a server sees the same schema request after request)."""
    matcher = _llguidance().LLMatcher
    if name == "json_schema":
        try:
            text = matcher.grammar_from_json_schema(source, defaults=JSON_DEFAULTS)
        except ValueError as e:  # llguidance's JSON parser
            raise OptionsError(f"{NOT_JSON}: {e}") from None
    else:
        text = matcher.grammar_from_regex(source) if name == "regex" else matcher.grammar_from_lark(source)
    problem = matcher.validate_grammar(text)
    if problem:
        raise OptionsError(f"{name} is not usable: {problem.strip().splitlines()[0]}")
    return text


# llguidance's view of a model's tokenizer.json (0.4 s and 38 MiB for GPT-2's): built at the model's first constrained
# call and kept as long as the model is (weakly keyed by its Tokenizer), one per vocabulary size and end tokens.
_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, tuple[int, ...]], Any]] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def _tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_ids: list[int]) -> Any:
    with _tokenizers_lock:
        built = _tokenizers.setdefault(tokenizer, {})
        key = (vocab_size, tuple(eos_ids))
        if key not in built:
            built[key] = _llguidance().LLTokenizer(str(tokenizer.path), n_vocab=vocab_size, eos_token=eos_ids)
        return built[key]


class Constraint:
    """A call's rows held to one grammar. A processor: (scores, history, new-token count) -> scores.

    llguidance's matcher of a text, fed each chosen token, says which tokens may come next. Matchers are kept by the
    tokens each row has generated: a row's next state is its parent's (its tokens but the last) fed the last one,
    which holds when rows are reordered (beam search picks each new beam from any beam before) and when two rows
    share tokens. A parent with several children is copied for all but the last of them."""

    def __init__(self, grammar_text: str, tokenizer: Tokenizer, eos_ids: list[int]) -> None:
        self._grammar, self._tokenizer, self._eos = grammar_text, tokenizer, eos_ids
        # The matcher of each row's generated tokens at the last step; None for a row past its end (padding follows,
        # which the grammar may not take: left alone) or one whose token the grammar did not allow (a beam searched
        # to fill its candidates: it ranks below every allowed one).
        self._states: dict[tuple[int, ...], Any] = {}

    def __call__(self, scores: np.ndarray, history: History, generated: int) -> np.ndarray:
        texts = [tuple(history[row][len(history[row]) - generated :]) if generated else () for row in range(len(scores))]
        if not generated:  # the first step: the scores say the model's vocabulary size
            tokenizer = _tokenizer(self._tokenizer, scores.shape[1], self._eos)
            states = {(): _llguidance().LLMatcher(tokenizer, self._grammar, log_level=0)}
        else:
            children = Counter(text[:-1] for text in set(texts))
            states = {}
            for text in dict.fromkeys(texts):  # each text once, in row order
                parent, children[text[:-1]] = self._states[text[:-1]], children[text[:-1]] - 1
                matcher = parent if parent is None or not children[text[:-1]] else parent.deep_copy()
                if matcher is not None and (text[-1] in self._eos or not matcher.consume_token(text[-1])):
                    matcher = None  # an end token: complete (only it was left), or a token the grammar did not allow
                states[text] = matcher
        self._states = states
        scores = scores.copy()
        for row, text in enumerate(texts):
            if states[text] is None:
                continue
            allowed = np.unpackbits(np.frombuffer(states[text].compute_bitmask(), np.uint8), bitorder="little")[: scores.shape[1]]
            scores[row, allowed == 0] = -np.inf
            if np.isneginf(scores[row]).all():
                raise OptionsError(f"the constraint and the other options leave row {row} no token to choose "
                                   "(min_new_tokens banning the end of a complete text?)")
        return scores


def constraint(opts: GenerationOptions, tokenizer: Tokenizer) -> Constraint | None:
    """The call's constraint, if its options name one."""
    if opts.json_schema is None and opts.regex is None and opts.grammar is None:
        return None
    return Constraint(grammar(opts.json_schema, opts.regex, opts.grammar), tokenizer, opts.eos_ids)
