"""Guessed tokens that the model checks in one pass (Generator.step): prompt lookup decoding (lookup.py) and assisted
generation with a draft model (assistant.py). transformers' guesses, and the text plain decoding gives."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import onnxgen
from onnxgen.batcher import Batcher, Job
from onnxgen.errors import OptionsError
from onnxgen.lookup import MAX_WAIT, Backoff, guesses

PROMPT = [12, 40, 7, 99, 150, 3, 61, 12, 40]


class RepeatWithBreaks:
    """A logits processor (numpy or torch alike) that makes text repeat itself: the token five back gets +30,
    except where the length is a multiple of 7, where the model's own choice stands. Guesses then hold mostly,
    and fail at the breaks: both paths of a step."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        out = scores * 1  # a new array or tensor
        if input_ids.shape[1] % 7:
            for row in range(out.shape[0]):
                out[row, int(input_ids[row, -5])] += 30.0
        return out


def hf_tokens(torch_model: torch.nn.Module, prompt: list[int], **kwargs: Any) -> list[int]:
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("seed", range(6))
def test_guesses_are_transformers_candidates(seed: int) -> None:
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    rng = np.random.default_rng(seed)
    for _ in range(50):
        history = rng.integers(0, 6, size=int(rng.integers(1, 40))).tolist()  # 6 tokens: n-grams recur
        count, ngram, eos = int(rng.integers(1, 8)), int(rng.integers(1, 4)), [int(rng.integers(0, 6))]
        reference = PromptLookupCandidateGenerator(torch.tensor(eos), count, ngram, max_length=1000)
        candidates, _ = reference.get_candidates(torch.tensor([history]))
        assert guesses(history, count, ngram, eos) == candidates[0, len(history):].tolist(), (history, count, ngram, eos)


@pytest.mark.parametrize("processed", [False, True])
def test_greedy_with_prompt_lookup_is_transformers_greedy(model: onnxgen.Model, torch_model: torch.nn.Module, processed: bool) -> None:
    """Token for token what transformers gives with and without prompt lookup, and what onnxgen gives without:
    with guesses taken and guesses refused on the way (the repetition penalty and n-gram ban move the choices
    at the guessed positions too)."""
    options: dict[str, Any] = dict(max_new_tokens=40, eos_token_id=None, do_sample=False)
    if processed:
        options.update(repetition_penalty=1.2, no_repeat_ngram_size=9)
    plain = model.generate(PROMPT, logits_processors=[RepeatWithBreaks()], **options)[0].token_ids
    generator = model.generator(PROMPT, logits_processors=[RepeatWithBreaks()], prompt_lookup_num_tokens=4, **options)
    steps = 0
    while not generator.done:
        generator.step()
        steps += 1
    stats = generator.stats
    assert generator.completions()[0].token_ids == plain
    assert 0 < stats.guesses_taken < stats.guessed_tokens  # both paths ran
    assert steps == 1 + 39 - stats.guesses_taken  # the prompt pass, then a step per token not guessed
    hf = {k: v for k, v in options.items() if k != "eos_token_id"}
    assert plain == hf_tokens(torch_model, PROMPT, logits_processor=[RepeatWithBreaks()], **hf)
    assert plain == hf_tokens(torch_model, PROMPT, logits_processor=[RepeatWithBreaks()], prompt_lookup_num_tokens=4, **hf)


def test_sampling_with_prompt_lookup_gives_what_the_seed_gives_without(model: onnxgen.Model) -> None:
    """One draw per token, in order, as without guesses: a seed gives the same text, and the same logprobs."""
    options: dict[str, Any] = dict(max_new_tokens=40, eos_token_id=None, do_sample=True, seed=7, top_k=0, logprobs=2,
                                   logits_processors=[RepeatWithBreaks()])
    plain = model.generate(PROMPT, **options)[0]
    guessed = model.generate(PROMPT, prompt_lookup_num_tokens=5, **options)[0]
    assert model.last_stats is not None and model.last_stats.guesses_taken > 0
    assert guessed.token_ids == plain.token_ids
    assert guessed.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    assert [list(t) for t in guessed.top_logprobs or []] == [list(t) for t in plain.top_logprobs or []]


