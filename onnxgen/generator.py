"""The decode loop as an object the caller drives, one token per row a step (one or more with guesses):

    g = model.generator(["Hello", "Once upon a time"], max_new_tokens=40, do_sample=True, logprobs=3)
    while not g.done:
        for event in g.step():          # one Event per row still running
            print(event.row, repr(event), event.token_id, event.logprob, event.finish_reason)
    completions = g.completions()       # texts, token ids, log-probabilities, finish reasons
    g.stats                             # this call's timings

Streaming, cancellation (`g.finish(row)`, `g.cancel()`) and token-by-token tools come from owning the
loop. Everything a call needs lives in its generator, so one loaded model serves many threads at once.
Beam search (beam.py) has the same nouns; its steps return no events, since a beam revises its past.
With a guesser (prompt lookup, lookup.py; a draft model, assistant.py), a step runs the pending token and the
guessed ones in one pass and keeps each guess the model chooses itself: the same text in fewer steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from . import logits
from .assistant import Assistant
from .decoding import Rows, Scoring, sample
from .errors import OptionsError
from .guidance import constraint
from .healing import Healed, first_tokens
from .lookup import PromptLookup
from .options import GenerationOptions, is_int
from .runtime import Runtime
from .stopping import StopRules
from .tokenizer import TextStream, Tokenizer
from .unconditional import Unconditional

# completions() before the end: a running row has no finish reason yet (it used to read "length")
STILL_RUNNING = "the generator is still running: step() until done, or cancel() first"
LOWEST_LOGPROB = -9999.0  # vLLM's: what JSON gets for -inf


def for_json(logprobs: list[float], alternatives: list[dict[int, float]]) -> tuple[list[float], list[dict[int, float]]]:
    """Log-probabilities and alternatives as JSON can hold them (the server's replies, the CLI's --json): JSON has no
    -Infinity, the log-probability of an alternative that the filters left out (top_k, top_p, ...), sent as
    LOWEST_LOGPROB."""
    return ([max(lp, LOWEST_LOGPROB) for lp in logprobs],
            [{token: max(lp, LOWEST_LOGPROB) for token, lp in alts.items()} for alts in alternatives])


def check_row(row: int, rows: int) -> int:
    """A caller's row index (finish), checked: one of the generator's rows (-1 is not the last one; numpy's
    integers are taken as Python's)."""
    if not (is_int(row) and 0 <= row < rows):
        raise OptionsError(f"row must be one of this generator's rows, 0 to {rows - 1}, got {row!r}")
    return int(row)


@dataclass
class Stats:
    prompt_tokens: int  # of the call's prompts, each counted once however many rows run it (as OpenAI's usage counts)
    new_tokens: int  # over all returned sequences
    time_to_first_token_s: float  # call start to the first token (the prompt pass)
    decode_tokens_per_s: float  # tokens after the first, per second, over all returned sequences
    total_s: float
    guessed_tokens: int = 0  # prompt lookup's or a draft's: guesses run
    guesses_taken: int = 0  # guesses that were the model's own choice (each saved a step)


@dataclass
class Completion:
    text: str  # generated text only, without the prompt (and without a stop string that ended it)
    token_ids: list[int]  # generated tokens (after a stop string, those wholly before it)
    finish_reason: str  # "eos", "length", "stop" or "cancelled" (see stopping.py)
    prompt_index: int  # which prompt it continues
    logprobs: list[float] | None = None  # per token, its log-probability under the scores it was chosen from
    top_logprobs: list[dict[int, float]] | None = None  # per token, the `logprobs` most likely tokens, best first
    score: float | None = None  # beam search: transformers' sequence score; else the sum of logprobs, when asked
    healed: str = ""  # token_healing: the prompt's end that the first token re-covers (its text starts after it)


class Event(str):
    """What one step added to one row. The string itself is the new text: "" while a character's bytes or a
    possible stop string are held back, so the pieces of a row add up to its completion's text."""

    row: int
    prompt_index: int
    token_id: int
    logprob: float | None
    top_logprobs: dict[int, float] | None
    finish_reason: str | None  # set on the row's last event

    def __new__(cls, text: str, row: int, prompt_index: int, token_id: int, logprob: float | None = None,
                top_logprobs: dict[int, float] | None = None, finish_reason: str | None = None) -> Event:
        event = super().__new__(cls, text)
        event.row, event.prompt_index, event.token_id = row, prompt_index, token_id
        event.logprob, event.top_logprobs, event.finish_reason = logprob, top_logprobs, finish_reason
        return event

    @property
    def text(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Event({self.text!r}, row={self.row}, token_id={self.token_id}, finish_reason={self.finish_reason!r})"


def token_logprobs(scores: np.ndarray, tokens: np.ndarray, top: int) -> tuple[np.ndarray, list[dict[int, float]]]:
    """Each row's chosen token's log-probability under softmax(scores), and its `top` most likely tokens."""
    lp = logits.log_softmax(scores.astype(np.float32, copy=False))
    chosen = lp[np.arange(len(tokens)), tokens]
    best: list[dict[int, float]] = []
    for row in lp:
        ids = np.argpartition(-row, top - 1)[:top] if top else np.empty(0, np.int64)
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best.append({int(i): float(row[i]) for i in ids})
    return chosen, best


class Generator:
    """Greedy decoding and sampling; see the module's docstring."""

    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, prompts: list[list[int]], opts: GenerationOptions, pad_id: int,
                 guesser: PromptLookup | Assistant | None = None, unconditional: Unconditional | None = None,
                 healing: list[Healed | None] | None = None) -> None:
        """`healing` (token_healing, healing.py): per prompt, how it was healed (`prompts` are then the healed ones)."""
        self.start = time.perf_counter()
        self.opts, self.pad_id, self.tokenizer = opts, pad_id, tokenizer
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.rules = StopRules.of(opts, self.start)
        self.rng = np.random.default_rng(opts.seed)
        n = opts.num_return_sequences
        self.rows = Rows(runtime, prompts, pad_id, opts.max_new_tokens, opts.adapter, repeat=n)  # first: it refuses a call too large
        rows = len(prompts) * n
        self.prompt_index = [i for i in range(len(prompts)) for _ in range(n)]  # a row's prompt
        self.healed = [healing[i].tail if healing and healing[i] else "" for i in self.prompt_index]  # per row
        self.scoring = Scoring(opts, constraint(opts, tokenizer), tokenizer, self.rng, runtime.vocab_size, first=first_tokens(healing, n))
        self.generated: list[list[int]] = [[] for _ in range(rows)]
        self.logprobs: list[list[float]] = [[] for _ in range(rows)]
        self.top_logprobs: list[list[dict[int, float]]] = [[] for _ in range(rows)]
        self.finish_reasons: list[str | None] = [None] * rows
        self.texts: list[str | None] = [None] * rows  # each row's whole text, once it has finished
        self.step_ends: list[float] = []  # perf_counter() after each forward
        self.guessed_tokens = self.guesses_taken = 0  # guesses run, and those chosen (Stats)
        self.guesser = guesser
        self.unconditional = unconditional  # classifier-free guidance's twin rows (unconditional.py)
        self._streams = [TextStream(tokenizer, len(tail)) for tail in self.healed]
        self._emitted = [0] * rows  # characters of each row's text already in events

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def finish(self, row: int) -> None:
        """End a row now (finish reason "cancelled"); its completion keeps what it generated."""
        row = check_row(row, len(self.finish_reasons))
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = "cancelled"
            self.texts[row] = self._text(row)
            if self.done:
                self._end()

    def cancel(self) -> None:
        for row in range(len(self.generated)):
            self.finish(row)

    def step(self) -> list[Event]:
        """Run the model once and add one token to every running row (with guesses, one or more to the call's
        one row); returns their events, in order."""
        if self.done:
            return []
        guessed = self._guesses()
        if not guessed:  # with a guesser too: none before the first token, or none found
            return self.take(self.rows.forward())
        scores = self.rows.forward_guessed(guessed)  # after the pending token, then after each guess
        self.step_ends.append(time.perf_counter())
        self.guessed_tokens += len(guessed)
        events: list[Event] = []
        for taken, raw in enumerate(scores):
            events += self._choose(raw[None])
            if self.done or taken == len(guessed) or self.generated[0][-1] != guessed[taken]:
                break
        # Kept: the pending token's position and the guesses chosen; the last token chosen is the new pending one.
        self.guesses_taken += taken
        self.rows.take_back(len(guessed) - taken)
        if self.guesser is not None and not self.done:  # done, the guesser has let its cache go
            self.guesser.taken(taken)
        return events

    def _guesses(self) -> list[int]:
        """This step's guesses: none before the first token (the prompt pass makes it), and none past
        max_new_tokens (the step's own token comes on top)."""
        if self.guesser is None or self.rows.pending is None:
            return []
        most = self.opts.max_new_tokens - len(self.generated[0]) - 1
        return self.guesser.guesses(self.rows.history(0), most) if most > 0 else []

    def _end(self) -> None:
        """Every row has finished: the caches go back to their runtimes."""
        self.rows.release()
        if self.guesser is not None:
            self.guesser.release()
        if self.unconditional is not None:
            self.unconditional.release()

    def take(self, raw: np.ndarray) -> list[Event]:
        """A step after its forward: choose each row's token from `raw`, the scores the forward gave (rows,
        vocab). step() runs the forward itself; a batcher runs one for the rows of several generators. With
        classifier-free guidance, the unconditional rows' forward runs here, the call's own."""
        if self.unconditional is not None:
            raw = self.unconditional(raw)
        self.step_ends.append(time.perf_counter())
        return self._choose(raw)

    def _choose(self, raw: np.ndarray) -> list[Event]:
        scores = self.scoring(raw, self.rows, self.rows.steps)
        tokens = sample(scores, self.rng) if self.opts.do_sample else scores.argmax(axis=-1)
        return self._record(tokens, scores)

    def _record(self, tokens: np.ndarray, scores: np.ndarray) -> list[Event]:
        """Each running row's new token (`tokens`, chosen from `scores`): its log-probability, the rules that end a row,
        the rows advanced, the events."""
        chosen, best = token_logprobs(scores, tokens, self.opts.logprobs) if self.opts.logprobs is not None else (None, None)
        running = [row for row, reason in enumerate(self.finish_reasons) if reason is None]
        reasons: dict[int, str | None] = {}
        for row in running:
            token = int(tokens[row])
            self.generated[row].append(token)
            if chosen is not None and best is not None:
                self.logprobs[row].append(float(chosen[row]))
                self.top_logprobs[row].append(best[row])
            reasons[row] = self.rules.after_token(token, len(self.generated[row]))
        if len(reasons) < len(tokens):  # finished rows run on with padding
            tokens[[row for row in range(len(tokens)) if row not in reasons]] = self.pad_id
        self._advance(tokens)
        if self.rules.criteria:  # the caller's criteria see every row's tokens, the new one included
            for row in np.flatnonzero(self.rules.criteria_met(self._input_ids(), scores)).tolist():
                if row in reasons and reasons[row] is None:
                    reasons[row] = "stop"
        if self.rules.stop_strings:
            for row, reason in reasons.items():
                if reason is None and self.rules.completes_stop_string(self._history(row), self.tokenizer.spell):
                    reasons[row] = "stop"
        events = [self._event(row, reason) for row, reason in reasons.items()]
        if self.done:
            self._end()
        return events

    def _advance(self, tokens: np.ndarray) -> None:
        """The rows take their new tokens (contrastive.py's rows hold them already)."""
        self.rows.advance(tokens)
        if self.unconditional is not None:
            self.unconditional.advance(tokens)

    def _input_ids(self) -> np.ndarray:
        """Every row's tokens so far, left-padded, as stopping criteria see them."""
        return self.rows.input_ids

    def _history(self, row: int) -> list[int]:
        """A row's tokens so far: its prompt's, then its new ones."""
        return self.rows.history(row)

    def _event(self, row: int, reason: str | None) -> Event:
        stream, emitted = self._streams[row], self._emitted[row]
        stream.push(self.generated[row][-1])  # eos decodes to nothing
        text = stream.text
        # Text before `emitted` was checked last step with `hold` characters after it.
        cut = self.rules.first_stop(text, emitted) if self.rules.stop else None
        token, logprob = self.generated[row][-1], self.logprobs[row][-1] if self.logprobs[row] else None
        top = self.top_logprobs[row][-1] if self.top_logprobs[row] else None
        if cut is not None:
            reason, text = "stop", text[:cut]
            keep = tokens_before(self.tokenizer, self.generated[row], cut, len(self.healed[row]))
            del self.generated[row][keep:], self.logprobs[row][keep:], self.top_logprobs[row][keep:]
        if reason is None:
            safe = max(emitted, len(text) - self.rules.hold)
            self._emitted[row] = safe
            return Event(text[emitted:safe], row, self.prompt_index[row], token, logprob, top)
        if cut is None:
            text = self._text(row)  # flush bytes held back
        self.finish_reasons[row], self.texts[row] = reason, text
        return Event(text[emitted:], row, self.prompt_index[row], token, logprob, top, reason)

    def completions(self) -> list[Completion]:
        """One per row, in row order: prompt by prompt, each prompt's return sequences together."""
        if not self.done:
            raise OptionsError(STILL_RUNNING)
        asked = self.opts.logprobs is not None
        return [Completion(self.texts[row] if self.texts[row] is not None else self._text(row), list(ids),
                           self.finish_reasons[row] or "length", self.prompt_index[row],
                           list(self.logprobs[row]) if asked else None, list(self.top_logprobs[row]) if asked else None,
                           float(sum(self.logprobs[row])) if asked else None, self.healed[row])
                for row, ids in enumerate(self.generated)]

    def _text(self, row: int) -> str:
        """A row's whole text: its tokens' after the prompt's end they re-cover (token healing)."""
        return self.tokenizer.decode(self.generated[row], after=len(self.healed[row]))

    @property
    def stats(self) -> Stats:
        stats = call_stats(self.start, self.step_ends, self.prompt_tokens, [len(ids) for ids in self.generated])
        return replace(stats, guessed_tokens=self.guessed_tokens, guesses_taken=self.guesses_taken)


def tokens_before(tokenizer: Tokenizer, ids: list[int], cut: int, after: int = 0) -> int:
    """After a stop string, the text ending at character `cut`: how many of the first tokens lie wholly before it
    (the text starting at character `after` of theirs: token healing)."""
    keep = len(ids)
    while keep and len(tokenizer.decode(ids[:keep], after=after)) > cut:
        keep -= 1
    return keep


def call_stats(start: float, step_ends: list[float], prompt_tokens: int, lengths: list[int]) -> Stats:
    """A call's timings; the first token of every sequence comes from the prompt pass."""
    now = time.perf_counter()
    first = step_ends[0] if step_ends else now
    decode_s = step_ends[-1] - first if step_ends else 0.0
    tps = (sum(lengths) - len(lengths)) / decode_s if decode_s > 0 else 0.0
    return Stats(prompt_tokens, sum(lengths), first - start, tps, now - start)
