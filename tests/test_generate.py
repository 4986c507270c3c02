"""Decoding parity with transformers on the same weights, and the runtime's contract."""

from __future__ import annotations

import functools
import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxgen
from onnxgen import logits
from onnxgen.cache import DecodeStep
from onnxgen.cache import InPlaceCache
from onnxgen.decoding import Rows, sample, sample_distinct
from onnxgen.errors import ContextLengthError, ModelFolderError, OptionsError, ProviderError
from onnxgen.options import GenerationOptions
from onnxgen.tokenizer import TextStream, Tokenizer

PROMPTS = [[12, 40, 7, 99, 150, 3, 61], [5, 77], [200, 201, 202, 203]]  # different lengths: left padding


def hf_generate(torch_model: torch.nn.Module, prompts: list[list[int]], eos: int, **kwargs: object) -> list[list[int]]:
    """transformers' generate on a left-padded batch; returns the new tokens of each row up to its eos."""
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids, attention_mask=mask, pad_token_id=eos, eos_token_id=eos, **kwargs)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("max_new_tokens", [1, 12, 30])
def test_greedy_matches_transformers_on_a_padded_batch(model: onnxgen.Model, torch_model: torch.nn.Module, max_new_tokens: int) -> None:
    eos = model.defaults.eos_ids[0]
    ours = [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=max_new_tokens)]
    assert ours == hf_generate(torch_model, PROMPTS, eos, max_new_tokens=max_new_tokens, do_sample=False)


def test_greedy_with_filters_matches_transformers(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    eos = model.defaults.eos_ids[0]
    kw = dict(max_new_tokens=25, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5)
    ours = [c.token_ids for c in model.generate(PROMPTS[:1], **kw)]  # one row: transformers penalises pad tokens too
    assert ours == hf_generate(torch_model, PROMPTS[:1], eos, do_sample=False, **kw)


@pytest.mark.parametrize("case", ["sequence_bias", "begin_suppress_and_forced_eos", "exponential_decay", "beams_renormalized"])
def test_more_generation_config_options_match_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, case: str) -> None:
    """GenerationConfig's sequence_bias, begin_suppress_tokens, forced_eos_token_id, exponential_decay_length_penalty,
    remove_invalid_values and renormalize_logits, each aimed at the tokens plain greedy search picks so that it must act."""
    plain = model.generate(PROMPTS[:1], max_new_tokens=12)[0].token_ids
    eos = max(plain, key=plain.index)  # as the end token, the one plain search first picks last: the decay makes it come sooner
    kw: dict = {
        "sequence_bias": dict(sequence_bias={(plain[1],): -30.0, tuple(plain[4:6]): -30.0}),
        "begin_suppress_and_forced_eos": dict(begin_suppress_tokens=[plain[0]], forced_eos_token_id=plain[0]),
        "exponential_decay": dict(exponential_decay_length_penalty=(2, 4.0)),
        "beams_renormalized": dict(num_beams=3, repetition_penalty=1.5, exponential_decay_length_penalty=(3, 2.0),
                                   remove_invalid_values=True, renormalize_logits=True),
    }[case]
    ours = [c.token_ids for c in model.generate(PROMPTS[:1], max_new_tokens=12, eos_token_id=eos, pad_token_id=eos, **kw)]
    assert ours != [plain[: plain.index(eos) + 1]]  # the options changed the text
    assert ours == hf_generate(torch_model, PROMPTS[:1], eos, max_new_tokens=12, do_sample=False, **kw)


@pytest.mark.parametrize("prompts", [[[5], [9]], [[5], [9, 40, 7]], [[5]]])
def test_forced_bos_token_matches_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, prompts: list[list[int]]) -> None:
    """forced_bos_token_id, with begin_suppress_tokens: transformers forces the token first where the padded prompts are
    one token long (then bans the suppressed tokens second), and not otherwise (then bans them first); greedy and beams."""
    eos = model.defaults.eos_ids[0]
    plain = [c.token_ids for c in model.generate(prompts, max_new_tokens=6)]
    forced = 1 + max(t for row in plain for t in row)  # a token plain search does not pick
    kw = dict(max_new_tokens=6, forced_bos_token_id=forced, begin_suppress_tokens=[plain[0][0], plain[0][1]])
    ours = [c.token_ids for c in model.generate(prompts, **kw)]
    assert ours == hf_generate(torch_model, prompts, eos, do_sample=False, **kw)
    assert all(row[0] == forced for row in ours) == (max(map(len, prompts)) == 1)
    beams = [c.token_ids for c in model.generate(prompts, num_beams=2, **kw)]
    assert beams == hf_generate(torch_model, prompts, eos, do_sample=False, num_beams=2, **kw)


@pytest.mark.parametrize("options", [{}, {"num_beams": 2, "num_return_sequences": 2}, {"forced_bos_token_id": 7}])
def test_prefix_allowed_tokens_fn_matches_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, options: dict) -> None:
    """transformers' generate(prefix_allowed_tokens_fn=fn): fn(batch_id, input_ids) -> the tokens allowed next, on a
    left-padded batch (fn sees the padding, as transformers' rows hold it), with beams (batch_id: the prompt), and
    before forced_bos_token_id (which then wins where it acts: not here, the prompts being longer than a token)."""
    eos = model.defaults.eos_ids[0]
    seen: list[tuple[int, int]] = []

    def allowed(batch_id: int, input_ids: Any) -> list[int]:
        ids = [int(t) for t in input_ids]
        seen.append((batch_id, len(ids)))
        return [ids[-1] + 1, ids[-1] + 2, (ids[-1] * 7) % 300, 3 + batch_id]

    kw = dict(max_new_tokens=8, prefix_allowed_tokens_fn=allowed, **options)
    ours = [c.token_ids for c in model.generate(PROMPTS, **kw)]
    assert ours == hf_generate(torch_model, PROMPTS, eos, do_sample=False, **kw)
    assert all(length >= max(map(len, PROMPTS)) for _, length in seen)  # every row padded to the longest
    assert {b for b, _ in seen} == set(range(len(PROMPTS)))  # with beams too: each prompt's
    with pytest.raises(OptionsError, match="prefix_allowed_tokens_fn returned"):
        model.generate(PROMPTS, max_new_tokens=2, prefix_allowed_tokens_fn=lambda b, ids: [])


@pytest.mark.parametrize("options", [{"encoder_repetition_penalty": 3.0}, {"encoder_repetition_penalty": 0.3},
                                     {"encoder_no_repeat_ngram_size": 2}, {"encoder_no_repeat_ngram_size": 1}])
def test_prompt_options_match_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, options: dict) -> None:
    """encoder_repetition_penalty and encoder_no_repeat_ngram_size on a decoder-only model, as transformers' generate
    applies them to the prompt: here the prompt repeats the plain greedy text (raising or banning its tokens must act)."""
    eos = model.defaults.eos_ids[0]
    plain = model.generate(PROMPTS[:1], max_new_tokens=12, eos_token_id=None)[0].token_ids
    prompt = [PROMPTS[0] + plain[:8]]
    ours = [c.token_ids for c in model.generate(prompt, max_new_tokens=12, **options)]
    assert ours != [c.token_ids for c in model.generate(prompt, max_new_tokens=12)]  # the option changed the text
    assert ours == hf_generate(torch_model, prompt, eos, max_new_tokens=12, do_sample=False, **options)


@pytest.mark.parametrize(("num_beams", "returns", "length_penalty", "early_stopping"),
                         [(3, 1, 1.0, False), (4, 2, 1.0, True), (3, 3, 0.5, "never"), (2, 2, 2.0, False)])
def test_beam_search_matches_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, num_beams: int, returns: int,
                                          length_penalty: float, early_stopping: bool | str) -> None:
    eos = model.defaults.eos_ids[0]
    kw = dict(max_new_tokens=15, num_beams=num_beams, num_return_sequences=returns, length_penalty=length_penalty,
              early_stopping=early_stopping)
    ours = [c.token_ids for c in model.generate(PROMPTS, **kw)]
    ref = hf_generate(torch_model, PROMPTS, eos, do_sample=False, **kw)
    # transformers pads the shorter beams with pad (= eos here) after their end: compare the real tokens.
    assert ours == ref


@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(-1.0, False), (1.2, True), (-1.0, "never")])
def test_beam_search_with_ending_beams_matches_transformers(model: onnxgen.Model, torch_model: torch.nn.Module,
                                                            length_penalty: float, early_stopping: bool | str) -> None:
    """A token the model often picks serves as eos, so beams end at different steps and compete for the finished slots."""
    greedy = [t for c in model.generate(PROMPTS, max_new_tokens=15) for t in c.token_ids]
    eos = int(np.bincount(greedy).argmax())
    kw = dict(max_new_tokens=15, num_beams=4, num_return_sequences=3, early_stopping=early_stopping, length_penalty=length_penalty)
    ours = model.generate(PROMPTS, eos_token_id=eos, pad_token_id=eos, **kw)
    assert any(c.finish_reason == "eos" for c in ours)
    assert [c.token_ids for c in ours] == hf_generate(torch_model, PROMPTS, eos, do_sample=False, **kw)


def _draws_like_ours(seed: int):  # type: ignore[no-untyped-def]
    """A stand-in for torch.multinomial without replacement that draws as onnxgen's beam sampling does (one exponential
    number per score, from numpy's generator of `seed`): transformers' beam sampling and onnxgen's then see the same
    random numbers, and must agree on everything else, token for token."""
    rng = np.random.default_rng(seed)

    def multinomial(probs: torch.Tensor, num_samples: int, replacement: bool = False) -> torch.Tensor:
        assert not replacement
        exponential = rng.standard_exponential(tuple(probs.shape)).astype(np.float32)
        with np.errstate(divide="ignore"):
            keys = np.log(probs.double().numpy()) - np.log(exponential.astype(np.float64))
        return torch.from_numpy(np.argsort(-keys, axis=-1, kind="stable")[:, :num_samples].copy())

    return multinomial


