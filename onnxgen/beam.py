"""Beam search, step for step the algorithm of transformers' `generate` (4.57), so results match it.

Per prompt, `num_beams` running beams; each step looks at the best 2 x num_beams continuations so that
enough stay alive when some end (with do_sample, beam sampling: that many continuations drawn, without
replacement, from the softmax of the beams' summed, warped log-probabilities). Ended candidates compete for `num_beams` finished slots on their
length-penalised score; the search stops when no running beam can beat the finished ones (the
`early_stopping` rule), when the finished slots are full (`early_stopping=True`), at max_new_tokens, or when
max_time is up (every candidate then ends). Diverse beam search (num_beam_groups; transformers' group beam search
up to 4.55, a hub method since) splits each prompt's beams into groups, each a search of its own as above (its own
candidates and finished slots), run one after another within a step so that a group's scores are lowered by
diversity_penalty for each beam of an earlier group that took the same token; a prompt's results are the best of
all its groups' finished beams. A stop string or a caller's criterion ends a candidate as an end token
does (OpenAI's `stop` then cuts the text before the string, as the generator does).
`BeamSearch` has the generator's nouns (generator.py); its steps return no events, since a beam revises
its past: the results come from `completions()` once it is done. `finish(row)` ends the search of the row's prompt
(its num_return_sequences rows share one), `cancel()` every prompt's: the beams still running end then as candidates,
as at max_time, so the results are the best beams found so far, finish reason "cancelled".
"""

from __future__ import annotations

import time

import numpy as np

from . import logits
from .decoding import Rows, Scoring, sample_distinct
from .errors import OptionsError
from .generator import (
    STILL_RUNNING,
    Completion,
    Event,
    Stats,
    call_stats,
    check_row,
    tokens_before,
)
from .guidance import constraint
from .healing import Healed, first_tokens
from .options import GenerationOptions
from .runtime import Runtime
from .stopping import StopRules
from .tokenizer import Tokenizer

NEG = np.float32(-1.0e9)  # transformers' start for every beam but the first
LARGEST = np.finfo(np.float32).max
# Why a candidate ended, as the code that the finished slots keep (0: it runs on); by StopRules' order, first first
REASONS = ("running", "eos", "length", "time", "stop")
EOS, LENGTH, TIME, STOP = range(1, 5)


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """array[b, index[b, j], ...] for every batch b."""
    return np.take_along_axis(array, index.reshape(index.shape + (1,) * (array.ndim - 2)), axis=1)


