"""Contrastive search (transformers' penalty_alpha; Su et al. 2022, "A Contrastive Framework for Neural Text
Generation", shown on GPT-2): greedy decoding that weighs the top_k most likely next tokens and takes one that is
likely and least like the text so far, so that the text does not fall into the loops greedy search does.

A candidate v of a prompt scores (1 - penalty_alpha) x p(v) - penalty_alpha x max_j cos(h_v, h_j): p from the
processed scores, h_v the candidate's hidden state after the last layer norm (the graph's last_hidden_state,
graph.add_hidden_output), h_j those of every position so far, the prompt's included. A candidate's hidden state
takes a forward of it, so a prompt runs top_k rows: each step they become copies of the row chosen last (beam
search's reorder: a copy from where they part, the last position), each takes one candidate, and one forward gives
every candidate's hidden state and, for the one chosen, the scores of the next step. The text is transformers'
(generate with penalty_alpha up to 4.55; a hub method since, transformers-community/contrastive-search). It never
revises a token, so it streams as greedy decoding does: the generator's nouns, its events and stop rules.
"""

from __future__ import annotations

import time

import numpy as np

from . import logits
from .decoding import Rows, Scoring
from .generator import Event, Generator
from .healing import Healed, first_tokens
from .options import GenerationOptions
from .runtime import Runtime
from .tokenizer import Tokenizer


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1, so that dot products are cosines."""
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


class ContrastiveSearch(Generator):
    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, prompts: list[list[int]], opts: GenerationOptions, pad_id: int,
                 healing: list[Healed | None] | None = None) -> None:
        super().__init__(runtime, tokenizer, prompts, opts, pad_id, healing=healing)
        k = self.k = opts.top_k
        self.top = runtime.top_k
        # In place of the generator's rows (one a prompt, never run): top_k a prompt, its candidates'
        self.rows = Rows(runtime, prompts, pad_id, opts.max_new_tokens, opts.adapter, repeat=k, hidden=True)
        self.scoring = Scoring(opts, None, tokenizer, self.rng, runtime.vocab_size, first=first_tokens(healing, k))
        self._scores: np.ndarray | None = None  # every row's processed scores from the last forward
        self._chosen = np.arange(len(prompts)) * k  # per prompt, the row that holds its text
        # per prompt, the unit hidden states of its text so far: its first `_known` rows (filled a position a step)
        self._context = [np.empty((len(p) + opts.max_new_tokens, runtime.n_embd), np.float32) for p in prompts]
        self._known = np.array([len(p) for p in prompts])

    def step(self) -> list[Event]:
        if self.done:
            return []
        b, k, alpha = len(self.finish_reasons), self.k, self.opts.penalty_alpha
        if self._scores is None:  # the prompt pass: its scores give the first candidates
            raw = self.rows.forward()
            for context, prompt in zip(self._context, self.rows.prompt_hidden()):
                context[: len(prompt)] = _unit(prompt)
            self._scores = self.scoring(raw, self.rows, 0)
        prior = self._scores[self._chosen]  # each prompt's scores for its next token
        candidates = self.top(prior, k)  # (prompts, k), the likeliest first
        likely = np.take_along_axis(logits.softmax(prior), candidates, axis=-1)
        ended = np.array([reason is not None for reason in self.finish_reasons])
        candidates[ended] = self.pad_id  # ended prompts' rows run on with padding
        self.rows.advance(candidates.reshape(-1), np.repeat(self._chosen, k))
        raw = self.rows.forward()
        self.step_ends.append(time.perf_counter())
        hidden = _unit(self.rows.step_hidden()).reshape(b, k, -1)
        likeness = np.stack([(hidden[i] @ self._context[i][: self._known[i]].T).max(axis=-1) for i in range(b)])  # (prompts, k)
        best = ((1 - alpha) * likely - alpha * likeness).argmax(axis=-1)
        self._chosen = np.arange(b) * k + best
        for i, context in enumerate(self._context):
            context[self._known[i]] = hidden[i, best[i]]
        self._known += 1
        self._scores = self.scoring(raw, self.rows, self.rows.steps)  # each row after its own candidate
        return self._record(candidates[np.arange(b), best], prior)

    def _advance(self, tokens: np.ndarray) -> None:
        """The chosen rows hold their tokens already: the next step's candidates go after them."""

    def _input_ids(self) -> np.ndarray:
        return self.rows.input_ids[self._chosen]

    def _history(self, row: int) -> list[int]:
        return self.rows.history(int(self._chosen[row]))