@pytest.mark.parametrize("options", [
    dict(num_beams=3, num_return_sequences=2, top_k=0),
    dict(num_beams=4, num_return_sequences=3, temperature=0.6, top_k=20, top_p=0.9, length_penalty=0.5, early_stopping=True),
    # cuts that leave a beam one token: min_tokens_to_keep's second one changes the text here
    dict(num_beams=3, temperature=1.5, top_k=0, min_p=0.6, early_stopping="never"),
    dict(num_beams=2, temperature=0.7, top_k=0, top_p=0.3),
])
def test_beam_sampling_matches_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
                                            options: dict) -> None:
    """num_beams with do_sample: transformers' beam sampling (warpers keeping a token besides the end token per beam,
    2 x num_beams continuations drawn without replacement over all beams' summed scores, the beam bookkeeping of beam
    search), here on the same random numbers: transformers' draw replaced by onnxgen's own (_draws_like_ours), whose
    distribution test_sample_distinct_draws_without_replacement holds. A token the model often picks serves as eos."""
    greedy = [t for c in model.generate(PROMPTS, max_new_tokens=15) for t in c.token_ids]
    eos = int(np.bincount(greedy).argmax())
    kw = dict(max_new_tokens=15, do_sample=True, **options)
    ours = model.generate(PROMPTS, eos_token_id=eos, pad_token_id=eos, seed=7, **kw)
    monkeypatch.setattr(torch, "multinomial", _draws_like_ours(7))
    assert [c.token_ids for c in ours] == hf_generate(torch_model, PROMPTS, eos, **kw)
    beams = [c.token_ids for c in model.generate(PROMPTS, eos_token_id=eos, pad_token_id=eos, do_sample=False,
                                                  **{k: v for k, v in kw.items() if k != "do_sample"})]
    assert [c.token_ids for c in ours] != beams  # sampling changed the beams
    assert [c.token_ids for c in model.generate(PROMPTS, eos_token_id=eos, pad_token_id=eos, seed=7, **kw)] == [c.token_ids for c in ours]


def test_sample_distinct_draws_without_replacement() -> None:
    """sample_distinct's ordered draws follow sampling without replacement one draw after another: over 100,000 seeded
    rows of 4 tokens, the first draw's frequencies are the probabilities, and the second's given the first are the
    rest renormalised (within 0.01, over 2.5 standard errors); a banned (-inf) token is never drawn."""
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])  # an unlikely token drawn first is where float32 exponentials fell short
    with np.errstate(divide="ignore"):
        scores = np.tile(np.log(probs).astype(np.float32), (100000, 1))
    drawn = sample_distinct(scores, 3, np.random.default_rng(0))
    assert not (drawn == 4).any() and all(len(set(row)) == 3 for row in drawn.tolist())
    np.testing.assert_allclose(np.bincount(drawn[:, 0], minlength=5) / len(drawn), probs, atol=0.01)
    for first in range(3):
        given = drawn[drawn[:, 0] == first, 1]
        rest = probs.copy()
        rest[first] = 0
        np.testing.assert_allclose(np.bincount(given, minlength=5) / len(given), rest / rest.sum(), atol=0.01)


def test_eos_ends_a_row(model: onnxgen.Model) -> None:
    eos = model.defaults.eos_ids[0]
    first = model.generate(PROMPTS[0], max_new_tokens=1)[0].token_ids[0]
    c = model.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=[eos, first])[0]
    assert c.token_ids == [first] and c.finish_reason == "eos"
    assert model.generate(PROMPTS[0], max_new_tokens=3)[0].finish_reason in ("length", "eos")


# -- score filters against transformers' processors, on random scores --------------------------------------

def _hf(processor: object, history: list[list[int]], scores: np.ndarray) -> np.ndarray:
    ids = torch.tensor(history)
    return processor(ids, torch.from_numpy(scores.copy())).numpy()  # type: ignore[operator]


@pytest.fixture
def random_scores() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 400)).astype(np.float32) * 3


HISTORY = [[1, 2, 3, 1, 2], [7, 7, 7, 8, 9], [5, 6, 5, 6, 5], [10, 11, 12, 13, 14]]


@pytest.mark.parametrize("make", [
    lambda: (logits.temperature(0.7), "TemperatureLogitsWarper", (0.7,)),
    lambda: (logits.top_k(10), "TopKLogitsWarper", (10,)),
    lambda: (logits.top_k(1), "TopKLogitsWarper", (1,)),
    lambda: (logits.top_p(0.9), "TopPLogitsWarper", (0.9,)),
    lambda: (logits.top_p(0.05), "TopPLogitsWarper", (0.05,)),
    lambda: (logits.min_p(0.1), "MinPLogitsWarper", (0.1,)),
    lambda: (logits.min_p(0.9), "MinPLogitsWarper", (0.9,)),
    lambda: (logits.typical_p(0.9), "TypicalLogitsWarper", (0.9,)),
    lambda: (logits.typical_p(0.2), "TypicalLogitsWarper", (0.2,)),
    lambda: (logits.suppress([3, 10, 399]), "SuppressTokensLogitsProcessor", ([3, 10, 399],)),
    # [2, 3]: row 0 ends with 2; [6, 5, 4]: row 2 ends with 6, 5; [7] always; [9] is the end token, left alone
    lambda: (logits.bad_words([[2, 3], [7], [6, 5, 4], [9], [1, 1]], [9]), "NoBadWordsLogitsProcessor", ([[2, 3], [7], [6, 5, 4], [9], [1, 1]], 9)),
    lambda: (logits.repetition_penalty(1.5), "RepetitionPenaltyLogitsProcessor", (1.5,)),
    lambda: (logits.no_repeat_ngram(2), "NoRepeatNGramLogitsProcessor", (2,)),
    lambda: (logits.no_repeat_ngram(3), "NoRepeatNGramLogitsProcessor", (3,)),
    lambda: (logits.epsilon_cutoff(3e-3), "EpsilonLogitsWarper", (3e-3,)),
    lambda: (logits.epsilon_cutoff(0.5), "EpsilonLogitsWarper", (0.5,)),  # no token that likely: the top one stays
    lambda: (logits.eta_cutoff(3e-3), "EtaLogitsWarper", (3e-3,)),
    lambda: (logits.eta_cutoff(0.2), "EtaLogitsWarper", (0.2,)),
    # (2,): always; (2, 3): row 0 ends with 2; (6, 5, 4): row 2 ends with 6, 5; (8, 9, 7) nowhere; (3,) twice over
    lambda: (logits.sequence_bias([((2,), 1.5), ((2, 3), -4.0), ((6, 5, 4), 2.5), ((8, 9, 7), 9.0), ((3,), 0.5), ((3,), 0.25)]),
             "SequenceBiasLogitsProcessor", ({(2,): 1.5, (2, 3): -4.0, (6, 5, 4): 2.5, (8, 9, 7): 9.0, (3,): 0.75},)),
    lambda: (lambda scores, _h, _g: np.log(logits.softmax(scores)), "LogitNormalization", ()),
])
def test_filters_match_transformers(make, random_scores: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    import transformers.generation.logits_process as lp

    ours_filter, name, args = make()
    ours = ours_filter(random_scores, HISTORY, 5)
    ref = _hf(getattr(lp, name)(*args), HISTORY, random_scores)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert np.isneginf(ours).sum() == np.isneginf(ref).sum()


@pytest.mark.parametrize(("ours", "name", "args", "keep"), [
    (logits.top_p, "TopPLogitsWarper", (0.05,), 3),
    (logits.min_p, "MinPLogitsWarper", (0.9,), 3),
    (logits.typical_p, "TypicalLogitsWarper", (0.2,), 8),
    (logits.typical_p, "TypicalLogitsWarper", (1e-4,), 3),
    (logits.epsilon_cutoff, "EpsilonLogitsWarper", (0.5,), 3),
    (logits.eta_cutoff, "EtaLogitsWarper", (0.2,), 8),
])
def test_warpers_keep_as_many_tokens_as_transformers(ours: Any, name: str, args: tuple, keep: int, random_scores: np.ndarray) -> None:
    """min_tokens_to_keep (beam sampling's: a token besides every end token per beam), each warper set to keep fewer."""
    import transformers.generation.logits_process as lp

    got = ours(*args, keep)(random_scores, HISTORY, 5)
    ref = _hf(getattr(lp, name)(*args, min_tokens_to_keep=keep), HISTORY, random_scores)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert np.isneginf(got).sum() == np.isneginf(ref).sum()
    assert (np.isfinite(ours(*args)(random_scores, HISTORY, 5)).sum(axis=-1) < keep).any()  # without it, a row keeps fewer


@pytest.mark.parametrize(("ours", "name", "args"), [
    (logits.encoder_repetition_penalty(1.5), "EncoderRepetitionPenaltyLogitsProcessor", (1.5,)),
    (logits.encoder_repetition_penalty(0.4), "EncoderRepetitionPenaltyLogitsProcessor", (0.4,)),
    (logits.encoder_no_repeat_ngram(1), "EncoderNoRepeatNGramLogitsProcessor", (1,)),
    (logits.encoder_no_repeat_ngram(2), "EncoderNoRepeatNGramLogitsProcessor", (2,)),
    (logits.encoder_no_repeat_ngram(3), "EncoderNoRepeatNGramLogitsProcessor", (3,)),
])
def test_prompt_filters_match_transformers(ours: logits.Filter, name: str, args: tuple, random_scores: np.ndarray) -> None:
    """The "encoder" options on a decoder-only model: transformers hands them the prompt (its encoder_input_ids);
    here each row's prompt is its tokens before the `generated` last ones. Each row below ends so that a prompt
    n-gram would go on."""
    import transformers.generation.logits_process as lp

    prompts = [[1, 2, 3, 1], [7, 7, 8, 9], [5, 6, 5, 6], [10, 11, 12, 13]]
    history = [p + g for p, g in zip(prompts, [[2, 3], [7, 8], [5, 6], [14, 10]])]
    got = ours(random_scores, history, 2)
    ref = _hf(getattr(lp, name)(*args, torch.tensor(prompts)), history, random_scores)
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got, random_scores)


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
@pytest.mark.parametrize("spread", [1.0, 3.0, 4.0, 8.0])  # near-flat rows keep thousands of tokens, peaked rows a few
def test_top_p_matches_transformers_at_gpt2_vocabulary(p: float, spread: float) -> None:
    """top_p finds its cut without sorting indices, and in peaked rows without sorting the unlikely tokens at
    all: hold it to transformers where that matters, on GPT-2's 50,257 scores, alone and after top-k (where
    only k scores are finite)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = np.random.default_rng(3).normal(size=(4, 50257)).astype(np.float32) * spread
    after_top_k = _hf(TopKLogitsWarper(40), HISTORY, scores)
    for rows in (scores, after_top_k):
        ours = logits.top_p(p)(rows, HISTORY, 5)
        ref = _hf(TopPLogitsWarper(p), HISTORY, rows)
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("k", [1, 50, 2000])
@pytest.mark.parametrize("spread", [1.0, 4.0, 8.0])
def test_top_k_matches_transformers_at_gpt2_vocabulary(k: int, spread: float) -> None:
    """top_k partitions only the scores near the top when they hold the k largest (peaked rows): the same cut as
    transformers' over the whole row, ties at it included (integer scores tie by the thousand)."""
    from transformers.generation.logits_process import TopKLogitsWarper

    scores = np.random.default_rng(5).normal(size=(4, 50257)).astype(np.float32) * spread
    tied = np.round(scores)
    for rows in (scores, tied):
        np.testing.assert_array_equal(logits.top_k(k)(rows, HISTORY, 5), _hf(TopKLogitsWarper(k), HISTORY, rows))


