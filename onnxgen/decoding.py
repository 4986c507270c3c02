"""The rows being decoded and what one step does to them, shared by sampling/greedy and beam search.

`Rows` holds each row's tokens (its prompt, then what was generated) and its key/value cache (cache.py). A step is `scores = rows.forward()`, a choice of one token per row, then
`rows.advance(tokens)`; beam search also says which row each new row continues (`source`).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from . import logits
from .cache import Cache, GrowingCache, InPlaceCache, SharedRows, left_pad
from .errors import OptionsError
from .guidance import Constraint
from .options import GenerationOptions, returned
from .runtime import Runtime
from .tokenizer import Tokenizer


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(scores), by inverse CDF over the row's finite scores."""
    tokens = np.empty(scores.shape[0], dtype=np.int64)
    for row, u in enumerate(rng.random(scores.shape[0])):
        live = np.flatnonzero(scores[row] > -np.inf)  # after top-k or top-p, a few tokens out of the vocabulary
        finite = scores[row, live]
        # Unnormalised weights: float32 exp is 4x cheaper than float64's and a draw needs no more; the
        # float64 running sum keeps every token's share exact to float32's precision over 50,257 tokens.
        weights = np.exp(finite - finite.max())
        target = u * float(weights.sum(dtype=np.float64))
        tokens[row] = live[min(logits.leading(weights, partial(np.greater_equal, target)), len(live) - 1)]  # running <= target
    return tokens


