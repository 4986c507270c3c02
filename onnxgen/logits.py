"""Score filters, in transformers' order and with its semantics, on numpy arrays of shape (rows, vocab).

Each takes the scores and the token history of every row and returns new scores; `filters_for` picks
the ones an option set needs, so a plain greedy step pays for none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .errors import OptionsError
from .options import GenerationOptions, returned
from .watermark import watermark

History = list[list[int]]  # per row: the tokens seen so far (prompt without padding, then generated)
Filter = Callable[[np.ndarray, History, int], np.ndarray]  # (scores, history, new-token count) -> scores


def sequence_bias(biases: list[tuple[tuple[int, ...], float]]) -> Filter:
    """Add each bias to its sequence's last token wherever the row ends with the rest of the sequence (a sequence
    of one token: always): transformers' SequenceBiasLogitsProcessor, and OpenAI's logit_bias as one-token sequences."""
    singles, single_biases = np.unique([s[0] for s, _ in biases if len(s) == 1], return_inverse=True)
    singles = singles.astype(np.int64)  # np.unique of no tokens is float
    summed = np.bincount(single_biases, weights=[b for s, b in biases if len(s) == 1], minlength=len(singles)).astype(np.float32)
    longer = [(list(s[:-1]), s[-1], np.float32(b)) for s, b in biases if len(s) > 1]

    def apply(scores: np.ndarray, history: History, _: int) -> np.ndarray:
        bias = np.zeros_like(scores)  # summed first, then added once, as transformers does
        bias[:, singles] = summed
        for row, seen in enumerate(history):
            for prefix, last, value in longer:
                if _ends_with(seen, prefix):
                    bias[row, last] += value
        return scores + bias

    return apply


def repetition_penalty(penalty: float) -> Filter:
    """Divide positive (multiply negative) scores of every token already in the row (CTRL paper). A token seen twice
    is read twice and written twice with the same value, as in transformers' gather and scatter: no np.unique."""

    def apply(scores: np.ndarray, history: History, _: int) -> np.ndarray:
        scores = scores.copy()
        for row, seen in enumerate(history):
            ids = np.asarray(seen, dtype=np.int64)
            s = scores[row, ids]
            scores[row, ids] = np.where(s < 0, s * penalty, s / penalty)
        return scores

    return apply


def encoder_repetition_penalty(penalty: float) -> Filter:
    """Raise the tokens of the row's prompt (the reverse of repetition_penalty: positive scores multiplied by it,
    negative ones divided), to keep the text near its input: transformers' EncoderRepetitionPenaltyLogitsProcessor,
    which a decoder-only model gets on its prompt."""

    inverse = 1 / penalty  # transformers' arithmetic, to the last bit: by 1 / penalty, or divided by it

    def apply(scores: np.ndarray, history: History, generated: int) -> np.ndarray:
        scores = scores.copy()
        for row, seen in enumerate(history):
            ids = np.asarray(seen[: len(seen) - generated], dtype=np.int64)  # repeats read and write alike (above)
            s = scores[row, ids]
            scores[row, ids] = np.where(s < 0, s * np.float32(inverse), s / np.float32(inverse))
        return scores

    return apply


def encoder_no_repeat_ngram(n: int) -> Filter:
    """Ban any token that would repeat an n-gram of the row's prompt: transformers' EncoderNoRepeatNGramLogitsProcessor,
    on a decoder-only model's prompt (the n-grams the text may not copy from it)."""

    def apply(scores: np.ndarray, history: History, generated: int) -> np.ndarray:
        scores = scores.copy()
        for row, seen in enumerate(history):
            prompt = seen[: len(seen) - generated]
            prefix = seen[len(seen) - n + 1 :] if n > 1 else []
            banned = [prompt[i + n - 1] for i in range(len(prompt) - n + 1) if prompt[i : i + n - 1] == prefix]
            scores[row, banned] = -np.inf
        return scores

    return apply


def no_repeat_ngram(n: int) -> Filter:
    """Ban any token that would complete an n-gram already present in the row."""

    def apply(scores: np.ndarray, history: History, _: int) -> np.ndarray:
        scores = scores.copy()
        for row, seen in enumerate(history):
            if len(seen) + 1 < n:
                continue
            prefix = tuple(seen[len(seen) - n + 1 :])
            banned = [seen[i + n - 1] for i in range(len(seen) - n + 1) if tuple(seen[i : i + n - 1]) == prefix]
            scores[row, banned] = -np.inf
        return scores

    return apply