def test_presence_and_frequency_penalties_follow_openais_formula(random_scores: np.ndarray) -> None:
    """OpenAI's definition: mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty, c[j] counting
    token j in the text generated so far; the prompt's tokens are left alone."""
    generated = 3
    ours = logits.presence_frequency(0.7, 0.25)(random_scores, HISTORY, generated)
    expected = random_scores.copy()
    for row, seen in enumerate(HISTORY):
        new = seen[-generated:]
        for token in set(new):
            expected[row, token] -= 0.25 * new.count(token) + 0.7
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert ours[3, 10] == random_scores[3, 10]  # in row 3's prompt only ([10, 11] | [12, 13, 14])
    assert ours[2, 5] == pytest.approx(random_scores[2, 5] - 0.7 - 2 * 0.25)  # generated twice ([5, 6] | [5, 6, 5])
    np.testing.assert_array_equal(logits.presence_frequency(0.7, 0.25)(random_scores, HISTORY, 0), random_scores)


def test_the_warpers_chain_in_transformers_order(random_scores: np.ndarray) -> None:
    """temperature, top-k, top-p, min-p (after temperature, as transformers and llama.cpp apply it), typical-p, epsilon, eta."""
    import transformers.generation.logits_process as lp

    options = GenerationOptions(do_sample=True, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, typical_p=0.9,
                                epsilon_cutoff=1e-3, eta_cutoff=1e-3)
    ours = logits.apply(logits.warpers_for(options), random_scores, HISTORY, 5)
    ref = random_scores
    for warper in (lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(40), lp.TopPLogitsWarper(0.95), lp.MinPLogitsWarper(0.05),
                   lp.TypicalLogitsWarper(0.9), lp.EpsilonLogitsWarper(1e-3), lp.EtaLogitsWarper(1e-3)):
        ref = _hf(warper, HISTORY, ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert np.isneginf(ours).sum() == np.isneginf(ref).sum() > np.isneginf(logits.apply(
        logits.warpers_for(GenerationOptions(do_sample=True, temperature=0.7, top_k=40, top_p=0.95)), random_scores, HISTORY, 5)).sum()


def test_top_p_keeps_as_many_tied_scores_as_transformers() -> None:
    """With ties at the cut, the same number of them stays (which ones is torch's sort's choice, not stable)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = np.random.default_rng(4).integers(-4, 4, size=(4, 2000)).astype(np.float32)
    ours = logits.top_p(0.5)(scores, HISTORY, 5)
    ref = _hf(TopPLogitsWarper(0.5), HISTORY, scores)
    kept = np.isfinite(ours)
    assert (kept.sum(axis=1) == np.isfinite(ref).sum(axis=1)).all()
    floor = np.where(kept, scores, np.inf).min(axis=1, keepdims=True)  # each row's smallest kept score
    assert kept[scores > floor].all()  # everything above it stays
    assert (~kept & (scores == floor)).any()  # and the cut does fall inside a group of ties


@pytest.mark.parametrize("generated", [0, 1, 2, 3, 4])
def test_length_dependent_processors_match_transformers(random_scores: np.ndarray, generated: int) -> None:
    """The processors that act at a given new-token count, with HISTORY read as a prompt of 5 - generated tokens
    and `generated` new ones (transformers counts from the padded prompt's length: the same count here)."""
    import transformers.generation.logits_process as lp

    prompt = 5 - generated
    cases = [(logits.exponential_decay(start, 1.7, [9, 3]), lp.ExponentialDecayLengthPenalty((start, 1.7), [9, 3], prompt)) for start in (0, 1, 3)]
    cases += [(logits.forced_eos([9, 3], new), lp.ForcedEOSTokenLogitsProcessor(prompt + new, [9, 3])) for new in (generated + 1, generated + 2)]
    cases += [(logits.begin_suppress([3, 10]), lp.SuppressTokensAtBeginLogitsProcessor([3, 10], prompt))]
    for ours, theirs in cases:
        np.testing.assert_allclose(ours(random_scores, HISTORY, generated), _hf(theirs, HISTORY, random_scores), rtol=1e-6)


def test_invalid_scores_are_removed_as_transformers_does(random_scores: np.ndarray) -> None:
    from transformers.generation.logits_process import InfNanRemoveLogitsProcessor

    scores = random_scores.copy()
    scores[0, :3], scores[1, 5], scores[2, 7] = np.nan, np.inf, -np.inf
    np.testing.assert_array_equal(logits.remove_invalid(scores, HISTORY, 0), _hf(InfNanRemoveLogitsProcessor(), HISTORY, scores))


def test_the_processor_chain_in_transformers_order(random_scores: np.ndarray) -> None:
    """Every built-in processor at once, in transformers' order: the sequence bias (with OpenAI's logit_bias) first,
    the length-dependent ones after the n-gram and word bans, the suppressions last."""
    import transformers.generation.logits_process as lp

    options = GenerationOptions(logit_bias={7: 3.0}, sequence_bias={(1, 2, 4): -2.0, (9,): 1.0}, repetition_penalty=1.3,
                                no_repeat_ngram_size=2, bad_words_ids=[[6, 5, 5]], min_new_tokens=2, eos_token_id=9,
                                exponential_decay_length_penalty=(1, 1.5), suppress_tokens=[11], begin_suppress_tokens=[12],
                                forced_eos_token_id=8, max_new_tokens=10, renormalize_logits=True)
    ours = logits.apply(logits.processors_for(options) + logits.warpers_for(options), random_scores, HISTORY, 2)
    ref = random_scores
    for processor in (lp.SequenceBiasLogitsProcessor({(7,): 3.0, (1, 2, 4): -2.0, (9,): 1.0}), lp.RepetitionPenaltyLogitsProcessor(1.3),
                      lp.NoRepeatNGramLogitsProcessor(2), lp.NoBadWordsLogitsProcessor([[6, 5, 5]], 9),
                      lp.MinNewTokensLengthLogitsProcessor(3, 2, 9), lp.ForcedEOSTokenLogitsProcessor(13, 8),
                      lp.ExponentialDecayLengthPenalty((1, 1.5), 9, 3), lp.SuppressTokensLogitsProcessor([11]),
                      lp.SuppressTokensAtBeginLogitsProcessor([12], 3), lp.LogitNormalization()):
        ref = _hf(processor, HISTORY, ref)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    assert np.isneginf(ours).sum() == np.isneginf(ref).sum() and not np.isnan(ours).any()


def test_the_length_penalty_leaves_a_banned_end_token_banned(random_scores: np.ndarray) -> None:
    """min_new_tokens not reached yet and the decay already on: transformers' scores the end token NaN (-inf + inf),
    and its greedy search picks NaN; here it stays -inf."""
    options = GenerationOptions(min_new_tokens=4, eos_token_id=9, exponential_decay_length_penalty=(1, 1.5))
    ours = logits.apply(logits.processors_for(options), random_scores, HISTORY, 2)
    assert np.isneginf(ours[:, 9]).all() and np.isfinite(np.delete(ours, 9, axis=1)).all()


def test_the_length_penalty_stays_finite_where_it_overflows(model: onnxgen.Model, random_scores: np.ndarray) -> None:
    """factor ** n past float32 (and past Python's float: transformers' raises OverflowError there): the end token's
    score stops at float32's largest, so that sampling still has weights to draw from (inf made them NaN)."""
    for generated in (40, 400):
        scores = logits.exponential_decay(0, 1e6, [9])(random_scores, HISTORY, generated)
        assert np.isfinite(scores).all() and (scores.argmax(axis=1) == 9).all()
    with np.errstate(over="raise", invalid="raise"):  # no NaN nor overflow anywhere on the way
        c = model.generate(PROMPTS[0], max_new_tokens=40, min_new_tokens=25, exponential_decay_length_penalty=(0, 1e6), do_sample=True, seed=0)[0]
    assert (len(c.token_ids), c.finish_reason) == (26, "eos")


def test_min_new_tokens_matches_transformers(random_scores: np.ndarray) -> None:
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    ref = _hf(MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=4, eos_token_id=9), HISTORY, random_scores)
    np.testing.assert_array_equal(logits.min_new_tokens(4, [9])(random_scores, HISTORY, 2), ref)


def test_sampling_draws_from_the_filtered_distribution() -> None:
    """Chi-square over 20,000 draws from a top-k + top-p filtered distribution (p < 0.001 to fail by chance)."""
    rng = np.random.default_rng(123)
    scores = np.random.default_rng(5).normal(size=(1, 30)).astype(np.float32)
    chain = logits.warpers_for(GenerationOptions(do_sample=True, temperature=0.8, top_k=12, top_p=0.9))
    filtered = logits.apply(chain, scores, [[]], 0)
    probs = logits.softmax(filtered.astype(np.float64))[0]
    draws = np.concatenate([sample(np.repeat(filtered, 1000, axis=0), rng) for _ in range(20)])
    counts = np.bincount(draws, minlength=30)
    assert counts[probs == 0].sum() == 0  # nothing outside the kept set, ever
    kept = probs > 0
    expected = probs[kept] * len(draws)
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    from scipy.stats import chi2 as chi2_dist

    assert chi2 < chi2_dist.ppf(0.999, kept.sum() - 1)


def test_seed_makes_sampling_repeat(model: onnxgen.Model) -> None:
    kw = dict(do_sample=True, top_k=0, temperature=1.0, max_new_tokens=20, seed=7, num_return_sequences=3)
    a = [c.token_ids for c in model.generate(PROMPTS, **kw)]
    assert a == [c.token_ids for c in model.generate(PROMPTS, **kw)]
    assert a != [c.token_ids for c in model.generate(PROMPTS, **{**kw, "seed": 8})]
    assert len(a) == 9 and len({tuple(t) for t in a[:3]}) > 1  # three different samples of the first prompt


# -- streaming, stop strings, the context window ---------------------------------------------------------

def test_stream_equals_generate(model: onnxgen.Model) -> None:
    text = model.generate("It is a truth", max_new_tokens=30)[0].text
    assert "".join(model.stream("It is a truth", max_new_tokens=30)) == text
    assert model.last_stats is not None and model.last_stats.new_tokens >= 1


def test_stream_never_splits_a_character(exported: Path) -> None:
    tok = Tokenizer(exported / "tokenizer.json")
    text = "Café naïve — 😀 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # the rare characters are split into byte tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)


@functools.cache
def hf_tokenizer(checkpoint: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


# Pieces of WikiText-style text (spaces before punctuation and contractions) that transformers' clean-up rewrites.
CLEAN_UP_PIECES = [" ", "'", " '", "n", " n", "'t", "t", ".", " .", "s", " s", "'s", "m", "ve", "re", " ,", ",", "!", " ?",
                   "a", " b", "é", "  ", " 've", " n't", " 'm", "word"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(CLEAN_UP_PIECES), min_size=1, max_size=12))
def test_clean_up_tokenization_spaces_as_transformers(exported: Path, checkpoint: Path, pieces: list[str]) -> None:
    """A folder whose checkpoint asks for transformers' clean_up_tokenization_spaces decodes as transformers' decode
    does, and a stream's pieces add up to it: the text after the last character no pattern holds waits for more."""
    hf = hf_tokenizer(checkpoint)
    tok = Tokenizer(exported / "tokenizer.json", clean_up_spaces=True)
    ids = [i for piece in pieces for i in tok.encode(piece)]
    stream = TextStream(tok)
    streamed = "".join(stream.push(i) for i in ids)
    whole = tok.decode(ids)
    assert whole == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert whole.startswith(streamed) and streamed == stream.text
    assert Tokenizer(exported / "tokenizer.json").decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_stop_strings_match_transformers_criterion(model: onnxgen.Model, checkpoint: Path) -> None:
    """transformers' stop_strings (StopStringCriteria, with the checkpoint's tokenizer) against onnxgen's: which token
    sequences end, over random sequences and stop strings taken from their texts (across, inside and before the last token)."""
    from transformers import AutoTokenizer
    from transformers.generation.stopping_criteria import StopStringCriteria

    from onnxgen.stopping import StopRules

    hf = AutoTokenizer.from_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    ends, spelled = 0, model.tokenizer.spell
    for _ in range(40):
        sequences = [rng.integers(0, model.tokenizer.vocab_size, rng.integers(1, 8)).tolist() for _ in range(30)]
        texts = ["".join(spelled(t) for t in seq) for seq in sequences]
        text = texts[int(rng.integers(len(texts)))]
        start = int(rng.integers(max(1, len(text) - 6)))
        stops = [text[start : start + int(rng.integers(1, 6))] or "e", str(rng.choice(["e", "th", " a", "ing", "!"]))]
        criterion, rules = StopStringCriteria(hf, stops), StopRules(frozenset(), 1, (), (), None, stop_strings=tuple(stops))
        for seq in sequences:
            expected = bool(criterion(torch.tensor([seq]), None)[0])
            assert rules.completes_stop_string(seq, spelled) == expected, (stops, seq, [spelled(t) for t in seq])
            ends += expected
    assert 50 < ends < 1100  # both kinds of case occur


def test_stop_strings_generate_as_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, checkpoint: Path) -> None:
    """Greedy on a padded batch with stop strings: each row as transformers' generate(stop_strings=..., tokenizer=...)
    ends it, the completing token kept whole (and a row no string ends runs to max_new_tokens)."""
    from transformers import AutoTokenizer

    eos = model.defaults.eos_ids[0]
    plain = model.generate(PROMPTS, max_new_tokens=24)
    stops = [plain[0].text[6:9], plain[2].text[10:12]]
    ours = model.generate(PROMPTS, max_new_tokens=24, stop_strings=stops)
    theirs = hf_generate(torch_model, PROMPTS, eos, max_new_tokens=24, do_sample=False, stop_strings=stops,
                         tokenizer=AutoTokenizer.from_pretrained(checkpoint))
    assert [c.finish_reason for c in ours].count("stop") >= 2
    for c, row in zip(ours, theirs, strict=True):
        assert c.token_ids == (row[:-1] if c.finish_reason == "stop" and row[-1] == eos else row)  # theirs pads a stopped row
        if c.finish_reason == "stop":
            assert any(s in c.text for s in stops) and c.text == model.tokenizer.decode(c.token_ids)
    assert "".join(model.stream(PROMPTS[0], max_new_tokens=24, stop_strings=stops)) == ours[0].text