class BeamSearch:
    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, prompts: list[list[int]], opts: GenerationOptions, pad_id: int,
                 healing: list[Healed | None] | None = None) -> None:
        """`healing` (token_healing, healing.py): per prompt, how it was healed (`prompts` are then the healed ones)."""
        self.start = time.perf_counter()
        self.tokenizer, self.opts = tokenizer, opts
        b, k = len(prompts), opts.num_beams
        self.b, self.k = b, k
        # Each prompt's beams make `groups` searches of `width` beams, search s of prompt s // groups: rows are prompt by
        # prompt, group by group, beam by beam, so the state below is (searches, width, ...) and search s holds rows
        # s * width to (s + 1) * width
        self.groups, self.width = opts.num_beam_groups, k // opts.num_beam_groups
        n, width = b * self.groups, self.width
        self.n = n
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.rules = StopRules.of(opts, self.start)
        self.eos = np.asarray(sorted(self.rules.eos), dtype=np.int64)
        # stop_strings read a candidate's last tokens: its prompt's last ones, then its new ones
        reach = max((len(s) for s in self.rules.stop_strings), default=0) + 1
        self._prompt_tails = [p[-reach:] for p in prompts]
        # Per beam, a token besides every end token: what the candidates looked at per step must hold, and what
        # beam sampling's warpers leave at least (transformers' min_tokens_to_keep)
        per_beam = max(2, 1 + len(self.eos))
        self.keep = per_beam * width
        self.rng = np.random.default_rng(opts.seed)
        self.rows = Rows(runtime, prompts, pad_id, opts.max_new_tokens, opts.adapter, repeat=k)  # first: it refuses a call too large
        self.healed = [h.tail if h else "" for h in healing or [None] * b]  # per prompt
        # guidance.py: each new beam goes on from its parent's state
        self.scoring = Scoring(opts, constraint(opts, tokenizer), tokenizer, self.rng, runtime.vocab_size, per_beam,
                               first=first_tokens(healing, k))
        self.top = runtime.top_k
        self.top_n = opts.logprobs or 0
        new = opts.max_new_tokens
        # Per beam, running and finished: new tokens, each one's log-probability and best alternatives, score, length.
        self.pad_id = pad_id
        self.running = np.full((n, width, new), pad_id, dtype=np.int64)
        self.running_lp = np.zeros((n, width, new), dtype=np.float32)
        self.running_alt = np.zeros((n, width, new, self.top_n, 2), dtype=np.float32)  # (token id, log-probability)
        self.running_scores = np.zeros((n, width), dtype=np.float32)
        self.running_scores[:, 1:] = NEG  # all beams start equal: let only the first one spread at step one
        self.finished, self.finished_lp, self.finished_alt = self.running.copy(), self.running_lp.copy(), self.running_alt.copy()
        self.finished_scores = np.full((n, width), -np.inf, dtype=np.float32)
        self.is_finished = np.zeros((n, width), dtype=bool)
        self.finished_lens = np.zeros((n, width), dtype=np.int64)
        self.finished_why = np.zeros((n, width), dtype=np.int8)  # REASONS' codes
        self.improvable = np.ones((n, 1), dtype=bool)
        self.took = np.zeros((n, width), dtype=np.int64)  # diverse beam search: the tokens each search's beams took this step
        self.steps = 0
        self.step_ends: list[float] = []
        self.cancelled = np.zeros(b, dtype=bool)  # prompts whose search the caller ended (finish, cancel)
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def finish(self, row: int) -> None:
        """End the search of this row's prompt now: its beams still running become candidates beside those
        finished (as at max_time), the best of them its results (finish reason "cancelled"). The other prompts
        search on; its rows run with theirs until the call ends, as transformers' finished beams do."""
        prompt = check_row(row, self.b * self.opts.num_return_sequences) // self.opts.num_return_sequences
        if self.cancelled[prompt] or self._done:
            return
        self.cancelled[prompt] = True
        searches = slice(prompt * self.groups, (prompt + 1) * self.groups)
        if self.steps:  # before the first step no beam holds a token
            ended = np.zeros(self.running_scores.shape, dtype=bool)
            ended[searches] = True
            self._merge(slice(None), ended, self.running, self.running_lp, self.running_alt, self.running_scores,
                        np.full(ended.shape, self.steps), np.zeros(ended.shape, dtype=np.int8), self.steps)
        self.improvable[searches] = False
        if not self.improvable.any():
            self._done = True
            self.rows.release()

    def cancel(self) -> None:
        """End every prompt's search now (finish)."""
        for prompt in range(self.b):
            self.finish(prompt * self.opts.num_return_sequences)

    def step(self) -> list[Event]:
        if self._done:
            return []
        return self.take(self.rows.forward())

    def take(self, raw: np.ndarray) -> list[Event]:
        """A step after its forward, from `raw`, the scores it gave (a batcher runs one forward for several
        generators; generator.py)."""
        opts, cur = self.opts, self.steps
        self.step_ends.append(time.perf_counter())
        scores = logits.log_softmax(raw)  # (rows, vocab)
        source = np.empty(self.running_scores.shape, dtype=np.int64)  # per new beam, the row it continues
        ends = np.empty((self.n, self.keep), dtype=bool)
        best = np.empty((self.n, 1), dtype=np.float32)  # each search's best candidate, ended or not
        taken = None
        for group in range(self.groups):  # one after another: each group's scores follow what the groups before it took
            at = slice(group, None, self.groups)  # this group's search of each prompt
            rows = None if self.groups == 1 else (np.arange(self.n)[at, None] * self.width + np.arange(self.width)).reshape(-1)
            processed = self.scoring(scores if rows is None else scores[rows], self.rows, cur, rows, taken)
            source[at], ends[at], best[at] = self._choose(at, processed, cur)
            if group + 1 < self.groups:
                taken = self._taken(group + 1, raw.shape[-1])

        self.steps = cur = cur + 1
        # Can a running beam still beat the worst finished one? Judged by the best running beam, or in diverse beam
        # search by the best candidate, an ended one too, as transformers' group beam search (its older scorer) judges
        horizon = opts.max_new_tokens if opts.early_stopping == "never" and opts.length_penalty > 0 else cur
        best_running = (self.running_scores[:, :1] if self.groups == 1 else best) / np.float32(horizon**opts.length_penalty)
        worst_finished = np.where(self.is_finished, self.finished_scores.min(axis=1, keepdims=True), -np.inf)
        self.improvable &= (best_running > worst_finished).any(axis=-1, keepdims=True)
        if opts.early_stopping is True:  # a search whose finished slots are full is over
            self.improvable &= ~self.is_finished.all(axis=1, keepdims=True)
        if not self.improvable.any() or ends.all():
            self._done = True
            self.rows.release()
        else:
            self.rows.advance(self.running[:, :, cur - 1].reshape(-1), source.reshape(-1))
        return []

    def _choose(self, at: slice, processed: np.ndarray, cur: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step of the searches `at`, from their beams' `processed` scores (a row per beam): their running beams
        and finished slots updated; per new running beam, the row it continues, per candidate whether it ended, and
        per search its best candidate's score."""
        opts, width = self.opts, self.width
        running_scores = self.running_scores[at]
        m, vocab = len(running_scores), processed.shape[-1]
        with np.errstate(over="ignore"):  # a score that a filter took to float32's lowest: -inf, as good as left out
            scores = (processed.reshape(m, width, -1) + running_scores[:, :, None]).reshape(m, -1)

        # The best `keep` continuations over all beams of each search (or `keep` drawn), and what each one carries.
        top = sample_distinct(scores, self.keep, self.rng) if opts.do_sample else self.top(scores, self.keep)
        top_scores = np.take_along_axis(scores, top, axis=-1)
        top_beams, top_tokens = top // vocab, top % vocab
        top_seqs, top_lp, top_alt = _take(self.running[at], top_beams), _take(self.running_lp[at], top_beams), _take(self.running_alt[at], top_beams)
        top_seqs[:, :, cur] = top_tokens
        top_lp[:, :, cur] = np.take_along_axis(processed.reshape(m, -1), top, axis=-1)
        if self.top_n:
            alt_ids = self.top(processed, self.top_n)
            alt = np.stack([alt_ids, np.take_along_axis(processed, alt_ids, -1)], axis=-1).reshape(m, width, self.top_n, 2)
            top_alt[:, :, cur] = _take(alt, top_beams)
        why = self._why(at, top_tokens, top_seqs, top_beams, processed, cur)
        ends = why > 0
        if self.groups > 1:  # the best that did not take an end token: transformers' running beams, at the last step too
            self.took[at] = np.take_along_axis(top_tokens, self.top(np.where(why == EOS, -np.inf, top_scores), width), -1)

        # Running beams for the next step: the best candidates that did not end.
        # -inf, not transformers' -1e9 added: an end token that a steep exponential_decay_length_penalty raised
        # to float32's largest kept that score, so the ended beam ran on
        live_scores = np.where(ends, -np.inf, top_scores).astype(np.float32)
        chosen = self.top(live_scores, width)
        self.running[at], self.running_lp[at], self.running_alt[at] = _take(top_seqs, chosen), _take(top_lp, chosen), _take(top_alt, chosen)
        self.running_scores[at] = np.take_along_axis(live_scores, chosen, -1)
        source = np.take_along_axis(top_beams, chosen, -1) + np.arange(self.n)[at, None] * width

        # Finished slots: ended candidates among the top `width` compete on length-penalised score (not in a search
        # that is over: early_stopping=True's once its slots are full).
        just_ended = ends & (np.arange(self.keep) < width)[None, :] & self.improvable[at]
        ended = (top_seqs, top_lp, top_alt, top_scores, np.full_like(top_tokens, cur + 1), why, cur + 1)
        if self.groups > 1 and opts.early_stopping is True:
            # transformers' group beam search takes a step's end tokens first, and a search they fill is over: the
            # beams that run out of tokens at this step do not finish there
            self._merge(at, just_ended & (why == EOS), *ended)
            just_ended &= (why != EOS) & ~self.is_finished[at].all(axis=1, keepdims=True)
        self._merge(at, just_ended, *ended)
        return source, ends, top_scores[:, :1]

    def _taken(self, group: int, vocab: int) -> np.ndarray:
        """For each beam of group `group`, how many beams of its prompt's earlier groups took each token this step
        (rows, vocab): transformers' HammingDiversityLogitsProcessor's counts, which are its running beams' tokens
        (not an end token's: that beam finished; at the last step, those that would have run on), and in which a
        search that had ended before this step counts its beams' tokens as padding."""
        earlier = self.took.reshape(self.b, self.groups, self.width)[:, :group]
        over = ~self.improvable.reshape(self.b, self.groups)[:, :group, None]
        tokens = np.where(over, self.pad_id, earlier).reshape(self.b, -1)
        counts = np.zeros((self.b, vocab), dtype=np.float32)
        np.add.at(counts, (np.arange(self.b)[:, None], tokens), 1)
        return np.repeat(counts, self.width, axis=0)

    def _merge(self, at: slice, ended: np.ndarray, seqs: np.ndarray, lp: np.ndarray, alt: np.ndarray, scores: np.ndarray,
               lens: np.ndarray, why: np.ndarray, length: int) -> None:
        """The `ended` candidates (searches `at`, candidates) enter those searches' finished slots, each search's best
        `width` of them and those already there kept, on their scores penalised for `length` new tokens."""
        with np.errstate(over="ignore"):  # a score near float32's largest (the decay) times length ** -length_penalty
            penalised = np.clip(scores / np.float32(length**self.opts.length_penalty), -LARGEST, LARGEST)
        penalised = np.where(ended, penalised, -np.inf).astype(np.float32)
        merged = np.concatenate([self.finished_scores[at], penalised], axis=1)
        best = self.top(merged, self.width)
        self.finished_scores[at] = np.take_along_axis(merged, best, -1)
        for kept, new in ((self.finished, seqs), (self.finished_lp, lp), (self.finished_alt, alt), (self.finished_lens, lens),
                          (self.is_finished, ended), (self.finished_why, why)):
            kept[at] = _take(np.concatenate([kept[at], new], axis=1), best)

    def completions(self) -> list[Completion]:
        """The best `num_return_sequences` beams of each prompt, best first, prompt by prompt (of all its groups'
        finished beams: by score, the later of equal ones first, as transformers' sort and pop take them)."""
        if not self.done:
            raise OptionsError(STILL_RUNNING)
        asked = self.opts.logprobs is not None
        results = []
        for i in range(self.b):
            slots = self.finished_scores[i * self.groups : (i + 1) * self.groups].reshape(-1)  # each group's, one after another
            order = np.lexsort((-np.arange(len(slots)), -slots)) if self.groups > 1 else range(len(slots))
            for slot in order[: self.opts.num_return_sequences]:
                s, j = divmod(i * self.k + int(slot), self.width)  # its search and place there
                n = int(self.finished_lens[s, j])
                tokens = self.finished[s, j, :n].tolist()
                reason = "cancelled" if self.cancelled[i] else REASONS[self.finished_why[s, j]]
                after = len(self.healed[i])
                text = self.tokenizer.decode(tokens, after=after)
                cut = self.rules.first_stop(text) if self.rules.stop else None
                if cut is not None:  # as the generator cuts a row's text and tokens (ended by the length or the time too)
                    reason, text, n = "stop", text[:cut], tokens_before(self.tokenizer, tokens, cut, after)
                    tokens = tokens[:n]
                alternatives = [{int(t): float(v) for t, v in step} for step in self.finished_alt[s, j, :n]] if asked else None
                results.append(Completion(text, tokens, reason, i,
                                          self.finished_lp[s, j, :n].tolist() if asked else None, alternatives,
                                          float(self.finished_scores[s, j]), self.healed[i]))
        return results

    def _why(self, at: slice, tokens: np.ndarray, seqs: np.ndarray, beams: np.ndarray, processed: np.ndarray, cur: int) -> np.ndarray:
        """Why each candidate of the searches `at` ends (REASONS' code; 0: it runs on), given each one's token, new
        tokens so far and beam, all (searches, candidates, ...), and the beams' scores (`processed`, a row per beam).
        As transformers' beam search treats its stopping criteria, one that completes a stop string, meets a caller's
        criterion or is chosen when max_time is up ends as one ending in an end token does: a finished hypothesis, out
        of the running beams."""
        m, keep = tokens.shape
        prompts = np.arange(self.n)[at] // self.groups
        why = np.where(np.isin(tokens, self.eos), EOS, 0).astype(np.int8)
        if cur + 1 >= self.opts.max_new_tokens:
            why[why == 0] = LENGTH
        if self.rules.deadline is not None and time.perf_counter() > self.rules.deadline:
            why[why == 0] = TIME
        stopped = np.zeros(tokens.shape, dtype=bool)
        if self.rules.stop_strings:
            stopped |= np.array([[self._stops(p, seq[: cur + 1]) for seq in seqs[i]] for i, p in enumerate(prompts)], dtype=bool).reshape(stopped.shape)
        if self.rules.stop:  # OpenAI's stop: one in a candidate's new text (completions cut it there)
            stopped |= np.array([[self.rules.first_stop(self.tokenizer.decode(seq[: cur + 1].tolist(), after=len(self.healed[p]))) is not None
                                  for seq in seqs[i]]
                                 for i, p in enumerate(prompts)], dtype=bool).reshape(stopped.shape)
        if self.rules.criteria:  # a row per candidate: its beam's row as processors see it (left-padded), then its token
            parents = _take(self.rows.input_ids.reshape(self.n, self.width, -1)[at], beams).reshape(m * keep, -1)
            ids = np.concatenate([parents, tokens.reshape(-1, 1)], axis=1)
            scores = _take(processed.reshape(m, self.width, -1), beams).reshape(m * keep, -1)  # those its token was chosen from
            stopped |= self.rules.criteria_met(ids, scores).reshape(stopped.shape)
        why[(why == 0) & stopped] = STOP
        return why

    def _stops(self, prompt: int, new: np.ndarray | list[int]) -> bool:
        """Whether the last of these new tokens after prompt `prompt`'s completes one of stop_strings."""
        return self.rules.completes_stop_string([*self._prompt_tails[prompt], *map(int, new)], self.tokenizer.spell)

    @property
    def stats(self) -> Stats:
        # Once done, the tokens each returned beam keeps (a stop string cuts its text), as the generator counts a row's
        lengths = ([len(c.token_ids) for c in self.completions()] if self.done else
                   [int(n) for n in self.finished_lens.reshape(self.b, -1)[:, : self.opts.num_return_sequences].reshape(-1)])
        return call_stats(self.start, self.step_ends, self.prompt_tokens, lengths)