def presence_frequency(presence: float, frequency: float) -> Filter:
    """OpenAI's penalties on the tokens generated so far (the row's last `generated` tokens; not the prompt's):
    each token's score goes down by `presence` if it appeared, and by `frequency` for each time it did."""

    def apply(scores: np.ndarray, history: History, generated: int) -> np.ndarray:
        scores = scores.copy()
        for row, seen in enumerate(history):
            if generated:
                ids, counts = np.unique(np.asarray(seen[len(seen) - generated :], dtype=np.int64), return_counts=True)
                scores[row, ids] -= np.float32(presence) + np.float32(frequency) * counts.astype(np.float32)
        return scores

    return apply


DRY_LONGEST = 50  # a repeat is followed back this many tokens at most (text-generation-webui's cap: base ** n stays finite)


def dry(multiplier: float, base: float, allowed_length: int, last_n: int, breakers: np.ndarray) -> Filter:
    """DRY, "don't repeat yourself" (p-e-w's sampler, as text-generation-webui and llama.cpp run it): where the row's last
    n tokens occurred before and were followed by token t, t would extend that repeat, and loses
    multiplier x base ** (n - allowed_length) if n >= allowed_length (the longest such n for each t). A repeat is not
    followed back across a token that holds a sequence breaker (`breakers`: a mask over the vocabulary), nor does one
    that ends with such a token, or would go on with one, count: names in a dialogue, a list's markers, newlines repeat
    freely. `last_n`: the tokens looked back over (-1: all). Where transformers' repetition penalty lowers every token
    seen, this lowers only those that would copy a passage, more the longer it is."""

    def apply(scores: np.ndarray, history: History, _: int) -> np.ndarray:
        scores = scores.copy()
        for row, seen in enumerate(history):
            tokens = np.asarray(seen[-last_n:] if last_n > 0 else seen, dtype=np.int64)
            followers, lengths = repeats(tokens, breakers)
            long = lengths >= allowed_length
            with np.errstate(over="ignore"):  # a penalty past float32's largest is infinite: that token is out
                penalty = np.float32(multiplier) * np.float32(base) ** (lengths[long] - allowed_length).astype(np.float32)
            scores[row, followers[long]] -= penalty
        return scores

    return apply