def test_stop_strings_in_beam_search_as_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, checkpoint: Path) -> None:
    """Beam search with stop strings: a candidate that completes one ends as one ending in an end token does (a
    finished hypothesis, out of the running beams), as transformers' beam search treats its stopping criteria."""
    from transformers import AutoTokenizer

    eos, beams = model.defaults.eos_ids[0], {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 20, "do_sample": False}
    hf = AutoTokenizer.from_pretrained(checkpoint)
    plain = model.generate(PROMPTS, **beams)
    # Strings from the beams' own texts, and single letters, which also end candidates below the best k
    changed, reasons = 0, set()
    for stops in ([plain[0].text[4:6], plain[4].text[8:10]], [plain[2].text[3:5]], ["e"], ["a", "o"], ["t"]):
        ours = model.generate(PROMPTS, stop_strings=stops, **beams)
        theirs = hf_generate(torch_model, PROMPTS, eos, stop_strings=stops, tokenizer=hf, **beams)
        for c, row in zip(ours, theirs, strict=True):
            assert c.token_ids == (row[:-1] if c.finish_reason == "stop" and row[-1] == eos else row), stops
        changed += [c.token_ids for c in ours] != [c.token_ids for c in plain]
        reasons |= {c.finish_reason for c in ours}
    assert changed >= 4 and "stop" in reasons