def sample_distinct(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n different draws per row from softmax(scores), in the order drawn (beam sampling's, as transformers'
    torch.multinomial without replacement): the n largest of score - log(E), E exponential, which is sampling
    without replacement one draw after another (the Gumbel top-k trick), in one pass over the row. One random number
    per score, so that a step takes as many of the call's random numbers whatever the filters left."""
    # Drawn in float64: numpy's float32 exponentials are coarse near 0, where an unlikely token is drawn early
    # (its second draws were 3 standard errors off over 10^5 rows); the log in float32 is twice as fast.
    with np.errstate(divide="ignore"):  # an exponential of 0: that score's key is +inf, drawn first, as it should be
        keys = scores - np.log(rng.standard_exponential(scores.shape).astype(np.float32))
    drawn = np.empty((len(keys), n), dtype=np.int64)
    for row, row_keys in enumerate(keys):
        # After top-k a few hundred of 4 beams' 201,028 scores are finite: partitioning those alone takes 0.1 ms where
        # the whole row, its -inf ties and all, took 10 (gpt2, 4 beams). Fewer than n left: -inf ones fill the draws.
        live = np.flatnonzero(row_keys > -np.inf)
        if len(live) < n:
            live = np.arange(len(row_keys))
        top = live[np.argpartition(row_keys[live], len(live) - n)[-n:]]
        drawn[row] = top[np.argsort(-row_keys[top], kind="stable")]
    return drawn


class Rows:
    def __init__(self, runtime: Runtime, prompts: list[list[int]], pad_id: int, max_new_tokens: int, adapter: str | None = None,
                 repeat: int = 1, hidden: bool = False) -> None:
        """`repeat` rows for each prompt, next to each other (return sequences, beams, guidance's twins, contrastive
        search's candidates); `hidden`: the forwards keep the hidden states too (prompt_hidden, step_hidden)."""
        self._shape = (len(prompts) * repeat, max(len(p) for p in prompts) + max_new_tokens, pad_id)  # of the cache
        # A call too large is refused now, not at its first step, and before its rows are made (10**12 beams)
        runtime.check_cache(*self._shape[:2])
        self.adapter = runtime.adapter(adapter)  # every row's LoRA adapter, as loaded when the call was made (or None)
        self._tokens = [list(p) for p in prompts for _ in range(repeat)]  # without padding, as lists: what processors read
        self._repeat, self._hidden = repeat, hidden
        self._prompts = left_pad(self._tokens, pad_id)[0]
        self._new = np.full((len(self._tokens), max_new_tokens), pad_id, dtype=np.int64)  # a column a step
        self.steps = 0  # tokens appended to every row
        # Made at the first forward: a batcher runs the rows of several calls in a cache of its own (batcher.py).
        self._cache: Cache | SharedRows | None = None
        self.pending: np.ndarray | None = None  # the tokens the next forward runs (None: the prompts)
        self._runtime: Runtime | None = runtime  # until the cache is released

    def share(self, rows: SharedRows) -> None:
        """Live in rows of a cache that a batcher runs: its forwards write them, and beam search's reorders move
        them where they sit (batcher.py)."""
        self._cache, self._runtime = rows, None

    def release(self) -> None:
        """The call is over: the runtime may hand the cache to a later call (CUDA graphs keep theirs; a prompt
        cache keeps a one-row call's, with the tokens its positions hold)."""
        if self._runtime is not None:
            if isinstance(self._cache, InPlaceCache) and len(self._tokens) == 1:
                self._runtime.release(self._cache, self._tokens[0][: int(self._cache.lengths[0])])
            elif isinstance(self._cache, (InPlaceCache, GrowingCache)):
                self._runtime.release(self._cache)
            self._runtime = None

    def __del__(self) -> None:  # a call its caller let go of mid-way (a dropped generator) hands its cache back too
        if getattr(self, "_runtime", None) is not None:  # not if __init__ failed before there was a cache
            self.release()

    def forward(self) -> np.ndarray:
        """Run the pending tokens; the last position's scores, (rows, vocab) float32."""
        if self._cache is None:
            assert self._runtime is not None, "forward after release"
            resumed = self._runtime.resume(self._tokens[0], self._shape[1], self.adapter) if len(self._tokens) == 1 else None
            if resumed is not None:  # a kept cache holds the prompt's start: its pass writes the rest
                self._cache, start = resumed
                return self._cache.prefill([self._tokens[0][start:]], start=start)
            self._cache = self._runtime.new_cache(*self._shape, adapter=self.adapter)
            if isinstance(self._cache, InPlaceCache):
                self._cache.keep_hidden = self._hidden
        assert not isinstance(self._cache, SharedRows), "a batcher runs the forwards of shared rows"
        if self.pending is None:
            if self._repeat > 1 and isinstance(self._cache, InPlaceCache):  # one pass a prompt, copied to its other rows
                scores = self._cache.prefill(self._tokens[:: self._repeat])
                self._cache.spread(self._repeat)
                return np.repeat(scores, self._repeat, axis=0)
            return self._cache.prefill(self._tokens)
        return self._cache.decode(self.pending)

    def prompt_hidden(self) -> list[np.ndarray]:
        """After the prompt pass, each prompt's hidden states, (its length, n_embd) float32."""
        assert isinstance(self._cache, InPlaceCache) and self._cache.keep_hidden, "Rows(hidden=True), after the prompt pass"
        return self._cache.prompt_hidden

    def step_hidden(self) -> np.ndarray:
        """After a step, each row's hidden state at the position it wrote, (rows, n_embd) float32."""
        assert isinstance(self._cache, InPlaceCache), "a cache in place"
        return self._cache.decode_hidden()

    def forward_guessed(self, guesses: list[int]) -> np.ndarray:
        """One row: run the pending token and `guesses` after it in one pass; each one's scores (Generator.step)."""
        assert isinstance(self._cache, InPlaceCache) and self.pending is not None, "guesses follow a step, in a cache of the call's own"
        return self._cache.append([int(self.pending[0]), *guesses])

    def take_back(self, positions: int) -> None:
        """Forget the cache's last `positions` positions: guesses the model did not choose."""
        assert isinstance(self._cache, InPlaceCache)
        self._cache.lengths[0] -= positions

    def advance(self, tokens: np.ndarray, source: np.ndarray | None = None) -> None:
        """Append one token to every row; with `source`, row i first becomes a copy of row source[i]."""
        if source is not None:
            assert self._cache is not None, "beam search reorders the rows of its own cache"
            self._cache.reorder(source, self.alike(source))
            self._prompts, self._new = self._prompts[source], self._new[source]
            self._tokens = [list(self._tokens[s]) for s in source.tolist()]
        tokens = tokens.reshape(-1).astype(np.int64)
        self._new[:, self.steps] = tokens
        self.steps += 1
        for row, token in zip(self._tokens, tokens.tolist()):
            row.append(token)
        self.pending = tokens

    def alike(self, source: np.ndarray) -> np.ndarray:
        """Per row, how many of its first cache positions already hold what row source[row]'s do: those of their
        longest common history (its prompt's at least, for a prompt's beams). A position's keys and values follow
        from the tokens up to it, and two rows with those tokens alike got them from the same runs, alike: a prompt's
        rows copy one pass (InPlaceCache.spread, the batcher's), and then each step writes every row's next position in
        one run, where on the CPU a row's numbers do not depend on which row it is (int8's one activation scale a run
        is every row's; tests/test_generate.py checks it bit for bit). So beam search copies a moved beam only from where
        it parted from the beam it becomes, not its whole length each step (4 beams, 256 tokens: a third of the call went
        to copies). CUDA's reorders gather whole rows."""
        ids = self.input_ids
        parted = ids != ids[source]
        first = np.where(parted.any(axis=1), parted.argmax(axis=1), ids.shape[1])
        padding = np.array([len(self._prompts[0]) - (len(t) - self.steps) for t in self._tokens])
        return np.where(padding == padding[source], np.maximum(first - padding, 0), 0)

    @property
    def input_ids(self) -> np.ndarray:
        """Every row's tokens so far, left-padded: what transformers hands processors and stopping criteria."""
        return np.concatenate([self._prompts, self._new[:, : self.steps]], axis=1)

    def history(self, row: int) -> list[int]:
        """The row's tokens so far without padding: its prompt, then what was generated (do not modify)."""
        return self._tokens[row]


class Scoring:
    """What turns a step's raw scores into the ones a token is chosen from: the built-in processors (diverse beam
    search's penalty among them), then the caller's `logits_processors` (transformers' order), then a constraint's
    mask (guidance.py) or token healing's first token (healing.py; last, so that none of them can bring back a token
    it bans), then sampling's warpers and the watermark."""

    def __init__(self, opts: GenerationOptions, constraint: Constraint | None = None, tokenizer: Tokenizer | None = None,
                 rng: np.random.Generator | None = None, vocab_size: int = 0, keep: int = 1,
                 first: list[np.ndarray | None] | None = None) -> None:
        """`first`: per row, the tokens its first new token may be (None: any)."""
        breakers = None
        if opts.dry_multiplier > 0 and tokenizer is not None:  # the tokens that hold a breaker, over the model's whole vocabulary
            held = tokenizer.holding(tuple(opts.dry_sequence_breakers))
            breakers = np.concatenate([held, np.zeros(max(0, vocab_size - len(held)), bool)])
        self.processors, self.warpers = logits.processors_for(opts, breakers), logits.warpers_for(opts, rng, keep)
        self.diversity, self._diverse_at = np.float32(opts.diversity_penalty), logits.diversity_position(opts)
        self.user = opts.logits_processors
        self.constraint = constraint
        self.first = first if first and any(allowed is not None for allowed in first) else None
        self.reads_history = bool(self.processors or constraint or opts.watermarking_config)

    def __call__(self, raw: np.ndarray, rows: Rows, step: int, subset: np.ndarray | None = None,
                 taken: np.ndarray | None = None) -> np.ndarray:
        """`raw`: the scores of every row, or of the rows `subset` (diverse beam search scores a group's rows at a
        time, as transformers does, its processors and the caller's seeing those rows alone); `taken`: per row, how
        many beams of earlier groups took each token this step, which diversity_penalty weighs (BeamSearch._taken, beam.py)."""
        if not (self.processors or self.user or self.constraint or self.warpers or (self.first and step == 0) or taken is not None):
            return raw  # greedy's usual case: the raw scores
        which = range(len(raw)) if subset is None else subset.tolist()
        history = [rows.history(r) for r in which] if self.reads_history else []
        scores = logits.apply(self.processors[: self._diverse_at], raw, history, step)
        if taken is not None:  # transformers' HammingDiversityLogitsProcessor, where its chain has it
            scores = scores - self.diversity * taken
        scores = logits.apply(self.processors[self._diverse_at :], scores, history, step)
        for i, processor in enumerate(self.user):
            ids = rows.input_ids if subset is None else rows.input_ids[subset]
            scores = _checked(processor(ids, scores), scores.shape, f"logits_processors[{i}]")
        if self.constraint is not None:
            assert subset is None, "a constraint's matchers follow all rows at once (options refuse one with beam groups)"
            scores = self.constraint(scores, history, step)
        if self.first is not None and step == 0:
            scores = _first_tokens(scores, [self.first[r] for r in which])
        return logits.apply(self.warpers, scores, history, step)


def _first_tokens(scores: np.ndarray, allowed: list[np.ndarray | None]) -> np.ndarray:
    """Each row's scores with only its allowed tokens left (None: all); an OptionsError where none of them is left."""
    kept = np.full_like(scores, -np.inf)
    for row, ids in enumerate(allowed):
        ids = slice(None) if ids is None else ids[ids < scores.shape[1]]
        kept[row, ids] = scores[row, ids]
    row = _emptied_row(kept)
    if row is not None:
        raise OptionsError(f"token_healing and the other options leave row {row} no first token: none that continues "
                           "the prompt's last token is allowed (a forced_eos_token_id at the first step, bad_words_ids, suppress_tokens?)")
    return kept


def _emptied_row(scores: np.ndarray) -> int | None:
    """The first row whose every token is banned (-inf), or None."""
    banned = np.flatnonzero(np.isneginf(scores).all(axis=-1))
    return int(banned[0]) if banned.size else None


def _checked(result: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A caller's processor's scores: a number per row and token, none NaN or +inf, and a token left in every row
    (-inf bans one). Anything else would fail later in numpy, or worse, choose a token from it."""
    try:
        scores = np.asarray(result, dtype=np.float32)
    except (TypeError, ValueError):
        scores = None
    if scores is None or scores.shape != shape:
        raise OptionsError(f"{name} returned {returned(result)}: expected scores of shape {shape}")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise OptionsError(f"{name} returned NaN or +inf scores")
    row = _emptied_row(scores)
    if row is not None:
        raise OptionsError(f"{name} banned every token of row {row}: nothing is left to choose from")
    return scores
