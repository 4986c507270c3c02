"""DRY, XTC and top-nσ (logits.dry, logits.xtc, logits.top_n_sigma): the local-model samplers llama.cpp's server and
text-generation-webui offer, which transformers does not. DRY is held to its definition, written out here one match
at a time; XTC to its rule; top-nσ to its definition."""

from __future__ import annotations

import statistics
from collections import Counter

import numpy as np
import pytest

import onnxgen
from onnxgen import logits
from onnxgen.errors import OptionsError


def dry_by_definition(scores: np.ndarray, tokens: list[int], multiplier: float, base: float, allowed: int, last_n: int,
                      breakers: np.ndarray) -> np.ndarray:
    """For every earlier occurrence of the last token, the repeat ending there, followed back token by token (not
    across a breaker, at most 50): the token after it loses multiplier x base ** (n - allowed) for its longest n."""
    seen = tokens[-last_n:] if last_n > 0 else tokens
    out, longest = scores.copy(), {}
    if len(seen) < 2 or breakers[seen[-1]]:
        return out
    for i in range(len(seen) - 1):
        if seen[i] != seen[-1] or breakers[seen[i + 1]]:
            continue
        n = 1
        while n < 50 and i - n >= 0 and seen[i - n] == seen[-1 - n] and not breakers[seen[-1 - n]]:
            n += 1
        longest[seen[i + 1]] = max(longest.get(seen[i + 1], 0), n)
    for token, n in longest.items():
        if n >= allowed:
            out[token] -= np.float32(multiplier) * np.float32(base) ** np.float32(n - allowed)
    return out


def test_dry_lowers_what_would_extend_a_repeat() -> None:
    """A B C D A B C: D would make "A B C" a repeat of 3 (penalised), and nothing else follows a C."""
    breakers = np.zeros(10, bool)
    scores = np.zeros((1, 10), np.float32)
    out = logits.dry(0.8, 1.75, 2, -1, breakers)(scores, [[0, 1, 2, 3, 0, 1, 2]], 0)
    assert out[0, 3] == pytest.approx(-0.8 * 1.75 ** (3 - 2)) and np.count_nonzero(out) == 1
    breakers[1] = True  # B holds a breaker: the repeat stops at it, C alone is 1 < 2
    assert not logits.dry(0.8, 1.75, 2, -1, breakers)(scores, [[0, 1, 2, 3, 0, 1, 2]], 0).any()


@pytest.mark.parametrize("seed", range(40))
def test_dry_is_its_definition(seed: int) -> None:
    """Random texts over a small vocabulary (many repeats, some of them long), random settings: every score as the
    definition gives it."""
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(3, 12))
    motif = rng.integers(0, vocab, int(rng.integers(2, 9))).tolist()
    rows = [(motif * int(rng.integers(1, 5)) + rng.integers(0, vocab, int(rng.integers(0, 30))).tolist() + motif)[: int(rng.integers(1, 80))]
            for _ in range(3)]
    breakers = rng.random(vocab) < 0.15
    settings = (float(rng.uniform(0.1, 2)), float(rng.uniform(1, 3)), int(rng.integers(1, 5)), int(rng.choice([-1, 5, 20])))
    scores = rng.normal(size=(3, vocab)).astype(np.float32)
    got = logits.dry(*settings, breakers)(scores, rows, 0)
    expected = np.stack([dry_by_definition(scores[r], rows[r], *settings, breakers) for r in range(3)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_xtc_removes_the_likely_tokens_but_the_least_likely_of_them() -> None:
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.95, 0.03, 0.01, 0.01]], np.float32)
    scores = np.log(probs)
    out = logits.xtc(1.0, 0.1, np.random.default_rng(0))(scores, [[], []], 0)
    assert np.isneginf(out[0, :2]).all() and (out[0, 2:] == scores[0, 2:]).all()  # 0.15 is the least likely of those >= 0.1
    assert (out[1] == scores[1]).all()  # one token at >= 0.1: nothing to exclude
    draws = np.random.default_rng(7).random(50)  # with probability 0.5, a row is cut where its draw is below it
    cut = logits.xtc(0.5, 0.1, np.random.default_rng(7))(np.repeat(scores[:1], 50, axis=0), [[]] * 50, 0)
    assert (np.isneginf(cut[:, 0]) == (draws < 0.5)).all() and 10 < np.count_nonzero(draws < 0.5) < 40


def top_n_sigma_by_definition(row: np.ndarray, n: float) -> set[int]:
    """The tokens top-nσ keeps: score >= the best - n x the population deviation of the finite scores."""
    finite = [float(v) for v in row if np.isfinite(v)]
    cut = max(finite) - n * statistics.pstdev(finite)
    return {i for i, v in enumerate(row.tolist()) if v >= cut}