def test_stop_in_beam_search_ends_where_stop_strings_do_and_cuts_the_text(model: onnxgen.Model) -> None:
    """OpenAI's stop with beam search: a candidate whose new text holds a stop string ends as with stop_strings (the
    same beams: tested against transformers above), and its text is cut before the first one (after it, with
    include_stop_str_in_output), its tokens those wholly before that point, as the generator cuts a row's."""
    beams = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 20, "do_sample": False}
    plain = model.generate(PROMPTS, **beams)
    stopped = 0
    for stops in ([plain[0].text[4:6], plain[4].text[8:10]], ["e"], ["a", "o"]):
        ended = model.generate(PROMPTS, stop_strings=stops, **beams)
        for include in (False, True):
            cut = model.generate(PROMPTS, stop=stops, include_stop_str_in_output=include, **beams)
            for c, e in zip(cut, ended, strict=True):
                assert c.finish_reason == e.finish_reason and c.score == e.score, stops
                if c.finish_reason != "stop":
                    assert (c.text, c.token_ids) == (e.text, e.token_ids)
                    continue
                begin, length = min((e.text.find(s), len(s)) for s in stops if s in e.text)
                assert c.text == e.text[: begin + length if include else begin]
                n = len(c.token_ids)
                assert c.token_ids == e.token_ids[:n] and len(model.tokenizer.decode(c.token_ids)) <= len(c.text)
                assert n == len(e.token_ids) or len(model.tokenizer.decode(e.token_ids[: n + 1])) > len(c.text)
                stopped += 1
    assert stopped >= 6
    # what a call's stats count: the tokens it returns (the last stops' beams, cut)
    g = model.generator(PROMPTS, stop=stops, **beams)
    while not g.done:
        g.step()
    assert g.stats.new_tokens == sum(len(c.token_ids) for c in g.completions()) < sum(len(e.token_ids) for e in ended)


def test_stopping_criteria_in_beam_search_as_transformers(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """A caller's stopping criterion with beam search sees every candidate (its prompt left-padded, then its new tokens)
    with the scores its token was chosen from, and a candidate it ends is a finished hypothesis (finish reason
    "stop"), as in transformers' beam search. It ends candidates on tokens that the plain beams choose, so that it acts."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    eos, beams = model.defaults.eos_ids[0], {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 16, "do_sample": False}
    plain = model.generate(PROMPTS, **beams)
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    changed, reasons = 0, set()
    for stops in ([plain[0].token_ids[12]], [plain[2].token_ids[15], plain[4].token_ids[5]], [plain[3].token_ids[0]]):
        def ours_criterion(ids: np.ndarray, scores: np.ndarray, stops: list[int] = stops) -> np.ndarray:
            seen.append((ids.shape, scores.shape))
            return np.isin(ids[:, -1], stops)

        class TheirCriterion(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, stops: list[int] = stops, **kwargs: Any) -> torch.Tensor:
                return torch.isin(input_ids[:, -1], torch.tensor(stops))

        ours = model.generate(PROMPTS, stopping_criteria=[ours_criterion], **beams)
        theirs = hf_generate(torch_model, PROMPTS, eos, stopping_criteria=StoppingCriteriaList([TheirCriterion()]), **beams)
        for c, row in zip(ours, theirs, strict=True):
            assert c.token_ids == (row[:-1] if c.finish_reason == "stop" and row[-1] == eos else row), stops  # theirs pads
            assert c.finish_reason != "stop" or c.token_ids[-1] in stops
        changed += [c.token_ids for c in ours] != [c.token_ids for c in plain]
        reasons |= {c.finish_reason for c in ours}
    assert changed == 3 and "stop" in reasons
    # 2 candidates a beam (one besides the end token), rows of the prompts' width and one more position a step
    width, candidates = max(map(len, PROMPTS)), len(PROMPTS) * 2 * beams["num_beams"]
    assert {ids[0] for ids, _ in seen} == {candidates} and {s for _, s in seen} == {(candidates, model.runtime.vocab_size)}
    assert {ids[1] for ids, _ in seen} == set(range(width + 1, width + 1 + beams["max_new_tokens"]))


def test_max_time_in_beam_search_as_transformers(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """max_time with beam search: when it is up, every candidate ends (finish reason "time") and the best finished
    beams are the results, as transformers' beam search ends them with its MaxTimeCriteria; up at the first step here."""
    eos, beams = model.defaults.eos_ids[0], {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 16, "do_sample": False}
    ours = model.generate(PROMPTS, max_time=1e-9, **beams)
    assert [c.token_ids for c in ours] == hf_generate(torch_model, PROMPTS, eos, max_time=1e-9, **beams)
    assert all(len(c.token_ids) == 1 for c in ours)
    assert {c.finish_reason for c in ours if c.token_ids != [eos]} == {"time"}
    roomy = model.generate(PROMPTS, max_time=600.0, **beams)
    assert [c.token_ids for c in roomy] == [c.token_ids for c in model.generate(PROMPTS, **beams)]
    assert "time" not in {c.finish_reason for c in roomy}


def test_stop_strings(model: onnxgen.Model) -> None:
    full = model.generate("It is a truth", max_new_tokens=30)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    c = model.generate("It is a truth", max_new_tokens=30, stop=[stop])[0]
    assert c.finish_reason == "stop" and c.text == full[: full.index(stop)]
    assert "".join(model.stream("It is a truth", max_new_tokens=30, stop=stop)) == c.text
    # vLLM's include_stop_str_in_output: the text goes on to the stop string's end; its tokens those wholly within it
    kept = model.generate("It is a truth", max_new_tokens=30, stop=[stop], include_stop_str_in_output=True)[0]
    assert kept.finish_reason == "stop" and kept.text == full[: full.index(stop) + len(stop)]
    assert model.tokenizer.decode(kept.token_ids) == kept.text[: len(model.tokenizer.decode(kept.token_ids))]
    assert len(kept.token_ids) >= len(c.token_ids)
    assert "".join(model.stream("It is a truth", max_new_tokens=30, stop=[stop], include_stop_str_in_output=True)) == kept.text
    longer = full[full.index(stop) : full.index(stop) + 4]  # two stop strings beginning at one place: the shorter ends it
    assert model.generate("It is a truth", max_new_tokens=30, stop=[longer, stop], include_stop_str_in_output=True)[0].text == kept.text


def test_context_window_is_enforced(model: onnxgen.Model) -> None:
    long_prompt = list(range(1, 121))
    with pytest.raises(ContextLengthError, match="context window of 128"):
        model.generate(long_prompt, max_new_tokens=20)
    c = model.generate(long_prompt, max_new_tokens=20, truncate_prompt=True)[0]
    assert len(c.token_ids) == 20
    assert model.last_stats is not None and model.last_stats.prompt_tokens == 108


@pytest.mark.parametrize(("options", "message"), [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"num_beams": 0}, "num_beams"), ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"num_return_sequences": 2}, "greedy"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"min_new_tokens": 50, "max_new_tokens": 10}, "min_new_tokens"), ({"temprature": 0.5}, "unknown"),
])
def test_bad_options_raise_specific_errors(model: onnxgen.Model, options: dict, message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        model.generate("Hello", **options)


def test_folder_and_provider_errors(tmp_path: Path, exported: Path, checkpoint: Path) -> None:
    with pytest.raises(ModelFolderError, match="not found: [^ ]*nope$"):
        onnxgen.load(tmp_path / "nope")
    with pytest.raises(ModelFolderError, match=r"not found: openai-community/gpt2 \(a hub id\? `onnxgen export openai-community/gpt2 -o gpt2-onnx`"):
        onnxgen.load("openai-community/gpt2")
    with pytest.raises(ModelFolderError, match="no onnxgen.json"):
        onnxgen.load(tmp_path)
    # the two folders people give instead: the checkpoint itself, and another tool's ONNX export of it
    with pytest.raises(ModelFolderError, match=f"is a transformers checkpoint, not an onnxgen model folder: export it first, "
                                               f"`onnxgen export {checkpoint} -o {checkpoint.name}-onnx`"):
        onnxgen.load(checkpoint)
    optimums = shutil.copytree(exported, tmp_path / "optimum", ignore=shutil.ignore_patterns("onnxgen.json"))
    with pytest.raises(ModelFolderError, match="holds an ONNX model but no onnxgen.json"):
        onnxgen.load(optimums)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ProviderError, match="CUDA"):
            onnxgen.load(exported, provider="cuda")


def test_generation_config_keys_onnxgen_does_not_take_are_warned_of(tmp_path: Path) -> None:
    """A folder whose generation_config.json asks for what onnxgen does not do (DoLa, constrained beam search) is
    warned of, once, naming the keys; transformers' defaults for them are not; the CLI prints it as one line."""
    import warnings

    from onnxgen import cli

    (tmp_path / "generation_config.json").write_text(json.dumps({"dola_layers": "high", "do_sample": True, "top_k": 7,
                                                                 "force_words_ids": [[5]], "penalty_alpha": 0.6, "stop_strings": "x"}))
    with pytest.warns(onnxgen.IgnoredOptionWarning, match=r"sets dola_layers='high', force_words_ids=\[\[5\]\], which onnxgen does not take"):
        options = GenerationOptions.from_folder(tmp_path)
    assert options.do_sample and options.top_k == 7 and options.stop_strings == ["x"]  # the keys it takes still count
    assert options.penalty_alpha == 0.6  # contrastive search's, taken (left unused while do_sample is on, as transformers')
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_length": 20, "dola_layers": None, "eos_token_id": 3,
                                                                 "guidance_scale": 1.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GenerationOptions.from_folder(tmp_path).guided  # taken: classifier-free guidance
    line = cli._warning_line(onnxgen.IgnoredOptionWarning("a\n  b"), onnxgen.IgnoredOptionWarning, "options.py", 1)
    assert line == "onnxgen: warning: a b\n"
    assert "UserWarning" in cli._warning_line(UserWarning("other"), UserWarning, "x.py", 1)  # other libraries': Python's


