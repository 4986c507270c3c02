"""Watermarked text and its detection (Kirchenbauer et al. 2023), as transformers' WatermarkLogitsProcessor and
WatermarkDetector compute them, so that text written by either is detected by either.

Each step a pseudo-random "green" part of the vocabulary, seeded by the key and the tokens before, gets `bias` added
to its scores. Text written so holds more green tokens than chance; `detect` counts them knowing only the key and
says how unlikely that many would be in text written without it (a z-score against greenlist_ratio).

A green list is the first greenlist_ratio x vocabulary ids of torch.randperm(vocabulary) under a torch generator
seeded as transformers seeds it. torch's CPU generator is the 32-bit Mersenne Twister seeded with the seed's low 32 bits,
and randperm shuffles by swapping position i with position i + draw % (n - i): numpy's MT19937 draws the same numbers,
and `_shuffled_prefix` makes the same shuffle's first ids without a Python loop over them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import OptionsError
from .options import WatermarkingConfig

TABLE_SIZE = 1_000_003  # selfhash's table of token hashes (transformers')
CANDIDATES = 40  # selfhash: the best-scored tokens tried each step (transformers', from the paper's code)
KEPT_LISTS = 128  # green lists a call keeps by seed: a step's list is often one an earlier token had
KEPT_ANSWERS = 65536  # selfhash's (seed, token) answers a call keeps: with context_width 1 a token's is the same every step


class Greenlists:
    """A key's green lists over a vocabulary, each by the tokens before it. A call's own: it keeps recent lists."""

    def __init__(self, config: WatermarkingConfig, vocab_size: int) -> None:
        self.config, self.vocab_size = config, vocab_size
        self.size = int(vocab_size * config.greenlist_ratio)
        self._bits = np.random.MT19937()
        self._legacy = np.random.RandomState(self._bits)  # seeds the Twister as torch does (RandomState.seed)
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()
        self._answers: dict[tuple[int, int], bool] = {}
        # selfhash hashes a token t as table[t] + 1, table a shuffle of TABLE_SIZE seeded with the key (transformers')
        self._hashes = (self._shuffled_prefix(config.hashing_key, TABLE_SIZE, vocab_size) + 1
                        if config.seeding_scheme == "selfhash" else None)

    def green(self, context: list[int]) -> np.ndarray:
        """The green token ids after `context` (lefthash's filter: all of them)."""
        seed = self._seed(context[-self.config.context_width:])
        ids = self._kept.get(seed)
        if ids is None:
            ids = self._kept[seed] = self._shuffled_prefix(seed, self.vocab_size, self.size).astype(np.int32)
            if len(self._kept) > KEPT_LISTS:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(seed)
        return ids

    def holds(self, context: list[int], token: int) -> bool:
        """Whether `token` is green after `context` (selfhash: `context` ends with `token`): selfhash's filter asks this
        of 40 tokens a step, the detector of every token, each under a seed of its own. Answers are kept by seed."""
        seed = self._seed(context[-self.config.context_width:])
        answer = self._answers.get((seed, token))
        if answer is None:
            answer = self._lands_in_list(seed, token)
            if len(self._answers) >= KEPT_ANSWERS:
                self._answers.clear()
            self._answers[seed, token] = answer
        return answer

    def _lands_in_list(self, seed: int, token: int) -> bool:
        """Follow `token` through the shuffle: it starts at position `token`, and the first later swap that touches its
        position either targets it (the token lands at that swap's position, in the list) or is the position's own
        (the token moves on to its target)."""
        j = self._targets(seed, self.vocab_size, self.size)
        at, turn = int(token), 0
        while True:
            touching = np.flatnonzero(j[turn:at + 1] == at) if at < self.size else np.flatnonzero(j[turn:] == at)
            if touching.size:
                return True  # a swap before `at` targeting it, or `at`'s own swap staying put
            if at >= self.size:
                return False
            turn, at = at + 1, int(j[at])

    def _seed(self, window: list[int]) -> int:
        key = self.config.hashing_key
        if self._hashes is None:
            seed = key * int(window[-1])
        else:  # torch's int64 products, overflow wrapping as it does there
            hashes = self._hashes[np.asarray(window) % TABLE_SIZE]
            seed = int((np.int64(key) * hashes * hashes[-1]).min())
        return seed % (2**64 - 1)

    def _targets(self, seed: int, n: int, count: int) -> np.ndarray:
        """The positions torch.randperm(n)'s first `count` swaps exchange with positions 0, 1, ...: i + draw_i % (n - i)."""
        self._legacy.seed(seed & 0xFFFFFFFF)
        i = np.arange(count, dtype=np.int64)
        return i + self._bits.random_raw(count).astype(np.int64) % (n - i)

    def _shuffled_prefix(self, seed: int, n: int, count: int) -> np.ndarray:
        """The first `count` ids of torch.randperm(n) under a generator given manual_seed(seed).

        randperm starts from 0..n-1 and, for i = 0, 1, ..., swaps positions i and j_i = i + draw_i % (n - i); position
        i is final after its swap. Before swap i a position p >= i holds what the last earlier swap put there, if any:
        swap k put its position k's value, A(k), at j_k. So the value placed at i is A(k) for the last k < i with
        j_k = j_i, else j_i itself; and A(k) (what position k held at its swap) is likewise A(m) for the last m < k
        with j_m = k, else k. Those links point to earlier swaps, so A is each chain's first swap, found by
        following the links in doubling jumps."""
        i, j = np.arange(count, dtype=np.int64), self._targets(seed, n, count)
        by_target, order = np.divmod(np.sort(j * count + i), count)  # swaps by target, then by turn (the keys are distinct)
        repeats = np.flatnonzero(by_target[1:] == by_target[:-1]) + 1
        earlier = np.full(count, -1, dtype=np.int64)  # the last earlier swap with the same target
        earlier[order[repeats]] = order[repeats - 1]
        # the last swap m < k that targeted position k (m = k is no link: position k kept its value)
        moved = np.flatnonzero((j < count) & (j != i))
        link = np.full(count, -1, dtype=np.int64)
        np.maximum.at(link, j[moved], moved)
        first = np.where(link >= 0, link, i)
        while not np.array_equal(jumped := first[first], first):
            first = jumped
        return np.where(earlier >= 0, first[np.maximum(earlier, 0)], j)


def watermark(config: WatermarkingConfig, pad_id: int) -> Callable[[np.ndarray, list[list[int]], int], np.ndarray]:
    """The filter (logits.Filter) that adds `bias` to each row's green tokens, as transformers' processor does: last,
    after every processor and warper (renormalisation aside). Its lists are kept per call. As there, nothing is marked
    while the call's rows are shorter than context_width, and a shorter row's window reaches into its left padding."""
    lists: Greenlists | None = None

    def apply(scores: np.ndarray, history: list[list[int]], _: int) -> np.ndarray:
        nonlocal lists
        if max(map(len, history)) < config.context_width:  # transformers' check, on the padded width
            return scores
        if lists is None:
            lists = Greenlists(config, scores.shape[-1])
        marked, candidates = scores.copy(), min(CANDIDATES, scores.shape[-1])
        for row, seen in enumerate(history):
            if config.seeding_scheme == "lefthash":
                green = lists.green(seen)
            else:  # the best candidates, each judged by the list that its own hash and the tokens before it seed
                width = config.context_width - 1
                before = ([pad_id] * width + seen[-width:])[-width:] if width else []
                best = np.argpartition(-scores[row], candidates - 1)[:candidates]
                green = np.asarray([t for t in best.tolist() if lists.holds([*before, t], t)], dtype=np.int64)
            marked[row, green] += np.float32(config.bias)
        return marked

    return apply


@dataclass(frozen=True)
class WatermarkDetection:
    """How a text's tokens fall against a key's green lists (transformers' WatermarkDetectorOutput, less confidence:
    1 - p_value)."""

    num_tokens_scored: int  # tokens with a full context before them (all but the first context_width; lefthash)
    num_green_tokens: int
    green_fraction: float
    z_score: float  # how many standard deviations above greenlist_ratio the green share is
    p_value: float  # the chance of so high a z-score in text written without the key (the normal tail)
    prediction: bool  # z_score > z_threshold: watermarked


def detect(ids: list[int], lists: Greenlists, z_threshold: float = 3.0, ignore_repeated_ngrams: bool = False) -> WatermarkDetection:
    """Count the green tokens of `ids` under `lists` (a key's, kept across the texts of one call), each judged by the
    tokens before it as the watermark chose them (the prompt left out: it was not written under the watermark).
    `ignore_repeated_ngrams`: each distinct (context, token) counts once, so that repeated text weighs no more than it says."""
    config = lists.config
    selfhash = config.seeding_scheme == "selfhash"
    n = config.context_width + (0 if selfhash else 1)  # context and token
    if len(ids) < config.context_width + 1:
        raise OptionsError(f"watermark detection needs at least {config.context_width + 1} tokens (context_width + 1), got {len(ids)}")
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if ignore_repeated_ngrams:
        grams = list(dict.fromkeys(grams))
    green = sum(lists.holds(list(gram if selfhash else gram[:-1]), gram[-1]) for gram in grams)
    ratio, scored = config.greenlist_ratio, len(grams)
    z = (green - ratio * scored) / math.sqrt(scored * ratio * (1 - ratio))
    return WatermarkDetection(scored, green, green / scored, z, 0.5 * math.erfc(z / math.sqrt(2)), z > z_threshold)