@pytest.mark.parametrize("end", ["max_new_tokens", "eos", "stop"])
def test_a_text_ends_where_it_ends_without_guesses(model: onnxgen.Model, end: str) -> None:
    """max_new_tokens is never passed (a step's guesses stop short of it), an end token among the taken tokens ends
    the text there, and a stop string cuts it at the same place; the events add up to the completion."""
    options: dict[str, Any] = dict(max_new_tokens=23, eos_token_id=None, do_sample=False, logits_processors=[RepeatWithBreaks()])
    plain = model.generate(PROMPT, **options)[0]
    if end == "eos":
        options["eos_token_id"] = plain.token_ids[15]
    elif end == "stop":
        options["stop"] = [plain.text[len(plain.text) // 2 :][:3]]
    expected = model.generate(PROMPT, **options)[0]
    assert expected.finish_reason == {"max_new_tokens": "length", "eos": "eos", "stop": "stop"}[end]
    generator = model.generator(PROMPT, prompt_lookup_num_tokens=6, **options)
    pieces = []
    while not generator.done:
        pieces += generator.step()
    completion = generator.completions()[0]
    assert (completion.token_ids, completion.text, completion.finish_reason) == (expected.token_ids, expected.text, expected.finish_reason)
    assert "".join(pieces) == completion.text and generator.stats.guesses_taken > 0


def test_int4_with_prompt_lookup_takes_guesses(quantized_folder) -> None:  # type: ignore[no-untyped-def]
    """Quantized folders run guesses too. The tiny model's peaked scores leave no near-ties, so the text is plain
    decoding's; at a real near-tie int4 can go the other way (MatMulNBits takes another kernel for several positions)."""
    model = onnxgen.load(quantized_folder("int4"), threads=1)
    options: dict[str, Any] = dict(max_new_tokens=30, eos_token_id=None, do_sample=False, logits_processors=[RepeatWithBreaks()])
    guessed = model.generate(PROMPT, prompt_lookup_num_tokens=4, **options)[0].token_ids
    assert model.last_stats is not None and model.last_stats.guesses_taken > 0
    assert guessed == model.generate(PROMPT, **options)[0].token_ids


def test_backoff_waits_longer_after_each_failure_in_a_row() -> None:
    backoff, pattern = Backoff(), []
    for taken in [0, 0, 0, 0, 0, 0, 2, 0]:
        while not backoff.ready():
            pattern.append(".")
        pattern.append(str(taken))
        backoff.record(taken)
    assert "".join(pattern) == "0.0..0....0........0" + "." * MAX_WAIT + "0" + "." * MAX_WAIT + "20"


def test_guesses_that_always_fail_stop_being_run(model: onnxgen.Model) -> None:
    """Text that goes backwards through its prompt: each step has a guess (its last token occurred before), and
    each guess fails; after failures in a row, guessing pauses, so few passes carry guesses."""
    prompt = list(range(100, 160))

    def backwards(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = scores.copy()
        out[:, prompt[len(prompt) - 2 - (input_ids.shape[1] - len(prompt))]] += 30.0
        return out

    options: dict[str, Any] = dict(max_new_tokens=50, eos_token_id=None, do_sample=False, logits_processors=[backwards])
    plain = model.generate(prompt, **options)[0].token_ids
    assert plain == prompt[-2::-1][:50]
    generator = model.generator(prompt, prompt_lookup_num_tokens=3, **options)
    passes = 0
    while not generator.done:
        guessed = generator.guessed_tokens
        generator.step()
        passes += generator.guessed_tokens > guessed
    assert generator.completions()[0].token_ids == plain
    assert generator.guesses_taken == 0 and 4 <= passes <= 7  # failures at steps 1, 3, 6, 11, 20, 37: waits 1, 2, 4, 8, 16


def test_a_server_runs_a_prompt_lookup_request_apart(model: onnxgen.Model) -> None:
    batcher = Batcher(model, max_batch=4)
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    opts = model.options(max_new_tokens=30, eos_token_id=None, do_sample=False, prompt_lookup_num_tokens=4,
                         logits_processors=[RepeatWithBreaks()])
    batcher.submit(Job(model.prompt_ids([PROMPT], opts), opts, lambda kind, value: inbox.put((kind, value))))
    kind, value = inbox.get(timeout=60)
    while kind == "event":
        kind, value = inbox.get(timeout=60)
    assert kind == "done", value
    assert value[0][0].token_ids == model.generate(PROMPT, opts)[0].token_ids
    assert batcher.steps == 0  # no shared step: it ran in a cache of its own


def test_a_server_runs_a_second_prompt_lookup_request_in_the_shared_rows(model: onnxgen.Model) -> None:
    """While one request guesses apart, the next decodes in the shared rows without guesses instead of waiting for
    it: the same text as alone (fp32), no guesses, and shared steps."""
    batcher = Batcher(model, max_batch=4)
    opts = model.options(max_new_tokens=30, eos_token_id=None, do_sample=False, prompt_lookup_num_tokens=4,
                         logits_processors=[RepeatWithBreaks()])
    started, gate = threading.Event(), threading.Event()
    inboxes: list[queue.Queue[tuple[str, Any]]] = [queue.Queue(), queue.Queue()]

    def first(kind: str, value: Any) -> None:  # the first request waits at its first token until the second is in
        if kind == "event" and not started.is_set():
            started.set()
            gate.wait(30)
        inboxes[0].put((kind, value))

    batcher.submit(Job(model.prompt_ids([PROMPT], opts), opts, first))
    assert started.wait(30)
    batcher.submit(Job(model.prompt_ids([PROMPT], opts), opts, lambda kind, value: inboxes[1].put((kind, value))))
    gate.set()
    done = []
    for inbox in inboxes:
        kind, value = inbox.get(timeout=60)
        while kind == "event":
            kind, value = inbox.get(timeout=60)
        assert kind == "done", value
        done.append(value)
    expected = model.generate(PROMPT, opts)[0].token_ids
    assert [completions[0].token_ids for completions, _ in done] == [expected, expected]
    assert done[0][1].guessed_tokens > 0 and done[1][1].guessed_tokens == 0
    assert batcher.steps > 0  # the second decoded in the shared rows


def test_prompt_lookup_refuses_what_it_cannot_do(model: onnxgen.Model, exported_growing: Path) -> None:
    """Several rows (the bad-input corpus has the rest: values, beams, return sequences), and a growing cache."""
    with pytest.raises(OptionsError, match="one sequence a call"):
        model.generate([PROMPT, PROMPT], prompt_lookup_num_tokens=3)
    with pytest.raises(OptionsError, match="cache in place"):
        onnxgen.load(exported_growing, threads=1).generate(PROMPT, prompt_lookup_num_tokens=3)


def test_cli_prompt_lookup(exported: Path, model: onnxgen.Model) -> None:
    prompt = "It is a truth. It is a truth. It is"
    expected = model.generate(prompt, max_new_tokens=15, do_sample=False)[0].text
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", prompt, "--model", str(exported), "--max-new-tokens", "15",
                        "--strategy", "greedy", "--prompt-lookup-num-tokens", "3", "--stats"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert re.search(r"; \d+ of [1-9]\d* guesses taken", r.stderr), r.stderr


# -- a draft model (assistant_model) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def draft(quantized_folder) -> onnxgen.Model:  # type: ignore[no-untyped-def]
    """The tiny model's int8 folder: a draft that agrees with its fp32 parent most of the time, and not always."""
    return onnxgen.load(quantized_folder("int8"), threads=1, spinning=False)


@pytest.fixture(scope="module")
def target(exported: Path) -> onnxgen.Model:
    return onnxgen.load(exported, threads=1, spinning=False)


DRAFTING: dict[str, Any] = {"num_assistant_tokens": 4, "assistant_confidence_threshold": 0.0}  # always 4: both paths of a step


def test_assisted_greedy_is_transformers_greedy(target: onnxgen.Model, draft: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    options: dict[str, Any] = dict(max_new_tokens=40, eos_token_id=None, do_sample=False, repetition_penalty=1.2)
    plain = target.generate(PROMPT, **options)[0].token_ids
    generator = target.generator(PROMPT, assistant_model=draft, **DRAFTING, **options)
    while not generator.done:
        generator.step()
    assert generator.completions()[0].token_ids == plain
    assert 0 < generator.guesses_taken < generator.guessed_tokens
    hf = {k: v for k, v in options.items() if k != "eos_token_id"}
    assert plain == hf_tokens(torch_model, PROMPT, **hf)


class OtherEvery5th:
    """Bans the model's favourite token where the length is a multiple of 5: the model's own choices elsewhere, so that
    a draft of the same weights is right four times in five."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = scores.copy()
        if input_ids.shape[1] % 5 == 0:
            out[np.arange(len(out)), out.argmax(axis=-1)] = -np.inf
        return out


def test_the_draft_drafts_what_it_would_generate_from_the_text_so_far(target: onnxgen.Model, exported: Path) -> None:
    """After steps whose drafts were taken whole, in part or not at all, the draft's cache holds the text so far:
    its guesses are its own greedy continuation of the text (an fp32 draft: the same numbers in any pass)."""
    draft = onnxgen.load(exported, threads=1, spinning=False)
    generator = target.generator(PROMPT, assistant_model=draft, num_assistant_tokens=3, assistant_confidence_threshold=0.0,
                                 max_new_tokens=30, eos_token_id=None, do_sample=False, logits_processors=[OtherEvery5th()])
    guesser, seen = generator.guesser, []
    assert guesser is not None
    guess = guesser.guesses

    def recorded(history: list[int], count: int) -> list[int]:
        seen.append((list(history), guess(history, count)))
        return seen[-1][1]

    guesser.guesses = recorded  # type: ignore[method-assign]
    while not generator.done:
        generator.step()
    assert len(seen) > 5 and 0 < generator.guesses_taken < generator.guessed_tokens  # the processor makes some guesses fail
    for history, drafted in (step for step in seen if step[1]):  # not the steps the draft rested
        alone = draft.generate(history, max_new_tokens=len(drafted), do_sample=False, eos_token_id=None, repetition_penalty=1.0)
        assert drafted == alone[0].token_ids


def test_assisted_sampling_gives_what_the_seed_gives_without(target: onnxgen.Model, draft: onnxgen.Model) -> None:
    options: dict[str, Any] = dict(max_new_tokens=40, eos_token_id=None, do_sample=True, seed=11, top_k=0, temperature=0.7)
    plain = target.generate(PROMPT, **options)[0].token_ids
    assert target.generate(PROMPT, assistant_model=draft, **DRAFTING, **options)[0].token_ids == plain
    assert target.last_stats is not None and target.last_stats.guesses_taken > 0


def test_the_draft_stops_where_it_is_unsure(target: onnxgen.Model, exported: Path) -> None:
    """assistant_confidence_threshold: a draft token it gives less probability than this ends the step's drafts,
    so a threshold of 1 drafts one token a step, and 0 drafts num_assistant_tokens (less near max_new_tokens).
    The draft is the model's own weights: always right, it never rests."""
    draft = onnxgen.load(exported, threads=1, spinning=False)
    for threshold, per_step in [(1.0, 1), (0.0, 4)]:
        generator = target.generator(PROMPT, assistant_model=draft, num_assistant_tokens=4, assistant_confidence_threshold=threshold,
                                     max_new_tokens=30, eos_token_id=None, do_sample=False)
        drafted = []
        while not generator.done:
            before = generator.guessed_tokens
            generator.step()
            drafted.append(generator.guessed_tokens - before)
        assert drafted[0] == 0 and set(drafted[1:-2]) == {per_step}  # the prompt pass drafts nothing


def test_a_draft_is_refused_where_it_cannot_help(target: onnxgen.Model, draft: onnxgen.Model, exported_growing: Path) -> None:
    bundled = onnxgen.load(threads=1)  # its own tokenizer
    for assistant, options, message in [
        ("a/folder", {}, "must be a loaded onnxgen model"), (bundled, {}, "does not share this model's tokenizer"),
        (onnxgen.load(exported_growing, threads=1), {}, "growing-cache"), (draft, {"prompt_lookup_num_tokens": 3}, "not both"),
        (draft, {"num_beams": 2}, "not beam search"), (draft, {"num_return_sequences": 2, "do_sample": True}, "one sequence a call"),
        (draft, {"num_assistant_tokens": 0}, "num_assistant_tokens"), (draft, {"assistant_confidence_threshold": 1.5}, "threshold"),
    ]:
        with pytest.raises(OptionsError, match=message):
            target.generate(PROMPT, assistant_model=assistant, **options)


def test_models_that_spin_after_their_runs_are_warned_of(model: onnxgen.Model, draft: onnxgen.Model) -> None:
    with pytest.warns(onnxgen.PerformanceWarning, match="spinning=False"):
        model.generate(PROMPT, assistant_model=draft, max_new_tokens=3)


def test_cli_assisted_generation(exported: Path, quantized_folder, model: onnxgen.Model) -> None:  # type: ignore[no-untyped-def]
    expected = model.generate("It is a truth", max_new_tokens=15, do_sample=False)[0].text
    r = subprocess.run([sys.executable, "-m", "onnxgen", "generate", "It is a truth", "--model", str(exported), "--max-new-tokens", "15",
                        "--strategy", "greedy", "--assistant-model", str(quantized_folder("int8")), "--stats"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n" and "warning" not in r.stderr  # both loaded without spinning
    assert re.search(r"; \d+ of [1-9]\d* guesses taken", r.stderr), r.stderr


def test_the_drafts_cache_goes_back_once_a_call_ends_or_is_dropped(target: onnxgen.Model, exported: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As the model's own cache: with CUDA graphs a cache that is not handed back leaves a captured graph behind."""
    import gc

    draft = onnxgen.load(exported, threads=1, spinning=False)
    released: list[object] = []
    monkeypatch.setattr(draft.runtime, "release", lambda cache, tokens=None: released.append(cache))
    target.generate(PROMPT, assistant_model=draft, max_new_tokens=6)
    assert len(released) == 1
    generator = target.generator(PROMPT, assistant_model=draft, max_new_tokens=30)
    generator.step()
    generator.step()
    cache = generator.guesser.cache  # type: ignore[union-attr]
    del generator
    gc.collect()
    assert len(released) == 2 and released[1] is cache


def test_one_model_and_draft_serve_several_threads(target: onnxgen.Model, draft: onnxgen.Model) -> None:
    """Each call's guesser (the draft's cache, the backoff) is its own: calls at once give the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [PROMPT, PROMPT[3:], [5, 77, 5, 77, 5], list(range(200, 230))]
    calls = [dict(assistant_model=draft, **DRAFTING), dict(prompt_lookup_num_tokens=3)]
    jobs = [(p, c) for p in prompts for c in calls]
    options: dict[str, Any] = dict(max_new_tokens=24, eos_token_id=None, do_sample=True, seed=5, top_k=0, temperature=0.5)
    serial = [target.generate(p, **c, **options)[0].token_ids for p, c in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: target.generate(job[0], **job[1], **options)[0].token_ids, jobs * 3))
    assert together == serial * 3