@pytest.mark.parametrize("where", ["call", "folder"])
def test_max_and_min_length_count_the_prompt_as_in_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, exported: Path,
                                                                tmp_path: Path, where: str) -> None:
    """transformers' max_length and min_length, given to a call or set in a folder's generation_config.json: lengths
    of the whole sequence, the padded prompt's included; max_new_tokens and min_new_tokens given beside them win."""
    eos = model.generate(PROMPTS[:1], max_new_tokens=2)[0].token_ids[1]  # ends the first row at its 2nd token, but for min_length
    width = max(map(len, PROMPTS))
    lengths: dict[str, Any] = {"max_length": width + 9, "min_length": width + 6}
    base = None
    if where == "folder":  # the folder's defaults, as a load reads them
        config = json.loads((exported / "generation_config.json").read_text())
        (tmp_path / "generation_config.json").write_text(json.dumps({**config, **lengths}))
        base, lengths = GenerationOptions.from_folder(tmp_path), {}
    ours = [c.token_ids for c in model.generate(PROMPTS, base, eos_token_id=eos, pad_token_id=eos, **lengths)]
    expected = hf_generate(torch_model, PROMPTS, eos, do_sample=False, max_length=width + 9, min_length=width + 6)
    assert ours == expected and max(map(len, ours)) == 9 and len(ours[0]) >= 6 and eos in ours[0]
    wins = model.generate(PROMPTS, base, max_new_tokens=3, min_new_tokens=0, eos_token_id=eos, pad_token_id=eos, **lengths)
    plain = model.generate(PROMPTS, max_new_tokens=3, eos_token_id=eos, pad_token_id=eos)
    assert [c.token_ids for c in wins] == [c.token_ids for c in plain] and len(plain[0].token_ids) == 2  # given beside them, they win
    with pytest.raises(OptionsError, match="counts the prompt"):
        model.generate(PROMPTS, max_length=width)
    with pytest.raises(ContextLengthError, match="exceeds the context window"):
        model.generate(PROMPTS, max_length=model.context_length + 1)


def test_pipeline_call_shape(exported: Path, model: onnxgen.Model) -> None:
    generator = onnxgen.pipeline("text-generation", model=str(exported))
    prompt = "It is a truth"
    out = generator(prompt, max_length=len(model.tokenizer.encode(prompt)) + 10, do_sample=False)  # the pipeline samples by default
    assert out == [{"generated_text": prompt + model.generate(prompt, max_new_tokens=10)[0].text}]
    many = generator([prompt, "Call me"], max_new_tokens=5, do_sample=True, num_return_sequences=2, seed=1)
    assert [len(x) for x in many] == [2, 2] and all(d["generated_text"].startswith(prompt) for d in many[0])
    texts = ["It is a truth", "Call me", "The", "Once upon a time"]
    alone = generator(texts, max_new_tokens=6, do_sample=False)
    calls: list[int] = []
    plain = generator.model.generate
    generator.model.generate = lambda prompts, *a, **kw: calls.append(len(prompts)) or plain(prompts, *a, **kw)  # type: ignore[method-assign]
    assert generator(texts, max_new_tokens=6, do_sample=False, batch_size=3) == alone and calls == [3, 1]  # fp32: batches change no token
    generator.model.generate = plain  # type: ignore[method-assign]
    assert [x[0]["generated_text"] for x in alone] == [t + c.text for t, c in zip(texts, model.generate(texts, max_new_tokens=6))]
    ids = generator(prompt, max_new_tokens=4, do_sample=False, return_tensors=True)
    assert ids == [{"generated_token_ids": model.tokenizer.encode(prompt) + model.generate(prompt, max_new_tokens=4)[0].token_ids}]
    for bad in (0, 2.5, True):
        with pytest.raises(OptionsError, match="batch_size"):
            generator(prompt, batch_size=bad)
    for bad_input in (5, None, [], ["a", None], [{"role": "user", "content": "a"}, "b"]):  # 5 was a TypeError
        with pytest.raises(OptionsError, match="a string, a list of strings, a chat"):
            generator(bad_input)
    with pytest.raises(OptionsError, match="has no chat template"):  # the tiny model has none (tests/test_chat.py has one)
        generator([{"role": "user", "content": "a"}])


def test_pipeline_takes_options_for_every_call(exported: Path, model: onnxgen.Model) -> None:
    """transformers' pipeline(..., max_new_tokens=5, do_sample=False, batch_size=2): generation options and call
    parameters given once for every call; a call's own go over them; what is neither is refused at once."""
    generator = onnxgen.pipeline("text-generation", model=exported, max_new_tokens=5, do_sample=False, return_full_text=False)
    texts = ["It is a truth", "Call me"]
    assert generator(texts) == [[{"generated_text": c.text}] for c in model.generate(texts, max_new_tokens=5, do_sample=False)]
    assert generator("Call me", max_new_tokens=3, return_full_text=True) == [
        {"generated_text": "Call me" + model.generate("Call me", max_new_tokens=3, do_sample=False)[0].text}]
    lengths = onnxgen.pipeline("text-generation", model=exported, max_length=len(model.tokenizer.encode("Call me")) + 4, seed=1)
    assert len(lengths("Call me", return_tensors=True, eos_token_id=None)[0]["generated_token_ids"]) == len(model.tokenizer.encode("Call me")) + 4
    with pytest.raises(OptionsError, match="unknown generation option.*torch_dtype"):
        onnxgen.pipeline("text-generation", model=exported, torch_dtype="float16")
    # beams over the pipeline's sampling default: beam sampling at its temperature, as transformers' pipeline runs it
    beams = onnxgen.pipeline("text-generation", model=exported, num_beams=3, max_new_tokens=4)
    sampled_beams = [{"generated_text": "Call me" + model.generate(
        "Call me", num_beams=3, max_new_tokens=4, do_sample=True, temperature=0.7, seed=2)[0].text}]
    assert beams("Call me", seed=2) == sampled_beams
    # asked for by the call, the same (it was beam search: generate's rule for a sampling default, another text here)
    by_call = onnxgen.pipeline("text-generation", model=exported, max_new_tokens=4)("It is a truth", num_beams=3, seed=2)
    assert by_call == [{"generated_text": "It is a truth" + model.generate(
        "It is a truth", num_beams=3, max_new_tokens=4, do_sample=True, temperature=0.7, seed=2)[0].text}]
    assert by_call != [{"generated_text": "It is a truth" + model.generate("It is a truth", num_beams=3, max_new_tokens=4)[0].text}]


def test_the_pipelines_defaults_are_transformers_pipelines(checkpoint: Path, exported: Path, tmp_path: Path) -> None:
    """transformers' text-generation pipeline samples at temperature 0.7 for up to 256 new tokens over the model's
    own generation options (a model's max_length in place of the 256), then applies the checkpoint's
    task_specific_params (gpt2's: sampling, max_length 50): onnxgen's pipeline resolves the same options from the
    same files; and it keeps the 256 within the context window, where transformers' runs past it."""
    import transformers

    from onnxgen import manifest

    source, folder = shutil.copytree(checkpoint, tmp_path / "ckpt"), shutil.copytree(exported, tmp_path / "onnx")
    base = {k: json.loads((checkpoint / "generation_config.json").read_text())[k] for k in ("bos_token_id", "eos_token_id")}
    config = json.loads((checkpoint / "config.json").read_text())
    cases = [({}, None), ({"max_length": 40, "temperature": 0.9, "do_sample": False, "top_k": 5}, None),
             ({"max_new_tokens": 12, "top_p": 0.8, "repetition_penalty": 1.3}, None),
             ({}, {"do_sample": True, "max_length": 50}), ({"num_beams": 3}, None),
             ({"max_length": 40}, {"do_sample": False, "max_length": 50, "temperature": 0.5})]
    names = ("do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty")
    for generation, task in cases:
        for f in (source, folder):
            (f / "generation_config.json").write_text(json.dumps({**base, **generation}))
            (f / "config.json").write_text(json.dumps({**config, **({"task_specific_params": {"text-generation": task}} if task else {})}))
        manifest.write(folder, manifest.read(folder))
        theirs = transformers.pipeline("text-generation", model=str(source)).generation_config
        mine = onnxgen.pipeline("text-generation", model=folder).defaults
        length = ("max_new_tokens", theirs.max_new_tokens) if theirs.max_new_tokens is not None else ("max_length", theirs.max_length)
        assert (length, *(getattr(mine, n) for n in names)) == ((length[0], getattr(mine, length[0])), *(getattr(theirs, n) for n in names)), (generation, task)
    generator = onnxgen.pipeline("text-generation", model=folder)  # the last case: max_length 50, greedy
    model = generator.model
    prompt = "It is a truth"
    assert generator(prompt) == [{"generated_text": prompt + model.generate(prompt, max_length=50, do_sample=False)[0].text}]
    for generation in ({}, {"max_length": 40}):  # the 256 new tokens past a context of 128, then a model's max_length
        (folder / "generation_config.json").write_text(json.dumps({**base, **generation}))
        (folder / "config.json").write_text(json.dumps(config))
        manifest.write(folder, manifest.read(folder))
        generator = onnxgen.pipeline("text-generation", model=folder)
        for text in (prompt, ""):  # an empty prompt is the beginning-of-text token
            (ids,) = generator(text, return_tensors=True, eos_token_id=None, seed=0)
            assert len(ids["generated_token_ids"]) == generation.get("max_length", model.context_length)


