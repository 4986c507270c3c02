"""The prompt cache (load(prompt_cache_mib=...)): a finished one-row call's key/value cache kept for a later call
that starts with its tokens, which then computes only the rest of its prompt, and gives the text it gives alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnxgen
from onnxgen.cache import InPlaceCache
from onnxgen.errors import OptionsError
from onnxgen.runtime import MIN_RESUMED

GREEDY: dict[str, Any] = {"do_sample": False, "eos_token_id": None}


@pytest.fixture
def cached(exported: Path) -> onnxgen.Model:
    return onnxgen.load(exported, threads=1, prompt_cache_mib=64)


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Each prompt pass's (first position, tokens written)."""
    passes: list[tuple[int, int]] = []
    prefill = InPlaceCache.prefill

    def counted(cache: InPlaceCache, prompts: list[list[int]], rows: list[int] | None = None, start: int = 0) -> np.ndarray:
        passes.append((start, sum(map(len, prompts))))
        return prefill(cache, prompts, rows, start)

    monkeypatch.setattr(InPlaceCache, "prefill", counted)
    return passes


def turns(model: onnxgen.Model, first: list[int], count: int, **options: Any) -> list[list[int]]:
    """A chat's turns: each prompt is the one before, its completion, then a new message."""
    prompt, texts = first, []
    for turn in range(count):
        texts.append(model.generate(prompt, max_new_tokens=10 + turn, **options)[0].token_ids)
        prompt = prompt + texts[-1] + [7, 8, 9]
    return texts


def test_a_chats_next_turn_computes_only_its_new_tokens(cached: onnxgen.Model, model: onnxgen.Model,
                                                        written: list[tuple[int, int]]) -> None:
    first = list(range(100, 150))
    expected = turns(model, first, 4, **GREEDY)
    del written[:]
    assert turns(cached, first, 4, **GREEDY) == expected  # fp32: the same text as computed whole
    # Turn 1 writes its prompt; each later one only its last turn's final token (not written by the steps), the new
    # message, and nothing of the conversation before.
    assert written == [(0, 50), (59, 1 + 3), (59 + 3 + 11, 1 + 3), (59 + 3 + 11 + 3 + 12, 1 + 3)]


def test_seeded_sampling_and_guessing_resume_too(cached: onnxgen.Model, model: onnxgen.Model) -> None:
    first = list(range(100, 150))
    options: dict[str, Any] = {"do_sample": True, "seed": 3, "temperature": 0.7, "top_k": 0, "eos_token_id": None}
    assert turns(cached, first, 3, **options) == turns(model, first, 3, **options)
    assert turns(cached, first, 3, prompt_lookup_num_tokens=3, **GREEDY) == turns(model, first, 3, **GREEDY)


def test_only_a_long_enough_shared_start_is_taken(cached: onnxgen.Model, written: list[tuple[int, int]]) -> None:
    """A kept cache is taken by a call that starts with at least MIN_RESUMED of its tokens, and by one call only;
    the prompt's last token is always computed (its scores choose the first new token)."""
    base = list(range(100, 100 + MIN_RESUMED + 10))
    cached.generate(base, max_new_tokens=4, **GREEDY)
    cached.generate(base[: MIN_RESUMED - 1] + [5, 6], max_new_tokens=2, **GREEDY)  # too little shared: computed whole
    cached.generate(base, max_new_tokens=2, **GREEDY)  # all of it kept: its last token computed again
    cached.generate(base + [5], max_new_tokens=2, **GREEDY)  # the first call's cache went to the call before: its own
    assert written == [(0, len(base)), (0, MIN_RESUMED + 1), (len(base) - 1, 1), (len(base), 1)]


def test_the_cache_keeps_to_its_budget(exported: Path, written: list[tuple[int, int]]) -> None:
    """Past prompt_cache_mib the least recently finished call's cache goes first (here a budget of 100 positions,
    where the tiny model's whole context is 128 KiB of cache)."""
    small = onnxgen.load(exported, threads=1, prompt_cache_mib=1)
    small.runtime.prompt_cache_bytes = small.runtime.cache_bytes(1, 100)
    length = 45  # a call keeps 46 positions: two fit, a third does not
    a, b, c = (list(range(t, t + length)) for t in (100, 150, 200))
    for prompt in (a, b, c):
        small.generate(prompt, max_new_tokens=2, **GREEDY)
    del written[:]
    small.generate(a + [5], max_new_tokens=2, **GREEDY)  # evicted: computed whole
    small.generate(c + [5], max_new_tokens=2, **GREEDY)  # kept
    assert [start for start, _ in written] == [0, length]


