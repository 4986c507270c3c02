"""Continuous batching (onnxgen/batcher.py): requests join rows already decoding, with answers equal to what
each gives alone through model.generate."""

from __future__ import annotations

import ctypes
import itertools
import mmap
import queue
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import onnxgen
from onnxgen.batcher import Batcher, Job
from onnxgen.cache import SharedRows
from onnxgen.decoding import Rows
from onnxgen.errors import OptionsError

Inbox = queue.Queue[tuple[str, Any]]


def submit(batcher: Batcher, model: onnxgen.Model, prompts: list[str], on_event: Any = None, **options: Any) -> Inbox:
    """Submit a job; its news arrive in the returned queue (on_event, if given, runs in the worker first)."""
    inbox: Inbox = queue.Queue()

    def deliver(kind: str, value: Any) -> None:
        if kind == "event" and on_event is not None:
            on_event(value)
        inbox.put((kind, value))

    opts = model.options(**options)
    batcher.submit(Job(model.prompt_ids(prompts, opts), opts, deliver))
    return inbox


def result(inbox: Inbox) -> list[onnxgen.Completion]:
    kind, value = inbox.get(timeout=60)
    while kind == "event":
        kind, value = inbox.get(timeout=60)
    assert kind == "done", value
    return value[0]


def alone(model: onnxgen.Model, prompts: list[str], **options: Any) -> list[list[int]]:
    return [c.token_ids for c in model.generate(prompts, **options)]


GREEDY = {"do_sample": False, "eos_token_id": None}
T = TypeVar("T")


def together(batcher: Batcher, model: onnxgen.Model, submissions: Callable[[], T]) -> T:
    """`submissions()` run while the batcher's worker is held (inside the event of a one-token job), so that the jobs
    it submits all wait when the worker goes on and start together, however slowly this thread runs beside a busy
    machine (sent one by one, the tiny model's first job can end before the next is sent)."""
    gate, holding = threading.Event(), threading.Event()
    held = submit(batcher, model, ["It"], on_event=lambda _: (holding.set(), gate.wait(30)), max_new_tokens=1, **GREEDY)
    assert holding.wait(30)
    try:
        return submissions()
    finally:
        gate.set()
        assert len(result(held)[0].token_ids) == 1  # its token came from the prompt pass: no step of its own


def test_a_request_joins_rows_already_decoding(model: onnxgen.Model) -> None:
    """A short request sent while a long one decodes starts at the long one's next step and ends before it:
    every step of the short one is a step the long one makes anyway."""
    batcher = Batcher(model, max_batch=4)
    second: list[Inbox] = []

    def send_the_short_one(_: object) -> None:  # from the worker, at the long job's first token: it is decoding
        if not second:
            second.append(submit(batcher, model, ["Call me"], max_new_tokens=5, **GREEDY))

    first = submit(batcher, model, ["It is a truth"], on_event=send_the_short_one, max_new_tokens=60, **GREEDY)
    short = result(_wait_for(second))
    assert first.get(timeout=60)[0] == "event"  # the long job was still running when the short one ended
    long = result(first)
    assert [c.token_ids for c in short] == alone(model, ["Call me"], max_new_tokens=5, **GREEDY)
    assert [c.token_ids for c in long] == alone(model, ["It is a truth"], max_new_tokens=60, **GREEDY)
    assert batcher.jobs == 2 and batcher.joined == 1
    assert batcher.steps == 59  # the long job's steps (its first token comes from the prompt pass), no more


def _wait_for(boxes: list[Inbox]) -> Inbox:
    for _ in range(600):
        if boxes:
            return boxes[0]
        threading.Event().wait(0.05)
    raise AssertionError("the long job never made a token")