@pytest.mark.parametrize("seed", range(4))
def test_top_n_sigma_is_its_definition(seed: int) -> None:
    """Rows of a bell of unlikely scores under a few likely ones, some banned (-inf, left out of the deviation); the
    same tokens kept at another temperature; `keep` (beam sampling's) keeps at least that many."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 2, (6, 500)).astype(np.float32)
    scores[:, :5] += rng.uniform(5, 12, (6, 5)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    short = rng.normal(0, 2, (40, 12)).astype(np.float32)  # few scores: the population's deviation, not the sample's
    for n in (0.5, 1.0, 2.5):
        for rows in (scores, short):
            out = logits.top_n_sigma(n)(rows, [[]] * len(rows), 0)
            assert all(set(np.flatnonzero(o > -np.inf).tolist()) == top_n_sigma_by_definition(r, n) for o, r in zip(out, rows))
        out = logits.top_n_sigma(n)(scores, [[]] * 6, 0)
        for row in range(6):
            kept = set(np.flatnonzero(out[row] > -np.inf).tolist())
            assert kept == top_n_sigma_by_definition(scores[row], n)
            assert (out[row, sorted(kept)] == scores[row, sorted(kept)]).all()
        warmed = logits.top_n_sigma(n)(scores / np.float32(0.7), [[]] * 6, 0)
        assert (np.isneginf(warmed) == np.isneginf(out)).all()
    narrow = logits.top_n_sigma(0.01, keep=3)(scores, [[]] * 6, 0)
    assert (np.count_nonzero(narrow > -np.inf, axis=-1) >= 3).all()


def test_the_samplers_through_generate(model: onnxgen.Model) -> None:
    """DRY's breakers come from the tokenizer (any token whose text holds one); greedy text with DRY repeats less;
    seeded sampling with XTC repeats itself and differs from it without; the options are checked."""
    tokens = model.tokenizer.holding(("\n", ":"))
    assert all(("\n" in model.tokenizer.decode([t], clean=False)) or (":" in model.tokenizer.decode([t], clean=False))
               for t in np.flatnonzero(tokens)) and tokens.any()
    prompt = "It is a truth universally acknowledged, that a single man"

    def repeated(ids: list[int], n: int = 3) -> int:
        """Later occurrences of n-grams seen before: DRY, at its default allowed length 2, penalizes the token that
        would make a repeated 2-gram a repeated 3-gram."""
        return sum(count - 1 for count in Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)).values())

    # The bundled model: greedy, it repeats itself, how much with the CPU's kernels (on an AVX2 host it looped
    # "... of the Union ...", on an AVX-512 one its longest repeat was 4 tokens, "the people of the").
    trained = onnxgen.load(threads=1)
    plain = trained.generate(prompt, max_new_tokens=80, do_sample=False)[0].token_ids
    dried = trained.generate(prompt, max_new_tokens=80, do_sample=False, dry_multiplier=0.8)[0].token_ids
    assert repeated(plain) >= 4 and repeated(dried) < repeated(plain), (repeated(plain), repeated(dried))
    sampled = {"do_sample": True, "seed": 5, "max_new_tokens": 30, "xtc_probability": 1.0, "xtc_threshold": 0.05}
    first = model.generate(prompt, **sampled)[0].token_ids
    assert model.generate(prompt, **sampled)[0].token_ids == first
    assert model.generate(prompt, **{**sampled, "xtc_probability": 0.0})[0].token_ids != first
    # top-nσ: every sampled token within its step's cut, seen on the scores the warpers get (temperature 1: the raw ones)
    seen: list[np.ndarray] = []

    def record(_: np.ndarray, scores: np.ndarray) -> np.ndarray:
        seen.append(scores.copy())
        return scores

    sigma = {"do_sample": True, "seed": 2, "max_new_tokens": 20, "top_k": 0, "top_n_sigma": 0.5, "logits_processors": [record]}
    drawn = model.generate(prompt, **sigma)[0].token_ids
    assert len(seen) == len(drawn) and all(t in top_n_sigma_by_definition(s[0], 0.5) for t, s in zip(drawn, seen))
    assert max(len(top_n_sigma_by_definition(s[0], 0.5)) for s in seen) < model.runtime.vocab_size  # the cut cut something
    for bad, message in (({"dry_multiplier": -1}, "DRY takes dry_multiplier >= 0"), ({"dry_base": 0.5}, "dry_base >= 1"),
                         ({"top_n_sigma": -1.0}, "top_n_sigma must be >= 0"),
                         ({"dry_allowed_length": 0}, "dry_allowed_length >= 1"), ({"dry_sequence_breakers": ["\n", ""]},
                                                                                   "a list of non-empty strings"),
                         ({"xtc_probability": 2}, "XTC takes xtc_probability in"), ({"xtc_threshold": 0}, "xtc_threshold in")):
        with pytest.raises(OptionsError, match=message):
            model.generate(prompt, **bad)


def test_the_samplers_through_the_server_and_the_command_line(exported, model: onnxgen.Model) -> None:  # type: ignore[no-untyped-def]
    """llama.cpp's field names as extra fields of a request, and as generate's options: what generate gives with them."""
    import asyncio
    import subprocess
    import sys

    import httpx

    from onnxgen.serve import create_app

    asked = {"dry_multiplier": 1.5, "dry_allowed_length": 1, "dry_sequence_breakers": ["."], "xtc_probability": 1.0, "xtc_threshold": 0.05,
             "top_n_sigma": 2.0}
    expected = model.generate("It is a truth", max_new_tokens=12, do_sample=True, seed=3, top_k=0, **asked)[0].text

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(model, "tiny")), base_url="http://x") as http:
            return await http.post("/v1/completions", json={"prompt": "It is a truth", "max_tokens": 12, "seed": 3, **asked})

    assert asyncio.run(ask()).json()["choices"][0]["text"] == expected
    out = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is a truth", "--model", str(exported), "--max-new-tokens", "12",
                          "--strategy", "sample", "--seed", "3", "--dry-multiplier", "1.5", "--dry-allowed-length", "1",
                          "--xtc-probability", "1", "--xtc-threshold", "0.05", "--top-n-sigma", "2"], capture_output=True, text=True, check=False)
    with_default_breakers = model.generate("It is a truth", max_new_tokens=12, do_sample=True, seed=3, top_k=0,
                                           **{**asked, "dry_sequence_breakers": ["\n", ":", '"', "*"]})[0].text
    assert out.returncode == 0 and out.stdout == with_default_breakers + "\n", out.stderr