def test_a_draft_with_a_prompt_cache_resumes_too(model: onnxgen.Model, exported: Path) -> None:
    """A chat's turns with a draft model: the draft, loaded with a prompt cache as well, takes its cache from the turn
    before and catches up with the new tokens only."""
    cached = onnxgen.load(exported, threads=1, spinning=False, prompt_cache_mib=64)
    draft = onnxgen.load(exported, threads=1, spinning=False, prompt_cache_mib=64)
    first = list(range(100, 150))
    drafting: dict[str, Any] = {"assistant_model": draft, "num_assistant_tokens": 3, "assistant_confidence_threshold": 0.0}
    expected = turns(model, first, 3, **GREEDY)
    appended, append = [], InPlaceCache.append

    def counted(cache: InPlaceCache, tokens: list[int]) -> np.ndarray:
        if cache.runtime is draft.runtime and cache.lengths[0] + len(tokens) > len(first):  # the draft catching up
            appended.append((int(cache.lengths[0]), len(tokens)))
        return append(cache, tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InPlaceCache, "append", counted)
        assert turns(cached, first, 3, **drafting, **GREEDY) == expected
    catch_ups = [start for start, _ in appended]
    assert catch_ups.count(0) == 1  # the first turn's whole prompt only: later turns start where the one before ended


def test_one_model_with_a_prompt_cache_serves_several_threads(cached: onnxgen.Model, model: onnxgen.Model) -> None:
    """Each kept cache goes to one call at a time; calls at once give the serial results."""
    firsts = [list(range(100 + 3 * i, 160 + 3 * i)) for i in range(4)]
    serial = [turns(model, first, 3, **GREEDY) for first in firsts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda first: turns(cached, first, 3, **GREEDY), firsts * 2))
    assert together == serial * 2


def test_prompt_cache_refusals(exported: Path, exported_growing: Path) -> None:
    for kwargs, message in [({"prompt_cache_mib": -1}, "prompt_cache_mib"), ({"prompt_cache_mib": 1.5}, "prompt_cache_mib"),
                            ({"prompt_cache_mib": True}, "prompt_cache_mib"), ({"prompt_cache_mib": 8, "provider": "cuda"}, "CPU option")]:
        with pytest.raises(OptionsError, match=message):
            onnxgen.load(exported, **kwargs)
    with pytest.raises(OptionsError, match="cache in place"):
        onnxgen.load(exported_growing, prompt_cache_mib=8)


def test_a_server_resumes_a_chats_next_turn(exported: Path, model: onnxgen.Model, written: list[tuple[int, int]]) -> None:
    """The batcher keeps a copy of an ending one-row request's row and copies it into the row of a later request
    that starts with its tokens, whose prompt pass writes the rest: while another request decodes beside it."""
    from onnxgen.batcher import Batcher

    from .test_batcher import result, submit

    cached = onnxgen.load(exported, threads=1, prompt_cache_mib=64)
    batcher = Batcher(cached, max_batch=4)
    first = list(range(100, 150))
    turn1 = result(submit(batcher, cached, [first], max_new_tokens=10, **GREEDY))[0].token_ids
    second = first + turn1 + [7, 8, 9]
    other = submit(batcher, cached, [list(range(200, 240))], max_new_tokens=40, **GREEDY)  # decoding beside it
    del written[:]
    turn2 = result(submit(batcher, cached, [second], max_new_tokens=12, **GREEDY))[0].token_ids
    assert turn2 == model.generate(second, max_new_tokens=12, **GREEDY)[0].token_ids
    assert result(other)[0].token_ids == model.generate(list(range(200, 240)), max_new_tokens=40, **GREEDY)[0].token_ids
    assert batcher.resumed == 1 and (59, 4) in written  # the kept 59 positions (50 + 9 written), then 4 new