def test_a_long_prompt_is_written_a_part_a_step(model: onnxgen.Model) -> None:
    """A prompt longer than prefill_chunk is written that many positions a step, with the rows already
    decoding making a token between its parts; its answer is what it gives alone."""
    batcher = Batcher(model, max_batch=4, prefill_chunk=4)
    assert batcher.cache is not None
    log: list[str] = []
    write = batcher.cache.prefill
    batcher.cache.prefill = lambda *args, **kw: (log.append("part"), write(*args, **kw))[1]  # type: ignore[method-assign]
    long_prompt = "It is a truth universally acknowledged that a single man in possession of a good fortune"
    second: list[Inbox] = []

    def send_the_long_one(_: object) -> None:
        log.append("token")
        if not second:
            second.append(submit(batcher, model, [long_prompt], max_new_tokens=6, **GREEDY))

    first = submit(batcher, model, ["It"], on_event=send_the_long_one, max_new_tokens=40, **GREEDY)
    long = result(_wait_for(second))
    assert [c.token_ids for c in long] == alone(model, [long_prompt], max_new_tokens=6, **GREEDY)
    assert [c.token_ids for c in result(first)] == alone(model, ["It"], max_new_tokens=40, **GREEDY)
    parts = -(-len(model.tokenizer.encode(long_prompt)) // 4)
    assert batcher.parts == parts >= 4
    written = [i for i, entry in enumerate(log) if entry == "part"][-parts:]  # the long prompt's parts
    assert all("token" in log[a:b] for a, b in itertools.pairwise(written))  # a token of the other job between each two


def test_a_prompts_beams_share_one_prompt_pass(model: onnxgen.Model) -> None:
    """A beam request's rows take one pass a prompt, whole or written in parts (its other beams copy what it wrote,
    as a call's own rows do); each answer is what the request gives alone, its beam scores to the last bit (the
    shared cache's reorders copy a beam only past what it holds alike with the beam it becomes: Rows.alike)."""
    batcher = Batcher(model, max_batch=8, prefill_chunk=4)
    assert batcher.cache is not None
    written: list[int] = []  # rows a pass writes
    write = batcher.cache.prefill
    batcher.cache.prefill = lambda prompts, *args, **kw: (written.append(len(prompts)), write(prompts, *args, **kw))[1]  # type: ignore[method-assign]
    short = ["The", "Once"]
    assert max(len(model.tokenizer.encode(p)) for p in short) <= 4  # a pass each, not parts
    beams = {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2}
    answers, alone_answers = result(submit(batcher, model, short, **beams)), model.generate(short, **beams)
    assert [(c.token_ids, c.score) for c in answers] == [(c.token_ids, c.score) for c in alone_answers]
    assert sum(written) == len(short)
    written.clear()
    long_prompt = "It is a truth universally acknowledged that a single man"
    answers, alone_answers = result(submit(batcher, model, [long_prompt], **beams)), model.generate(long_prompt, **beams)
    assert [(c.token_ids, c.score) for c in answers] == [(c.token_ids, c.score) for c in alone_answers]
    assert sum(written) == len(written) == batcher.parts == -(-len(model.tokenizer.encode(long_prompt)) // 4)  # one row a part


def test_beams_in_the_shared_cache_hold_their_common_history_alike(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every reorder of a beam request in the server's shared cache, each two of its rows hold the same keys and
    values over their common history (Rows.alike, through SharedRows' slots), bit for bit: what the reorder left in
    place is what it would have copied."""
    advance, checked = Rows.advance, []

    def watched(rows: Rows, tokens: np.ndarray, source: np.ndarray | None = None) -> None:
        advance(rows, tokens, source)
        if source is None or not isinstance(rows._cache, SharedRows):  # model.generate's own cache below: not this test's
            return
        cache, slots = rows._cache.cache, rows._cache.slots
        layers = cache.layers()
        for a in range(len(slots)):
            for b in range(len(slots)):
                if a // 3 == b // 3:  # 3 beams a prompt
                    held = int(rows.alike(np.array([b if r == a else r for r in range(len(slots))]))[a])
                    held = min(held, int(cache.lengths[slots[a]]))  # the token just chosen is not written yet
                    assert np.array_equal(layers[:, slots[a], :, :held], layers[:, slots[b], :, :held]), (a, b, held)
                    checked.append(held)

    monkeypatch.setattr(Rows, "advance", watched)
    batcher = Batcher(model, max_batch=8)
    gate = threading.Event()
    held = submit(batcher, model, ["Once upon"], on_event=lambda _: gate.wait(30), max_new_tokens=20, **GREEDY)  # below the beams
    beams = submit(batcher, model, ["The", "It is a truth"], max_new_tokens=12, num_beams=3, length_penalty=0.5)
    gate.set()
    expected = model.generate(["The", "It is a truth"], max_new_tokens=12, num_beams=3, length_penalty=0.5)
    assert [(c.token_ids, c.score) for c in result(beams)] == [(c.token_ids, c.score) for c in expected]
    result(held)
    assert max(checked) > len(model.tokenizer.encode("It is a truth"))  # past the prompt: generated positions alike


def test_requests_with_different_options_share_steps(model: onnxgen.Model) -> None:
    """Each request keeps its own options, processors and stop rules in a shared step."""
    batcher = Batcher(model, max_batch=8)
    stop = model.generate("Once upon", max_new_tokens=12, **GREEDY)[0].text[3:5]
    cases: list[tuple[list[str], dict[str, Any]]] = [
        (["It is a truth", "Call me"], {"max_new_tokens": 20, "do_sample": True, "temperature": 0.7, "top_k": 5, "eos_token_id": None}),
        (["The"], {"max_new_tokens": 15, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, **GREEDY}),
        (["Once upon"], {"max_new_tokens": 12, "stop": [stop], **GREEDY}),
        (["It is"], {"max_new_tokens": 9, "logprobs": 2, **GREEDY}),
        (["Call me", "The"], {"max_new_tokens": 30, "regex": "[a-z ]{5,40}!", "do_sample": True, "seed": 4}),  # guidance.py
        (["Once upon"], {"max_new_tokens": 12, "regex": "(yes|no|[a-z]{3,6})!", "num_beams": 3, "num_return_sequences": 2}),
    ]
    inboxes = together(batcher, model, lambda: [submit(batcher, model, prompts, **options) for prompts, options in cases])
    results = [result(inbox) for inbox in inboxes]
    assert [len(c.token_ids) for c in results[0]] == [20, 20]
    assert all(re.fullmatch("[a-z ]{5,40}!", c.text) and c.finish_reason == "eos" for c in results[4])
    for (prompts, options), got in list(zip(cases, results))[1:]:
        expected = model.generate(prompts, **options)
        assert [(c.text, c.token_ids, c.finish_reason) for c in got] == [(c.text, c.token_ids, c.finish_reason) for c in expected]
    assert results[2][0].finish_reason == "stop"
    assert results[3][0].logprobs == pytest.approx(model.generate(["It is"], max_new_tokens=9, logprobs=2, **GREEDY)[0].logprobs, abs=1e-4)
    assert all(re.fullmatch("(yes|no|[a-z]{3,6})!", c.text) for c in results[5])
    assert batcher.steps < 20 + 15 + 12 + 9 - 4  # fewer than one after another


def test_rows_that_end_make_room_for_waiting_requests(model: onnxgen.Model) -> None:
    """Two rows: a request whose rows do not fit waits (holding back those behind it) until rows end, and
    a row is reused after a longer one (what the longer one wrote past the new prompt is never read)."""
    batcher = Batcher(model, max_batch=2)
    long_prompt = ["It is a truth universally acknowledged that a single man in possession of a good fortune"]
    jobs: list[tuple[list[str], int]] = [(long_prompt, 30), (["Call me"], 3), (["The", "Once upon"], 6), (["It"], 4)]
    inboxes = [submit(batcher, model, prompts, max_new_tokens=n, **GREEDY) for prompts, n in jobs]
    for (prompts, n), inbox in zip(jobs, inboxes):
        assert [c.token_ids for c in result(inbox)] == alone(model, prompts, max_new_tokens=n, **GREEDY)
    assert batcher.jobs == 4
    assert batcher.cache is not None and batcher.cache.lengths.tolist() == [0, 0]  # every row free again


def test_rows_move_down_into_rows_that_ended(model: onnxgen.Model) -> None:
    """When a row ends below busy ones, the last busy row moves into it (its cache positions copied), so that
    a step decodes no free row; the moved rows go on as if nothing happened."""
    batcher = Batcher(model, max_batch=4)
    gate = threading.Event()
    held = submit(batcher, model, ["Once upon"], on_event=lambda _: gate.wait(30), max_new_tokens=50, **GREEDY)
    jobs: list[tuple[str, int]] = [("It is a truth universally acknowledged that a single man", 40), ("Call me", 3), ("The city of", 30)]
    inboxes = [submit(batcher, model, [prompt], max_new_tokens=n, **GREEDY) for prompt, n in jobs]
    gate.set()  # the three start together, in rows 1-3 by prompt length: the 3-token one ends first, below another
    for (prompt, n), inbox in zip(jobs, inboxes):
        assert [c.token_ids for c in result(inbox)] == alone(model, [prompt], max_new_tokens=n, **GREEDY)
    assert [c.token_ids for c in result(held)] == alone(model, ["Once upon"], max_new_tokens=50, **GREEDY)
    assert batcher.moved >= 1


def test_an_ended_rows_memory_goes_back(model: onnxgen.Model) -> None:
    """What a request wrote into the shared cache is handed back when it ends: its rows read as zeros again."""
    batcher = Batcher(model, max_batch=2)
    result(submit(batcher, model, ["It is a truth"], max_new_tokens=90, **GREEDY))
    cache = batcher.cache
    assert cache is not None
    page, interior = mmap.PAGESIZE, 0
    for layer in range(2 * model.dims.n_layer):  # each row's whole pages: the ones a row can give back alone
        for row in range(cache.rows):
            start, end = cache.address(layer, row), cache.address(layer, row) + cache.row_bytes
            start, end = -(-start // page) * page, end // page * page
            interior += end - start
            assert not np.frombuffer((ctypes.c_byte * (end - start)).from_address(start), dtype=np.uint8).any()
    assert interior >= cache.nbytes // 2  # the test's model makes rows of several pages


def test_seeded_requests_and_beams_share_steps(model: onnxgen.Model) -> None:
    """A seed gives what model.generate gives with it, and beam search what it gives alone while its beams move
    among the shared rows it holds, beside other rows decoding."""
    batcher = Batcher(model, max_batch=8)
    shared, seeded, beams = together(batcher, model, lambda: (
        submit(batcher, model, ["It is a truth"], max_new_tokens=40, **GREEDY),
        submit(batcher, model, ["Call me"], max_new_tokens=15, do_sample=True, seed=3, num_return_sequences=2),
        submit(batcher, model, ["The", "Once upon a"], max_new_tokens=8, num_beams=3, num_return_sequences=2)))
    assert [c.text for c in result(seeded)] == [c.text for c in model.generate("Call me", max_new_tokens=15, do_sample=True, seed=3,
                                                                                num_return_sequences=2)]
    expected = model.generate(["The", "Once upon a"], max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert [(c.text, c.score) for c in result(beams)] == [(c.text, pytest.approx(c.score, abs=1e-4)) for c in expected]
    assert [c.token_ids for c in result(shared)] == alone(model, ["It is a truth"], max_new_tokens=40, **GREEDY)
    assert batcher.jobs == 4 and batcher.steps < 39 + 7  # (the holding job's and) fewer than the two shared jobs' steps one after the other


@pytest.mark.parametrize("mode", ["fp32", "int4", "int8"])
def test_seeded_requests_share_rows_where_a_row_is_computed_alone(model: onnxgen.Model, quantized_folder, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Seeded requests that arrive together, prompts written in parts among them, each give exactly what
    model.generate gives with its seed: in shared rows for fp32 on the CPU (each row's numbers are its own), one
    at a time apart for int8 (one activation scale for all rows; no shared step at all). int4 goes the way the
    CPU's MatMulNBits kernels allow: rows alone and together give the same bits on the AVX-512 hosts of earlier
    sessions, not on an AVX2-only EPYC (last bits differ between its one-row and several-row kernels)."""
    folder = model if mode == "fp32" else onnxgen.load(quantized_folder(mode))
    batcher = Batcher(folder, max_batch=8, prefill_chunk=3)
    if mode != "int4":
        assert batcher.seeds_share == (mode == "fp32")
    prompts = ["It is a truth universally acknowledged", "Call me Ishmael", "The", "Once upon a time"]
    options = dict(max_new_tokens=12, do_sample=True, top_p=0.9, eos_token_id=None)
    inboxes = together(batcher, folder, lambda: [submit(batcher, folder, [p], seed=i, **options) for i, p in enumerate(prompts)])
    for i, (prompt, inbox) in enumerate(zip(prompts, inboxes)):
        assert [c.token_ids for c in result(inbox)] == alone(folder, [prompt], seed=i, **options)
    if batcher.seeds_share:  # fewer shared steps than the four jobs' 11 decode steps one after the other
        assert batcher.steps < 4 * 11 and batcher.parts > 0
    else:
        assert (batcher.steps, batcher.parts) == (0, 0)


def test_seeds_run_apart_where_the_cpus_kernels_change_a_row_with_its_neighbours(model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up check: scores that move with the row count (as int8's, or another CPU's kernels might) keep
    seeded requests apart."""
    from onnxgen.cache import InPlaceCache

    prefill = InPlaceCache.prefill
    monkeypatch.setattr(InPlaceCache, "prefill", lambda self, prompts, *a, **k: prefill(self, prompts, *a, **k) + np.float32(1e-3 * len(prompts)))
    assert not Batcher(model, max_batch=4).seeds_share
    monkeypatch.setattr(InPlaceCache, "prefill", prefill)
    assert Batcher(model, max_batch=4).seeds_share


def test_beams_moved_down_keep_their_search(model: onnxgen.Model) -> None:
    """Rows of a beam search moved into a row that ended (and reordered by the search after) give what the
    search gives alone."""
    batcher = Batcher(model, max_batch=5)
    gate = threading.Event()
    held = submit(batcher, model, ["Once upon"], on_event=lambda _: gate.wait(30), max_new_tokens=30, **GREEDY)
    short = submit(batcher, model, ["It"], max_new_tokens=2, **GREEDY)
    prompt = "It is a truth universally acknowledged"
    beams = submit(batcher, model, [prompt], max_new_tokens=12, num_beams=3, length_penalty=0.5)
    gate.set()  # rows go by prompt length: "It" sits below the beams' rows and ends first, and a beam's row moves down
    expected = model.generate(prompt, max_new_tokens=12, num_beams=3, length_penalty=0.5)
    assert [c.token_ids for c in result(beams)] == [c.token_ids for c in expected]
    assert [c.token_ids for c in result(short)] == alone(model, ["It"], max_new_tokens=2, **GREEDY)
    result(held)
    assert batcher.moved >= 1


def test_a_client_that_goes_away_ends_its_rows(model: onnxgen.Model) -> None:
    """What the server does when a stream's client disconnects (it sets the job's cancelled flag): the
    batcher ends that job's rows at the next step, and the other job's rows run on; the server's metrics count it apart."""
    from prometheus_client.parser import text_string_to_metric_families

    from onnxgen.metrics import Metrics

    batcher = Batcher(model, max_batch=8)
    metrics = Metrics(batcher)
    options = model.options(max_new_tokens=100, do_sample=True, eos_token_id=None, num_return_sequences=2)
    news: dict[str, Inbox] = {"gone": queue.Queue(), "stays": queue.Queue()}
    jobs = {name: Job([[12, 40, 7]], options, metrics.tracked(lambda kind, value, name=name: news[name].put((kind, value)), [[12, 40, 7]]))
            for name in news}
    batcher.submit(jobs["gone"])
    batcher.submit(jobs["stays"])
    assert news["gone"].get(timeout=30)[0] == "event"
    jobs["gone"].cancelled.set()  # the client hung up after its first piece
    results = {name: result(inbox) for name, inbox in news.items()}
    assert batcher.cancelled_rows == 2
    assert {c.finish_reason for c in results["gone"]} == {"cancelled"} and all(len(c.token_ids) < 100 for c in results["gone"])
    assert [len(c.token_ids) for c in results["stays"]] == [100, 100]
    scrape = metrics.render()[0].decode()
    outcomes = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(scrape) for s in f.samples if s.name == "onnxgen_requests_total"}
    assert (outcomes["cancelled"], outcomes["completed"]) == (1, 1)


def test_a_request_waiting_to_run_apart_holds_back_no_one(model: onnxgen.Model) -> None:
    """Requests with more rows than max_batch run apart, one at a time; a short request sent behind two of them
    joins the shared rows at once (before, it waited behind the second until the first had ended)."""
    batcher = Batcher(model, max_batch=2)
    wide = {"max_new_tokens": 100, "do_sample": True, "num_return_sequences": 3, "eos_token_id": None}
    order: list[str] = []
    inboxes: dict[str, Inbox] = {}
    jobs = []
    for name, prompt, options in (("first", "It is", {**wide, "seed": 1}), ("second", "Call me", {**wide, "seed": 2}),
                                  ("short", "Once upon", {"max_new_tokens": 3, **GREEDY})):
        opts, inboxes[name] = model.options(**options), queue.Queue()
        jobs.append(Job(model.prompt_ids([prompt], opts), opts, lambda kind, value, inbox=inboxes[name]: inbox.put((kind, value))))
    for job in jobs:  # back to back, made beforehand: the tiny model's `first` must not end before `short` is even sent
        batcher.submit(job)
    results = {}
    while len(results) < 3:  # the order in which they end
        for name, inbox in inboxes.items():
            if name not in results and not inbox.empty() and inbox.queue[-1][0] == "done":
                results[name], order = result(inbox), [*order, name]
        threading.Event().wait(0.01)
    assert order == ["short", "first", "second"]
    assert [c.token_ids for c in results["short"]] == alone(model, ["Once upon"], max_new_tokens=3, **GREEDY)
    assert [c.token_ids for c in results["second"]] == alone(model, ["Call me"], **wide, seed=2)


def test_a_client_gone_before_its_request_started_is_dropped(model: onnxgen.Model) -> None:
    """A job cancelled while it waits for room never starts: it hears "dropped", and the metrics count it cancelled."""
    from onnxgen.metrics import Metrics

    batcher = Batcher(model, max_batch=1)
    metrics = Metrics(batcher)
    gate = threading.Event()
    running = submit(batcher, model, ["It is"], on_event=lambda _: gate.wait(30), max_new_tokens=3, **GREEDY)
    waiting: Inbox = queue.Queue()
    job = Job([[12, 40, 7]], model.options(max_new_tokens=3, **GREEDY), metrics.tracked(lambda kind, value: waiting.put((kind, value)), [[12, 40, 7]]))
    batcher.submit(job)
    job.cancelled.set()
    gate.set()
    result(running)
    assert waiting.get(timeout=30) == ("dropped", None) and waiting.empty()
    assert b'onnxgen_requests_total{outcome="cancelled"} 1.0' in metrics.render()[0]


def test_a_growing_cache_runs_each_request_apart(exported_growing: Path, model: onnxgen.Model) -> None:
    """A folder exported with --growing-cache has no rows to share: requests run one at a time, correctly."""
    growing = onnxgen.load(exported_growing, threads=1)
    batcher = Batcher(growing, max_batch=4)
    assert batcher.cache is None
    inboxes = [submit(batcher, growing, [p], max_new_tokens=6, **GREEDY) for p in ("It is", "Call me")]
    assert [result(inbox)[0].token_ids for inbox in inboxes] == alone(growing, ["It is"], max_new_tokens=6, **GREEDY) + alone(
        growing, ["Call me"], max_new_tokens=6, **GREEDY)


def test_a_cache_too_large_to_reserve_is_a_clear_error(model: onnxgen.Model) -> None:
    with pytest.raises(OptionsError, match="max_batch 1000000000: a key/value cache of 1000000000 rows"):
        Batcher(model, max_batch=10**9)


def test_a_request_the_model_refuses_gets_its_error_and_the_rest_run(model: onnxgen.Model) -> None:
    batcher = Batcher(model, max_batch=4)
    good = submit(batcher, model, ["It is"], max_new_tokens=4, **GREEDY)
    inbox: Inbox = queue.Queue()
    opts = model.options(max_new_tokens=4, **GREEDY)
    batcher.submit(Job([[10**9]], opts, lambda kind, value: inbox.put((kind, value))))  # an id outside the vocabulary
    kind, value = inbox.get(timeout=60)
    assert kind == "error" and isinstance(value, Exception)
    assert [c.token_ids for c in result(good)] == alone(model, ["It is"], max_new_tokens=4, **GREEDY)


def test_with_cuda_graphs_each_count_of_rows_is_bound_once(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA graphs a decode step is captured once per binding, and onnxruntime keeps every capture: the
    batcher's cache keeps one binding per count of rows and never makes one again. On the CPU, with the
    runtime told it captures (tests/test_cuda.py replays real graphs on a GPU)."""
    from onnxgen import cache as cache_module

    made: list[tuple[cache_module.InPlaceCache, int]] = []

    class Counted(cache_module.DecodeStep):
        def __init__(self, cache: cache_module.InPlaceCache, rows: int) -> None:
            made.append((cache, rows))
            super().__init__(cache, rows)

    monkeypatch.setattr(cache_module, "DecodeStep", Counted)
    model = onnxgen.load(exported, threads=1)
    model.runtime.cuda_graph = True
    batcher = Batcher(model, max_batch=3)
    jobs = [(["It is a truth universally acknowledged"], 20), (["Call me"], 3), (["The"], 12), (["Once upon"], 5), (["It"], 9)]
    for _ in range(2):
        inboxes = together(batcher, model, lambda: [submit(batcher, model, prompts, max_new_tokens=n, **GREEDY) for prompts, n in jobs])
        for (prompts, n), inbox in zip(jobs, inboxes):
            assert [c.token_ids for c in result(inbox)] == alone(model, prompts, max_new_tokens=n, **GREEDY)
    counts = [rows for cache, rows in made if cache is batcher.cache]
    assert batcher.cache is not None and sorted(counts) == sorted(batcher.cache._steps) and len(counts) >= 2


def test_a_client_gone_while_its_prompt_is_written_frees_its_rows(model: onnxgen.Model) -> None:
    batcher = Batcher(model, max_batch=2, prefill_chunk=2)
    assert batcher.cache is not None
    inbox: Inbox = queue.Queue()
    opts = model.options(max_new_tokens=5, **GREEDY)
    long_prompt = "It is a truth universally acknowledged that a single man in possession of a good fortune"
    job = Job(model.prompt_ids([long_prompt], opts), opts, lambda kind, value: inbox.put((kind, value)))
    write = batcher.cache.prefill

    def part_then_hang_up(*args: Any, **kw: Any) -> np.ndarray:
        job.cancelled.set()  # the client goes away while its first part is written
        return write(*args, **kw)

    batcher.cache.prefill = part_then_hang_up  # type: ignore[method-assign]
    batcher.submit(job)
    completions = result(inbox)
    assert [c.finish_reason for c in completions] == ["cancelled"] and completions[0].token_ids == []
    assert batcher.parts == 1 and batcher.cache.lengths.tolist() == [0, 0]
    batcher.cache.prefill = write  # type: ignore[method-assign]
    assert [c.token_ids for c in result(submit(batcher, model, ["Call me"], max_new_tokens=4, **GREEDY))] == alone(
        model, ["Call me"], max_new_tokens=4, **GREEDY)


def test_a_processor_that_raises_ends_its_own_request_only(model: onnxgen.Model) -> None:
    """A caller's logits processor (Python API) that raises: that request gets the error, the rows beside it
    run on."""
    batcher = Batcher(model, max_batch=4)

    def broken(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if input_ids.shape[1] > 6:
            raise ValueError("broken processor")
        return scores

    good = submit(batcher, model, ["It is a truth"], max_new_tokens=20, **GREEDY)
    bad = submit(batcher, model, ["Call me"], max_new_tokens=20, logits_processors=[broken], **GREEDY)
    kind, value = bad.get(timeout=60)
    while kind == "event":
        kind, value = bad.get(timeout=60)
    assert kind == "error" and "broken processor" in str(value)
    assert [c.token_ids for c in result(good)] == alone(model, ["It is a truth"], max_new_tokens=20, **GREEDY)
    # a constraint that the other options leave no token: its request's error (guidance.py), the others run on
    good = submit(batcher, model, ["It is a truth"], max_new_tokens=20, **GREEDY)
    stuck = submit(batcher, model, ["Call me"], max_new_tokens=20, regex="a", min_new_tokens=3, do_sample=False)
    kind, value = stuck.get(timeout=60)
    while kind == "event":
        kind, value = stuck.get(timeout=60)
    assert kind == "error" and "no token to choose" in str(value)
    assert [c.token_ids for c in result(good)] == alone(model, ["It is a truth"], max_new_tokens=20, **GREEDY)


# -- load(max_batch=N): the batcher in-process, under generate() and stream() ---------------------------------------

def test_calls_from_threads_share_steps_with_each_ones_own_answer(exported: Path, model: onnxgen.Model) -> None:
    """A model loaded with max_batch: calls made at once from several threads (greedy, seeded sampling, beams, a
    stream) decode in shared steps, each answer what the model alone gives; each thread's last_stats is its own."""
    batched = onnxgen.load(exported, threads=1, max_batch=4)
    calls = [("generate", "It is a truth", {"max_new_tokens": 12, **GREEDY}),
             ("generate", ["Call me", "Once upon a time"], {"max_new_tokens": 9, "do_sample": True, "seed": 4, "top_k": 20}),
             ("generate", "The sea", {"max_new_tokens": 7, "num_beams": 2, "num_return_sequences": 2}),
             ("stream", "Whales are", {"max_new_tokens": 10, **GREEDY})] * 3
    barrier = threading.Barrier(len(calls))

    def run(call: tuple[str, Any, dict[str, Any]]) -> tuple[Any, onnxgen.Stats | None]:
        how, prompts, options = call
        barrier.wait()
        if how == "stream":
            return "".join(batched.stream(prompts, **options)), batched.last_stats
        return [c.token_ids for c in batched.generate(prompts, **options)], batched.last_stats

    with ThreadPoolExecutor(len(calls)) as pool:
        got = list(pool.map(run, calls))
    for (how, prompts, options), (answer, stats) in zip(calls, got):
        expected = model.generate(prompts, **options)
        assert answer == ("".join(c.text for c in expected) if how == "stream" else [c.token_ids for c in expected])
        assert stats is not None and stats.new_tokens == sum(len(c.token_ids) for c in expected)
    batcher = batched._batcher
    assert batcher is not None and batcher.jobs == len(calls) and batcher.joined > 0
    assert batcher.steps < sum(options["max_new_tokens"] for _, _, options in calls)  # steps were shared


def test_a_batched_call_is_checked_at_once_and_its_errors_reach_the_caller(exported: Path, exported_growing: Path) -> None:
    batched = onnxgen.load(exported, threads=1, max_batch=2)
    with pytest.raises(OptionsError, match="top_p"):
        batched.stream("Hello", top_p=2.0)  # before the first piece is asked for, as without max_batch
    with pytest.raises(OptionsError, match="cannot stream beam search"):
        batched.stream("Hello", num_beams=2)
    with pytest.raises(OptionsError, match=r"logits_processors\[0\] returned NoneType"):  # raised in the batcher's thread
        batched.generate("Hello", max_new_tokens=3, logits_processors=[lambda ids, scores: None])
    assert len(batched.generate("Hello", max_new_tokens=3)[0].token_ids) == 3  # and the batcher goes on
    with pytest.MonkeyPatch.context() as patch:  # a batcher with no room for calls waiting: refused, and said so
        patch.setattr("onnxgen.model.WAITING_CALLS", 0)
        full = onnxgen.load(exported, threads=1, max_batch=1)
    with pytest.raises(onnxgen.OnnxgenError, match="batcher .* is full: 0 requests are already waiting"):
        full.generate("Hello", max_new_tokens=2)
    for path, max_batch, message in [(exported, 0, "max_batch must be an integer"), (exported, 2.5, "max_batch must be an integer"),
                                     (exported_growing, 2, "growing-cache")]:
        with pytest.raises(OptionsError, match=message):
            onnxgen.load(path, threads=1, max_batch=max_batch)


def test_a_batched_call_makes_its_generator_once(exported: Path, model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator made to check a call is the one the batcher runs (a constraint compiled once, a draft's cache made
    once), also for a call with guesses, which runs apart with them."""
    from onnxgen.beam import BeamSearch
    from onnxgen.generator import Generator

    made: list[str] = []
    for kind in (Generator, BeamSearch):
        original = kind.__init__

        def counting(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            made.append(type(self).__name__)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(kind, "__init__", counting)
    batched = onnxgen.load(exported, threads=1, max_batch=2)
    for options in ({**GREEDY, "max_new_tokens": 6}, {"num_beams": 2, "max_new_tokens": 6}, {**GREEDY, "max_new_tokens": 6, "prompt_lookup_num_tokens": 2}):
        made.clear()
        assert [c.token_ids for c in batched.generate("It is a truth", **options)] == [c.token_ids for c in model.generate("It is a truth", **options)]
        assert len(made) == 2  # the model alone's one, and the batched call's one


def test_a_stream_let_go_of_ends_its_rows_and_an_idle_batcher_lets_its_model_go(exported: Path) -> None:
    """Closing a stream (or dropping it) cancels its rows at the next step; a batcher with nothing to do ends its
    thread, so that a model nobody holds is freed, batcher and cache with it."""
    import gc
    import time
    import weakref

    from onnxgen.batcher import IDLE_SECONDS

    batched = onnxgen.load(exported, threads=1, max_batch=2)
    stream = batched.stream("Hello", max_new_tokens=100, eos_token_id=None)
    next(stream)
    stream.close()
    batcher = batched._batcher
    assert batcher is not None
    deadline = time.monotonic() + 10
    while batcher.cancelled_rows < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.cancelled_rows == 1
    time.sleep(IDLE_SECONDS + 0.5)
    assert batcher._worker is None
    assert batched.generate("Hello", max_new_tokens=2)  # a call after the idle end starts a worker again
    time.sleep(IDLE_SECONDS + 0.5)
    ref = weakref.ref(batched)
    del batched, batcher
    gc.collect()
    assert ref() is None