def repeats(tokens: np.ndarray, breakers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token that followed an earlier occurrence of the text's end, and the length of the longest such repeat
    before it (in tokens, up to DRY_LONGEST): the tokens that would extend a repeat, and how long it already is."""
    none = np.empty(0, np.int64)
    if len(tokens) < 2 or breakers[tokens[-1]]:
        return none, none
    at = np.flatnonzero(tokens[:-1] == tokens[-1])  # where the last token occurred before
    at = at[~breakers[tokens[at + 1]]]
    lengths = np.ones(len(at), np.int64)
    alive = np.ones(len(at), bool)
    for back in range(1, DRY_LONGEST):
        earlier = len(tokens) - 1 - back
        if earlier < 0 or breakers[tokens[earlier]] or not alive.any():
            break
        alive &= (at >= back) & (tokens[np.maximum(at - back, 0)] == tokens[earlier])
        lengths += alive
    followers = tokens[at + 1]
    order = np.lexsort((-lengths, followers))  # each follower once, with its longest repeat
    followers, lengths = followers[order], lengths[order]
    first = np.concatenate([[True], followers[1:] != followers[:-1]]) if len(followers) else np.empty(0, bool)
    return followers[first], lengths[first]


def xtc(probability: float, threshold: float, rng: np.random.Generator) -> Filter:
    """XTC, "exclude top choices" (llama.cpp's): for each row, with `probability`, the tokens at least `threshold`
    likely are removed, all but the least likely of them, so the text leaves its most obvious path where several
    continuations are likely; a row with fewer than two such tokens is left as it is. A draw from the call's random
    numbers for each row at each step (seeded calls repeat)."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        probs = softmax(scores)
        out = scores.copy()
        for row, u in enumerate(rng.random(len(scores))):
            likely = np.flatnonzero(probs[row] >= np.float32(threshold))
            if u < probability and len(likely) > 1:
                keep = likely[np.argmin(probs[row, likely])]
                out[row, likely[likely != keep]] = -np.inf
        return out

    return apply


def bad_words(sequences: list[list[int]], eos_ids: list[int]) -> Filter:
    """Never complete a banned sequence: its last token goes wherever the row ends with the rest of it (a
    one-token sequence always). transformers' NoBadWordsLogitsProcessor, which leaves the end token alone."""
    sequences = [s for s in sequences if s not in [[e] for e in eos_ids]]

    def apply(scores: np.ndarray, history: History, _: int) -> np.ndarray:
        scores = scores.copy()
        for row, seen in enumerate(history):
            banned = [s[-1] for s in sequences if _ends_with(seen, s[:-1])]
            scores[row, banned] = -np.inf
        return scores

    return apply


def _ends_with(seen: list[int], prefix: list[int]) -> bool:
    """Whether a row's tokens end with `prefix` (an empty one: always)."""
    return len(seen) >= len(prefix) and seen[len(seen) - len(prefix) :] == prefix


def suppress(tokens: list[int]) -> Filter:
    ids = np.asarray(tokens, dtype=np.int64)

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        scores = scores.copy()
        scores[:, ids] = -np.inf
        return scores

    return apply


def min_new_tokens(count: int, eos_ids: list[int]) -> Filter:
    def apply(scores: np.ndarray, _: History, generated: int) -> np.ndarray:
        if generated < count:
            scores = scores.copy()
            scores[:, eos_ids] = -np.inf
        return scores

    return apply


def begin_suppress(tokens: list[int], forced_bos: bool = False) -> Filter:
    """Ban these tokens as a row's first new token (transformers' SuppressTokensAtBeginLogitsProcessor); with
    `forced_bos` (a forced_bos_token_id), its second where the first was forced (prompts of one token)."""
    banned = suppress(tokens)

    def apply(scores: np.ndarray, history: History, generated: int) -> np.ndarray:
        first = 1 if forced_bos and _one_token_prompts(history, generated) else 0
        return banned(scores, history, generated) if generated == first else scores

    return apply


def prefix_allowed(fn: Callable[[int, np.ndarray], Any], num_beams: int, pad_id: int) -> Filter:
    """Only the tokens fn(batch_id, input_ids) allows, per row (transformers' PrefixConstrainedLogitsProcessor: batch_id
    the row's index // num_beams; input_ids its tokens so far, left-padded to the longest row with pad_id, as
    transformers' rows are). What fn returns is checked: token ids of the vocabulary, at least one."""

    def apply(scores: np.ndarray, history: History, _: int) -> np.ndarray:
        width = max(map(len, history))
        mask = np.full_like(scores, -np.inf)
        for row, seen in enumerate(history):
            allowed = fn(row // num_beams, np.asarray([pad_id] * (width - len(seen)) + seen, dtype=np.int64))
            ids = np.asarray(allowed).reshape(-1) if isinstance(allowed, (list, tuple, np.ndarray)) else None
            if ids is None or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or not ((ids >= 0) & (ids < scores.shape[-1])).all():
                raise OptionsError(f"prefix_allowed_tokens_fn returned {returned(allowed)} for row {row}: expected a non-empty list of "
                                   f"token ids below {scores.shape[-1]}")
            mask[row, ids] = 0
        return scores + mask

    return apply


def forced_bos(token: int) -> Filter:
    """The first new token is `token` where the prompts are one token long (transformers' ForcedBOSTokenLogitsProcessor,
    whose cur_len == 1 is the padded batch's width)."""

    def apply(scores: np.ndarray, history: History, generated: int) -> np.ndarray:
        if generated != 0 or not _one_token_prompts(history, generated):
            return scores
        forced = np.full_like(scores, -np.inf)
        forced[:, token] = 0
        return forced

    return apply


def _one_token_prompts(history: History, generated: int) -> bool:
    """Whether the longest prompt of the rows is one token (each row's history: its prompt, then `generated` tokens)."""
    return max(map(len, history)) - generated == 1


def forced_eos(eos_ids: list[int], max_new_tokens: int) -> Filter:
    """The last token a row can generate is the end token (transformers' ForcedEOSTokenLogitsProcessor)."""

    def apply(scores: np.ndarray, _: History, generated: int) -> np.ndarray:
        if generated != max_new_tokens - 1:
            return scores
        forced = np.full_like(scores, -np.inf)
        forced[:, eos_ids] = 0
        return forced

    return apply


def exponential_decay(start: int, factor: float, eos_ids: list[int]) -> Filter:
    """After `start` new tokens, raise the end token's score by |score| x (factor ** (new tokens - start) - 1)
    (transformers' ExponentialDecayLengthPenalty). Where transformers' overflows (a Python OverflowError, or
    +inf scores, which make sampling's weights NaN), the score stops at float32's largest; an end token already
    banned stays banned (transformers' gives -inf + inf = NaN, which its greedy search then picks)."""
    largest = np.finfo(np.float32).max

    def apply(scores: np.ndarray, _: History, generated: int) -> np.ndarray:
        if generated <= start:
            return scores
        eos = scores[:, eos_ids]
        finite = np.isfinite(eos)
        with np.errstate(over="ignore"):  # float64's power overflows to inf where Python's float raises
            growth = np.float32(min(np.float64(factor) ** (generated - start) - 1, largest))
            known = np.where(finite, eos, 0)
            raised = np.minimum(known + np.abs(known) * growth, largest)
        scores = scores.copy()
        scores[:, eos_ids] = np.where(finite, raised, eos)
        return scores

    return apply


def remove_invalid(scores: np.ndarray, _: History, __: int) -> np.ndarray:
    """NaN becomes 0 and +-inf float32's largest and smallest (transformers' InfNanRemoveLogitsProcessor)."""
    return np.nan_to_num(scores, nan=0.0, posinf=np.finfo(scores.dtype).max, neginf=np.finfo(scores.dtype).min)


def temperature(t: float) -> Filter:
    """Scores over t. Where one overflows to +inf (a processor raised it to float32's largest:
    exponential_decay_length_penalty, remove_invalid_values; then t < 1), the row keeps those tokens alone, as the
    limit does: +inf left in made sampling's weights NaN, and float32's largest left in overflowed what follows."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        with np.errstate(over="ignore"):  # one pushed to float32's lowest goes to -inf: the same token left out
            warmed = scores / np.float32(t)
        if warmed.max() < np.inf:  # the common case, for a maximum (about what the division costs)
            return warmed
        hot = warmed == np.inf
        return np.where(hot.any(axis=-1, keepdims=True), np.where(hot, np.float32(0), np.float32(-np.inf)), warmed).astype(np.float32)

    return apply


def top_k(k: int) -> Filter:
    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        kth = np.array([[kth_largest(row, min(k, len(row)))] for row in scores], dtype=scores.dtype)
        return np.where(scores < kth, -np.inf, scores).astype(scores.dtype)

    return apply


def kth_largest(row: np.ndarray, k: int) -> np.floating:
    """The k-th largest score of a row: that of any set holding the k largest, so in a peaked row, that of the few
    scores near the top (partitioning GPT-2's whole row takes 0.3 ms here)."""
    for near in _near_top(row, row.max()):
        count = int(np.count_nonzero(near))
        if count >= k:
            return np.partition(row[near], count - k)[count - k]
    return np.partition(row, len(row) - k)[len(row) - k]


def top_p(p: float, keep: int = 1) -> Filter:
    """Keep the smallest set of most likely tokens whose probability reaches p, and at least the `keep` most likely."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        out = np.full_like(scores, -np.inf)
        for row in range(scores.shape[0]):
            kept = nucleus(scores[row], p)
            out[row, kept] = scores[row, kept]
        if keep > 1:
            out = np.where(scores >= _kth(scores, keep), scores, out)
        return out

    return apply


def top_n_sigma(n: float, keep: int = 1) -> Filter:
    """Top-nσ (Tang et al. 2024; llama.cpp's top_n_sigma): keep the tokens whose score is at least the row's highest
    minus n standard deviations of its finite scores (and the `keep` most likely). A trained model's scores are mostly
    a bell of unlikely tokens under a few far above it: the cut follows the bell's width, and it keeps the same tokens
    at any temperature (both sides scale alike). The deviation is summed in float64 (llama.cpp's in float32)."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        finite = np.isfinite(scores)
        if finite.all():  # no filter before it banned a token: numpy's own deviation, 0.1 ms over GPT-2's row (masked: 0.7)
            spread = scores.std(axis=-1, keepdims=True, dtype=np.float64)
        else:
            spread = np.array([[row[kept].std(dtype=np.float64) if kept.any() else 0.0] for row, kept in zip(scores, finite)])
        cut = scores.max(axis=-1, keepdims=True) - n * spread
        drop = (scores < cut) & (scores < _kth(scores, keep))
        return np.where(drop, -np.inf, scores).astype(scores.dtype)

    return apply


def min_p(fraction: float, keep: int = 1) -> Filter:
    """Keep the tokens at least `fraction` as likely as the row's most likely one (transformers' MinPLogitsWarper,
    llama.cpp's min-p): a cut that follows the model's confidence, where top-k's is fixed."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        probs = softmax(scores)
        return _below(scores, probs, np.float32(fraction) * probs.max(axis=-1, keepdims=True), keep)

    return apply


def typical_p(mass: float, keep: int = 1) -> Filter:
    """Locally typical sampling (transformers' TypicalLogitsWarper): keep the tokens whose information content
    is closest to the row's entropy, in that order, until they hold `mass` of the probability (at least `keep`)."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        logp = log_softmax(scores)
        distance = np.abs(-logp - _entropy(logp))
        order = np.argsort(distance, axis=-1, kind="stable")
        cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1, dtype=np.float64).astype(np.float32)
        last = np.minimum(np.maximum(np.count_nonzero(cumulative < np.float32(mass), axis=-1), keep - 1), scores.shape[-1] - 1)
        cut = np.take_along_axis(np.take_along_axis(distance, order, axis=-1), last[:, None], axis=-1)
        return np.where(distance > cut, -np.inf, scores).astype(scores.dtype)

    return apply


def epsilon_cutoff(epsilon: float, keep: int = 1) -> Filter:
    """Drop the tokens less likely than `epsilon`, the `keep` most likely always kept (transformers' EpsilonLogitsWarper)."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        return _below(scores, softmax(scores), np.float32(epsilon), keep)

    return apply


def eta_cutoff(epsilon: float, keep: int = 1) -> Filter:
    """Drop the tokens less likely than min(epsilon, sqrt(epsilon) x exp(-entropy)): a cut that loosens where the row
    is flat (transformers' EtaLogitsWarper)."""

    def apply(scores: np.ndarray, _: History, __: int) -> np.ndarray:
        logp = log_softmax(scores)
        eps = np.float32(epsilon)
        return _below(scores, np.exp(logp), np.minimum(eps, np.sqrt(eps) * np.exp(-_entropy(logp))).astype(np.float32), keep)

    return apply


def _entropy(logp: np.ndarray) -> np.ndarray:
    """Each row's entropy, from its log-probabilities (rows, 1)."""
    with np.errstate(invalid="ignore"):  # -inf x 0 for banned tokens: NaN, left out of the sum
        return -np.nansum(logp * np.exp(logp), axis=-1, keepdims=True)


def _below(scores: np.ndarray, probs: np.ndarray, cut: np.floating | np.ndarray, keep: int = 1) -> np.ndarray:
    """-inf for every token less likely than `cut`, except the row's `keep` most likely."""
    drop = (probs < cut) & (scores < _kth(scores, keep))
    return np.where(drop, -np.inf, scores).astype(scores.dtype)


def _kth(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's k-th largest score, (rows, 1): the warpers keep the scores at or above it, as transformers'
    min_tokens_to_keep (beam sampling keeps a token besides every end token per beam)."""
    if k == 1:
        return scores.max(axis=-1, keepdims=True)
    at = scores.shape[-1] - min(k, scores.shape[-1])
    return np.partition(scores, at, axis=-1)[:, at : at + 1]


def nucleus(scores: np.ndarray, p: float) -> np.ndarray:
    """The indices top_p keeps in one row, by transformers' rule: with the scores in ascending order, a token
    goes when the probability of it and of everything below it is <= 1 - p. Ties at the cut go in index
    order (torch's sort leaves their order open; the count kept is the same).

    transformers argsorts the row; the rule only needs the smallest kept score, which sorting the values
    alone finds, and in a peaked row only among the likely tokens (_likely): the rest go anyway. A trained
    model's row keeps tens to hundreds of GPT-2's 50,257 tokens, where the whole row's cut takes 1.4 ms here and
    theirs 0.25-0.3 (benchmarks/filters.py). The indices are then the scores above the cut, and the last of the ties at it.
    Only finite scores take part: after top-k that is k of them, and -inf weighs nothing anyway."""
    finite = scores > -np.inf
    live = None if finite.all() else np.flatnonzero(finite)
    values = scores if live is None else scores[live]
    top = values.max()
    cut = np.float32(1 - p)
    head, below, total = _likely(values, top, cut)
    candidates = values[head]
    ascending = np.sort(candidates)
    weights = np.exp(ascending - top)
    total = total or below + float(weights.sum(dtype=np.float64))
    # Summed in float64 as torch's CPU cumsum does, compared in float32 as transformers compares: a token goes while
    # the weight of it and of everything below it is at most 1 - p of the whole.
    removed = min(leading(weights, lambda running: (running / total).astype(np.float32) <= cut, below), len(ascending) - 1)
    floor = ascending[removed]
    ties = np.flatnonzero(candidates == floor)
    first_tie = int(np.searchsorted(ascending, floor, side="left"))
    kept = np.concatenate([np.flatnonzero(candidates > floor), ties[removed - first_tie :]])
    if not isinstance(head, slice):
        kept = head[kept]
    return kept if live is None else live[kept]


def leading(weights: np.ndarray, within: Callable[[np.ndarray], np.ndarray], start: float = 0.0, block: int = 256) -> int:
    """How many leading weights keep `within(start + their running sum)` true, the running sums in float64 and
    `within` true for a prefix of them (an inverse CDF). Summed a block at a time: over GPT-2's 50,257 float32
    weights, numpy's float64 cumsum takes 0.19 ms here, this 0.045 (the blocks' sums, then one block's cumsum)."""
    firsts = np.arange(0, len(weights), block)
    ends = start + np.cumsum(np.add.reduceat(weights, firsts, dtype=np.float64))  # the running sum at each block's end
    whole = int(np.count_nonzero(within(ends)))  # blocks wholly within
    if whole == len(firsts):
        return len(weights)
    first = whole * block
    running = (ends[whole - 1] if whole else start) + np.cumsum(weights[first : first + block], dtype=np.float64)
    return first + int(np.count_nonzero(within(running)))


def _likely(values: np.ndarray, top: np.floating, cut: np.float32) -> tuple[np.ndarray | slice, float, float]:
    """The scores near the top such that all the others together weigh at most `cut` (so they all go), that
    weight and the row's (unnormalised); or every score, 0 and 0 when no such set is small enough."""
    weights, total = None, 0.0
    for near in _near_top(values, top):
        if weights is None:
            weights = np.exp(values - top)
            total = float(weights.sum(dtype=np.float64))
        below = float(np.sum(weights, where=~near, dtype=np.float64))
        if np.float32(below / total) <= cut:
            return np.flatnonzero(near), below, total
    return slice(None), 0.0, 0.0


def _near_top(row: np.ndarray, top: np.floating) -> Iterator[np.ndarray]:
    """Masks of the scores within 4, 8, then 16 of the row's `top` score, while they are at most an eighth of it:
    in a peaked row (a trained model's), all that top-k and top-p need to look at closely; a flat row gets none.
    All scores of one value are on the same side: ties are never split."""
    for depth in (4.0, 8.0, 16.0):
        near = row >= top - np.float32(depth)
        if np.count_nonzero(near) > len(row) // 8:
            return
        yield near


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def processors_for(opts: GenerationOptions, breakers: np.ndarray | None = None) -> list[Filter]:
    """The processors the options call for, in the order transformers applies them, DRY after its repetition
    penalties (the caller's own processors run after these, then the warpers); `breakers`: DRY's sequence breakers,
    a mask over the vocabulary of the tokens that hold one (Tokenizer.holding)."""
    chain: list[Filter] = []
    biases = [((token,), b) for token, b in opts.logit_bias.items()] + list(opts.sequence_bias.items())
    if biases:
        chain.append(sequence_bias(biases))
    if opts.encoder_repetition_penalty != 1.0:
        chain.append(encoder_repetition_penalty(opts.encoder_repetition_penalty))
    if opts.repetition_penalty != 1.0:
        chain.append(repetition_penalty(opts.repetition_penalty))
    if opts.presence_penalty or opts.frequency_penalty:
        chain.append(presence_frequency(opts.presence_penalty, opts.frequency_penalty))
    if opts.dry_multiplier > 0 and opts.dry_penalty_last_n != 0:
        assert breakers is not None, "DRY needs its breakers' tokens"
        chain.append(dry(opts.dry_multiplier, opts.dry_base, opts.dry_allowed_length, opts.dry_penalty_last_n, breakers))
    if opts.no_repeat_ngram_size > 0:
        chain.append(no_repeat_ngram(opts.no_repeat_ngram_size))
    if opts.encoder_no_repeat_ngram_size > 0:
        chain.append(encoder_no_repeat_ngram(opts.encoder_no_repeat_ngram_size))
    if opts.bad_words_ids:
        chain.append(bad_words(opts.bad_words_ids, opts.eos_ids))
    if opts.min_new_tokens > 0 and opts.eos_ids:
        chain.append(min_new_tokens(opts.min_new_tokens, opts.eos_ids))
    if opts.prefix_allowed_tokens_fn is not None:
        chain.append(prefix_allowed(opts.prefix_allowed_tokens_fn, opts.num_beams, opts.pad_id))
    if opts.forced_bos_token_id is not None:
        chain.append(forced_bos(opts.forced_bos_token_id))
    if opts.forced_eos_ids:
        chain.append(forced_eos(opts.forced_eos_ids, opts.max_new_tokens))
    if opts.remove_invalid_values:
        chain.append(remove_invalid)
    if opts.exponential_decay_length_penalty is not None and opts.eos_ids:
        chain.append(exponential_decay(*opts.exponential_decay_length_penalty, opts.eos_ids))
    if opts.suppress_tokens:
        chain.append(suppress(opts.suppress_tokens))
    if opts.begin_suppress_tokens:
        chain.append(begin_suppress(opts.begin_suppress_tokens, opts.forced_bos_token_id is not None))
    return chain


def diversity_position(opts: GenerationOptions) -> int:
    """Where diverse beam search's penalty goes in processors_for's chain: after the sequence bias, as
    transformers' HammingDiversityLogitsProcessor goes in its chain (decoding.Scoring applies it there)."""
    return 1 if opts.logit_bias or opts.sequence_bias else 0


def warpers_for(opts: GenerationOptions, rng: np.random.Generator | None = None, keep: int = 1) -> list[Filter]:
    """Sampling's reshaping of the distribution: temperature, top-nσ (first of the cuts, as llama.cpp's chain has
    it), top-k, top-p, min-p, typical-p, epsilon, eta, each
    leaving at least `keep` tokens (transformers' min_tokens_to_keep), then XTC (with `rng`, the call's random numbers;
    none of them without do_sample); then, for every strategy, the watermark and the renormalisation, where asked."""
    chain: list[Filter] = []
    if opts.do_sample:
        if opts.temperature != 1.0:
            chain.append(temperature(opts.temperature))
        if opts.top_n_sigma > 0.0:
            chain.append(top_n_sigma(opts.top_n_sigma, keep))
        if opts.top_k > 0:
            chain.append(top_k(max(opts.top_k, keep)))
        if opts.top_p < 1.0:
            chain.append(top_p(opts.top_p, keep))
        if opts.min_p > 0.0:
            chain.append(min_p(opts.min_p, keep))
        if opts.typical_p < 1.0:
            chain.append(typical_p(opts.typical_p, keep))
        if opts.epsilon_cutoff > 0.0:
            chain.append(epsilon_cutoff(opts.epsilon_cutoff, keep))
        if opts.eta_cutoff > 0.0:
            chain.append(eta_cutoff(opts.eta_cutoff, keep))
        if opts.xtc_probability > 0.0:
            assert rng is not None, "XTC draws from the call's random numbers"
            chain.append(xtc(opts.xtc_probability, opts.xtc_threshold, rng))
    if opts.watermarking_config is not None:  # after all of them, as transformers' (its #34630)
        chain.append(watermark(opts.watermarking_config, opts.pad_id))
    if opts.renormalize_logits:
        chain.append(lambda scores, _h, _g: log_softmax(scores))
    return chain


def apply(chain: list[Filter], scores: np.ndarray, history: History, generated: int) -> np.ndarray:
    for f in chain:
        scores = f(scores, history, generated)
    return scores