def test_runtime_never_imports_the_export_stack(exported: Path) -> None:
    code = (
        "import sys, onnxgen\n"
        f"m = onnxgen.load({str(exported)!r}, threads=1)\n"
        "m.generate('Hello', max_new_tokens=3); list(m.stream('Hello', max_new_tokens=3))\n"
        "m.generate('Hello', max_new_tokens=3, num_beams=2)\n"
        "heavy = [x for x in ('torch', 'transformers', 'optimum', 'onnx') if x in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_generate(exported: Path, model: onnxgen.Model) -> None:
    expected = model.generate("It is a truth", max_new_tokens=15, do_sample=False)[0].text
    base = [sys.executable, "-m", "onnxgen", "generate", "It is a truth", "--model", str(exported), "--max-new-tokens", "15"]
    r = subprocess.run(base + ["--strategy", "greedy", "--stats"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "tok/s" in r.stderr and "time to first token" in r.stderr
    r = subprocess.run(base + ["--strategy", "beam", "--num-return-sequences", "2", "--json"], capture_output=True, text=True)
    result = json.loads(r.stdout)
    assert len(result["completions"]) == 2 and result["stats"]["new_tokens"] > 0
    # an alternative top_k left out: -inf, which JSON cannot hold (it wrote -Infinity), written as -9999.0 (vLLM's)
    r = subprocess.run(base + ["--strategy", "top-k", "--top-k", "1", "--logprobs", "2", "--seed", "1", "--json"], capture_output=True, text=True)
    written = json.loads(r.stdout, parse_constant=lambda constant: pytest.fail(f"not JSON: {constant}"))["completions"][0]
    expected_sampled = model.generate("It is a truth", max_new_tokens=15, do_sample=True, top_k=1, top_p=1.0, seed=1, logprobs=2)[0]
    assert written["logprobs"] == pytest.approx(expected_sampled.logprobs)
    assert all(sorted(top.values()) == [-9999.0, pytest.approx(0.0)] for top in written["top_logprobs"])
    r = subprocess.run(base + ["--strategy", "top-p", "--top-p", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == "onnxgen: error: top_p must be in (0, 1], got 2.0\n"
    guided = model.generate("It is a truth", max_new_tokens=15, do_sample=False, guidance_scale=3.0, negative_prompt="Call me")[0].text
    assert guided != expected
    r = subprocess.run(base + ["--strategy", "greedy", "--guidance-scale", "3", "--negative-prompt", "Call me"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == guided + "\n", r.stderr
    # a preset's do_sample with --num-beams: beam sampling
    sampled = model.generate("It is a truth", max_new_tokens=15, seed=1, **onnxgen.STRATEGIES["top-k"] | {"num_beams": 3})[0].text
    r = subprocess.run(base + ["--strategy", "top-k", "--num-beams", "3", "--seed", "1"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == sampled + "\n", r.stderr


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shipped_row_graphs_are_what_graph_py_makes(dtype: str) -> None:
    import onnx

    from onnxgen.graph import copy_model, select_rows_model, zeros_model
    from onnxgen.runtime import COPY, GRAPHS, SELECT_ROWS, ZEROS

    for shipped, make in ((SELECT_ROWS, select_rows_model), (COPY, copy_model), (ZEROS, zeros_model)):
        on_disk = onnx.load(str(GRAPHS / shipped[np.dtype(dtype)]))
        made = make(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        assert on_disk.graph == made.graph and on_disk.opset_import == made.opset_import


def test_zero_writes_over_a_buffer_where_it_lives(model: onnxgen.Model) -> None:
    """What a new CUDA cache gets (the zeros graph, its output bound to the buffer): run here on a host buffer."""
    rt = model.runtime
    array = np.full((6, 4, 9, 16), np.nan, rt.cache_dtype)
    value = rt.ort.OrtValue.ortvalue_from_numpy(array)
    rt.zero(value)
    assert not array.any() and not np.isnan(array).any()


@pytest.mark.parametrize("layout", ["in place", "growing"])
def test_device_reorder_moves_the_same_rows_as_the_host_one(exported: Path, exported_growing: Path, layout: str) -> None:
    """Beam search's reorder on CUDA (Gather where the cache lives; in place, every layer's rows in one run,
    copied back into the same buffer) against the CPU one (numpy), both run here on the CPU provider."""
    rt = onnxgen.load(exported if layout == "in place" else exported_growing, threads=1).runtime
    host, device = rt.new_cache(len(PROMPTS), 16), rt.new_cache(len(PROMPTS), 16)
    host.prefill(PROMPTS), device.prefill(PROMPTS)
    rows = np.array([2, 0, 0])
    if layout == "in place":
        def layers(cache: InPlaceCache) -> np.ndarray:  # (layer, row, head, position, head size)
            return cache.buffer.numpy().reshape(-1, *cache.shape)

        before = layers(host).copy()  # on CPU, numpy() shares the memory
        host.reorder(rows)
        address = device.buffer.data_ptr()
        n = len(rt.past_names)
        rt.move_rows(device.buffer, (np.arange(n)[:, None] * len(rows) + rows).reshape(-1))
        assert device.buffer.data_ptr() == address  # the buffer stays put (the decode step has it bound)
        got_host, got_device = layers(host), layers(device)
        for row, source in enumerate(rows):
            written = slice(None, len(PROMPTS[source]))  # the positions the source row has written
            want = before[:, source, :, written]
            assert np.array_equal(got_host[:, row, :, written], want)
            assert np.array_equal(got_device[:, row, :, written], want)
        return
    before = [value.numpy().copy() for value in host.values]
    host.reorder(rows)
    device.values = rt.select_rows(device.values, rows)
    for got_host, got_device, old in zip(host.values, device.values, before):
        for row, source in enumerate(rows):
            assert np.array_equal(got_host.numpy()[row], old[source])
            assert np.array_equal(got_device.numpy()[row], old[source])


def test_a_prompts_rows_share_one_prompt_pass(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beams and return sequences: a prompt's pass runs on one row and its other rows copy it (InPlaceCache.spread);
    a reorder then copies a moved row only past the positions it holds alike with its source. (That the tokens stay
    transformers' is the parity tests' to say.)"""
    passes: list[tuple[int, ...]] = []
    run = InPlaceCache._run

    def counted(cache: InPlaceCache, ids: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        passes.append(ids.shape)
        return run(cache, ids, *args, **kwargs)

    monkeypatch.setattr(InPlaceCache, "_run", counted)
    model.generate(PROMPTS, num_beams=3, max_new_tokens=4)
    model.generate(PROMPTS, do_sample=True, num_return_sequences=2, max_new_tokens=4, seed=1)
    assert passes == [(1, len(p)) for p in PROMPTS] * 2  # one row a prompt (of different lengths: a pass each)

    cache = model.runtime.new_cache(4, 16)
    cache.prefill(PROMPTS[1:])
    cache.spread(2)
    layers = cache.layers()
    assert cache.lengths.tolist() == [len(PROMPTS[1])] * 2 + [len(PROMPTS[2])] * 2
    assert np.array_equal(layers[:, 0, :, :2], layers[:, 1, :, :2]) and np.array_equal(layers[:, 2, :, :4], layers[:, 3, :, :4])
    cache.lengths[:] += 3  # three tokens each (what decode steps write)
    layers[:, 3] = 7.0  # a beam's positions that its source's replace, past what both hold alike only
    cache.reorder(np.array([0, 1, 2, 2]), np.array([0, 0, 0, 5]))
    assert (layers[:, 3, :, :5] == 7.0).all() and np.array_equal(layers[:, 3, :, 5:7], layers[:, 2, :, 5:7])
    cache.reorder(np.array([0, 2, 2, 3]))  # nothing said alike (a row moved into a cleared one): copied whole
    assert np.array_equal(layers[:, 1, :, :7], layers[:, 2, :, :7])


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_beams_hold_their_common_history_alike(mode: str, exported: Path, quantized_folder: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows.alike, what a reorder leaves in place, is what the rows hold bit for bit: after every reorder of beam
    search (a prompt's beams on several prompts; int8's one activation scale a run spans every row), each two rows of
    a prompt hold the same keys and values over their common history. Skipping those copies changes no score, and
    copies far fewer positions."""
    model = onnxgen.load(exported if mode == "fp32" else quantized_folder(mode), threads=1)
    advance, reorder = Rows.advance, InPlaceCache.reorder
    copied: list[int] = []

    def watched(rows: Rows, tokens: np.ndarray, source: np.ndarray | None = None) -> None:
        advance(rows, tokens, source)
        if source is None:
            return
        cache = rows._cache
        assert isinstance(cache, InPlaceCache)
        layers = cache.layers()
        for a in range(cache.rows):
            for b in range(cache.rows):
                if a // 4 == b // 4:  # 4 beams a prompt
                    held = int(rows.alike(np.array([b if r == a else r for r in range(cache.rows)]))[a])
                    held = min(held, int(cache.lengths[a]))  # the token just chosen is not written yet
                    assert np.array_equal(layers[:, a, :, :held], layers[:, b, :, :held]), (a, b, held)

    def counting(cache: InPlaceCache, source: np.ndarray, alike: np.ndarray | None = None) -> None:
        moved = np.flatnonzero(source != np.arange(cache.rows))
        starts = np.zeros(len(moved), np.int64) if alike is None else alike[moved]
        copied.append(int(np.maximum(cache.lengths[source[moved]] - starts, 0).sum()))
        reorder(cache, source, alike)

    monkeypatch.setattr(Rows, "advance", watched)
    monkeypatch.setattr(InPlaceCache, "reorder", counting)
    options = {"num_beams": 4, "num_return_sequences": 4, "max_new_tokens": 24, "min_new_tokens": 24}
    skipped = model.generate(PROMPTS[:2], **options)
    skipped_copies = sum(copied)
    copied.clear()
    monkeypatch.setattr(Rows, "alike", lambda rows, source: np.zeros(len(source), np.int64))
    whole = model.generate(PROMPTS[:2], **options)
    assert [c.token_ids for c in skipped] == [c.token_ids for c in whole]
    assert [c.score for c in skipped] == [c.score for c in whole]  # bit for bit
    assert skipped_copies < sum(copied) / 2, (skipped_copies, sum(copied))


def test_rows_of_different_lengths_need_no_padding(exported: Path, exported_growing: Path, torch_model: torch.nn.Module) -> None:
    """The in-place cache runs each prompt at its own length (no padding anywhere): the same tokens as the
    growing cache's left-padded batch and as each prompt alone, for greedy, sampling and beams."""
    inplace, growing = onnxgen.load(exported, threads=1), onnxgen.load(exported_growing, threads=1)
    for options in ({"do_sample": False}, {"do_sample": True, "seed": 5, "top_k": 30, "num_return_sequences": 2},
                    {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}):
        got = [c.token_ids for c in inplace.generate(PROMPTS, max_new_tokens=15, **options)]
        assert got == [c.token_ids for c in growing.generate(PROMPTS, max_new_tokens=15, **options)]
        if not options.get("do_sample"):
            alone = [c.token_ids for p in PROMPTS for c in inplace.generate([p], max_new_tokens=15, **options)]
            assert got == alone


def test_the_cache_is_as_long_as_the_call_needs(model: onnxgen.Model) -> None:
    """One buffer for every layer's key and value, allocated once at the longest prompt + max_new_tokens (never
    the whole context window), and still the same memory at the end of the call."""
    generator = model.generator(PROMPTS, max_new_tokens=9, do_sample=False)
    generator.step()  # the prompt pass makes it
    cache = generator.rows._cache
    rows = 2 * model.dims.n_layer * len(PROMPTS)
    assert cache.buffer.shape() == [rows, model.dims.n_head, max(map(len, PROMPTS)) + 9, model.dims.head_dim]
    address = cache.buffer.data_ptr()
    while not generator.done:
        generator.step()
    assert cache.buffer.data_ptr() == address
    assert cache.lengths.tolist() == [len(p) + 8 for p in PROMPTS]  # the last token is chosen, not run


def test_a_calls_cache_goes_when_the_call_ends(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freed by its last reference, not later by Python's cycle collector: a cache kept past its call (its decode
    steps held it, and it held them) met the next calls' (gpt2-large at batch 8 x 512: 1,800 MiB each; five calls left 10,423 MiB)."""
    made: list[weakref.ref[InPlaceCache]] = []
    init = InPlaceCache.__init__

    def recorded(cache: InPlaceCache, *args: Any) -> None:
        init(cache, *args)
        made.append(weakref.ref(cache))

    monkeypatch.setattr(InPlaceCache, "__init__", recorded)
    gc.collect()
    gc.disable()
    try:
        for options in ({"do_sample": False}, {"num_beams": 2}, {"do_sample": True, "num_return_sequences": 2}):
            model.generate(PROMPTS, max_new_tokens=3, **options)
        assert "".join(model.stream(PROMPTS[0], max_new_tokens=3))
        live = [ref() for ref in made]
    finally:
        gc.enable()
    assert len(made) == 4 and live == [None] * 4


@pytest.mark.parametrize("layout", ["in place", "growing"])
def test_passes_over_prompts_give_the_arena_back_and_decode_steps_keep_it(exported: Path, exported_growing: Path, layout: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's CPU arena keeps what a run grew it by: after a long prompt's pass, its activations' memory (gpt2-large
    at batch 8 x 512: 800 MiB, benchmarks/arena.py). Passes over prompts, guesses and scored text shrink it after them;
    decode steps, which reuse the same memory every step, do not."""
    model = onnxgen.load(exported if layout == "in place" else exported_growing, threads=1)
    session, shrunk = model.runtime.session, []

    def shrinks(options: Any) -> bool:
        try:
            return options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
        except RuntimeError:  # no such entry
            return False

    run_bound, run_fed = session.run_with_iobinding, session.run
    monkeypatch.setattr(session, "run_with_iobinding", lambda io, options=None: (shrunk.append(shrinks(options)), run_bound(io, options))[1])
    monkeypatch.setattr(session, "run", lambda names, feed, options=None: (shrunk.append(shrinks(options)), run_fed(names, feed, options))[1])
    model.generate(PROMPTS, max_new_tokens=4, do_sample=False, eos_token_id=None)
    # The prompt passes (in place, one a prompt length), then three steps (the fourth token is chosen, not run)
    assert shrunk == [True] * (len(PROMPTS) if layout == "in place" else 1) + [False] * 3
    shrunk.clear()
    model.score(["It is a truth universally acknowledged"])
    assert shrunk == [True]
    if layout == "in place":  # guesses (prompt lookup's, a draft model's) run as a pass over several tokens
        cache = model.runtime.new_cache(1, 16)
        cache.prefill([PROMPTS[0]])
        cache.append([5, 6, 7])  # type: ignore[union-attr]
        assert shrunk == [True, True, True]


@pytest.mark.parametrize("layout", ["in place", "growing"])
def test_every_run_names_its_cuda_graph(exported: Path, exported_growing: Path, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run's options name a CUDA graph (-1, none, on the CPU): onnxruntime's Python wrapper reads gpu_graph_id at
    each run_with_iobinding, and options without it cost a raised and caught RuntimeError a step (24 us; the bundled
    model decoded 1.19x faster without it, benchmarks/results/run-options.md)."""
    model = onnxgen.load(exported if layout == "in place" else exported_growing, threads=1)
    session, named = model.runtime.session, []
    run_bound = session.run_with_iobinding

    def run(io: Any, options: Any = None) -> None:
        named.append(options.get_run_config_entry("gpu_graph_id"))  # raises where the options lack it
        run_bound(io, options)

    monkeypatch.setattr(session, "run_with_iobinding", run)
    model.generate(PROMPTS, max_new_tokens=4, do_sample=False, eos_token_id=None)
    model.generate(PROMPTS[0], max_new_tokens=4, num_beams=2)
    assert named and set(named) == {"-1"}


def test_cuda_graph_needs_cuda(exported: Path) -> None:
    with pytest.raises(OptionsError, match="CUDA provider"):
        onnxgen.load(exported, cuda_graph=True)


def test_cuda_graph_cache_pool_keeps_recent_shapes_within_its_bound(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph cache pool's bookkeeping, on the CPU (tests/test_cuda.py replays real graphs on a GPU):
    a finished call's cache goes to the next call of its shape, a call dropped mid-way hands its cache back
    too, and past IDLE_CACHE_BYTES the least recently finished caches go first. The CPU runtime is told it
    captures graphs, which makes its decode steps bind what a captured step binds (total = capacity)."""
    import gc

    from onnxgen import runtime as runtime_module

    model, plain = onnxgen.load(exported, threads=1), onnxgen.load(exported, threads=1)
    model.runtime.cuda_graph = True
    greedy = {"max_new_tokens": 6, "do_sample": False}
    first = [c.token_ids for c in model.generate(PROMPTS, **greedy)]
    assert first == [c.token_ids for c in plain.generate(PROMPTS, **greedy)]
    pooled = model.runtime._idle[-1]
    assert len(model.runtime._idle) == 1 and pooled.capacity % 64 == 0
    assert [c.token_ids for c in model.generate(PROMPTS, **greedy)] == first and model.runtime._idle == [pooled]

    dropped = model.generator(PROMPTS, **greedy)
    dropped.step()
    assert model.runtime._idle == []  # the only cache of this shape is in use
    del dropped
    gc.collect()
    assert model.runtime._idle == [pooled]

    monkeypatch.setattr(runtime_module, "IDLE_CACHE_BYTES", pooled.nbytes)  # room for rows adding up to 3
    for rows in (1, 2):
        model.generate(PROMPTS[:rows], **greedy)
    assert [c.rows for c in model.runtime._idle] == [1, 2]  # the 3-row cache went when the 1-row one came
    model.generate(PROMPTS, **greedy)
    assert [c.rows for c in model.runtime._idle] == [3]


def decode_at_totals(runtime: object) -> list[np.ndarray]:
    """One decode step of PROMPTS with total_sequence_length at the longest row's length, then at the buffer's
    capacity (what a CUDA graph binds, for every step): each row's length is in seqlens_k either way."""
    scores = []
    for at_capacity in (False, True):
        cache = runtime.new_cache(len(PROMPTS), 32)  # type: ignore[attr-defined]
        cache.prefill(PROMPTS)
        total = cache.capacity if at_capacity else int(cache.lengths.max()) + 1
        scores.append(DecodeStep(cache, len(PROMPTS)).run(np.array([[1], [2], [3]]), cache.lengths[:, None], cache.lengths.astype(np.int32), total,
                                                          cache.adapters))
    return scores


def test_decode_reads_each_row_only_to_its_length(model: onnxgen.Model) -> None:
    longest, capacity = decode_at_totals(model.runtime)
    assert np.abs(longest - capacity).max() < 1e-5


def test_top_k_graph_selects_what_numpy_sorts(model: onnxgen.Model) -> None:
    """Beam search's selections (graph.top_k_model, shipped in onnxgen/graphs): the k largest per row, best
    first, equal scores by lower index, as a stable sort of the negated scores orders them."""
    import onnx

    from onnxgen.graph import top_k_model
    from onnxgen.runtime import GRAPHS, TOP_K

    on_disk = onnx.load(str(GRAPHS / TOP_K))
    assert on_disk.graph == top_k_model().graph
    scores = np.random.default_rng(3).standard_normal((5, 3000)).astype(np.float32)
    scores[:, 100:110] = 9.0  # ties at the top
    want = np.argsort(-scores, axis=-1, kind="stable")[:, :12]
    assert np.array_equal(model.runtime.top_k(scores, 12), want)
