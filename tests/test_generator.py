"""The public decode loop: events, log-probabilities against transformers, the caller's hooks, batch
streaming, per-call stats and one model shared by many threads."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import onnxgen
from onnxgen.errors import OptionsError

from .conftest import EVAL_TEXT
from .test_generate import PROMPTS, hf_generate


def drive(generator: onnxgen.Generator) -> list[onnxgen.Event]:
    events = []
    while not generator.done:
        events.extend(generator.step())
    return events


def test_events_add_up_to_the_completions(model: onnxgen.Model) -> None:
    options = dict(max_new_tokens=15, do_sample=True, seed=3, num_return_sequences=2, stop=["th"])
    g = model.generator(PROMPTS, **options)
    events = drive(g)
    completions = g.completions()
    assert completions == model.generate(PROMPTS, **options)
    for row, c in enumerate(completions):
        mine = [e for e in events if e.row == row]
        assert "".join(mine) == c.text and all(e.prompt_index == row // 2 for e in mine)
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + [c.finish_reason]
        assert [e.token_id for e in mine][: len(c.token_ids)] == c.token_ids


def test_an_asyncio_app_steps_in_worker_threads(model: onnxgen.Model) -> None:
    """The step loop from asyncio: each step in whichever worker thread asyncio.to_thread picks (the event loop
    free meanwhile), and the call's text what generate gives (its state is the generator's, not a thread's)."""
    import asyncio

    options = dict(max_new_tokens=15, do_sample=True, seed=3, num_return_sequences=2)

    async def app() -> tuple[list[str], set[int]]:
        g, texts, threads = model.generator(PROMPTS, **options), [""] * 2 * len(PROMPTS), set()

        def step() -> list[onnxgen.Event]:
            threads.add(threading.get_ident())
            return g.step()

        while not g.done:
            for e in await asyncio.to_thread(step):
                texts[e.row] += e
        return texts, threads

    texts, threads = asyncio.run(app())
    assert texts == [c.text for c in model.generate(PROMPTS, **options)] and threading.get_ident() not in threads


def test_finish_and_cancel_end_rows_with_what_they_have(model: onnxgen.Model) -> None:
    g = model.generator(PROMPTS, max_new_tokens=30, eos_token_id=None)
    g.step(), g.step()
    g.finish(1)
    assert [e.row for e in g.step()] == [0, 2]
    g.cancel()
    assert g.done and g.step() == []
    assert [(c.finish_reason, len(c.token_ids)) for c in g.completions()] == [("cancelled", 3), ("cancelled", 2), ("cancelled", 3)]


def test_finish_and_cancel_end_a_beam_search_with_its_best_beams_so_far(model: onnxgen.Model) -> None:
    """Beam search's finish(row) ends the search of the row's prompt: its running beams end then as candidates, so
    its results are what a search ending there by length gives (the same tokens and scores), finish reason
    "cancelled"; the other prompt searches on as if nothing happened. cancel() ends every prompt's."""
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12, eos_token_id=None)
    whole, short = model.generate(PROMPTS[:2], **options), model.generate(PROMPTS[:2], **{**options, "max_new_tokens": 3})
    g = model.generator(PROMPTS[:2], **options)
    for _ in range(3):
        g.step()
    g.finish(3)  # prompt 1's second row: prompt 1's search
    assert not g.done
    drive(g)
    ours = g.completions()
    assert ours[:2] == whole[:2]
    assert [(c.token_ids, c.score, c.finish_reason) for c in ours[2:]] == [(c.token_ids, c.score, "cancelled") for c in short[2:]]
    g = model.generator(PROMPTS[:2], **options)
    for _ in range(3):
        g.step()
    g.cancel()
    assert g.done and g.step() == []
    assert [(c.token_ids, c.score, c.finish_reason) for c in g.completions()] == [(c.token_ids, c.score, "cancelled") for c in short]
    g = model.generator(PROMPTS[:2], **options)
    g.cancel()  # before a step: no beam holds a token
    assert [(c.token_ids, c.finish_reason) for c in g.completions()] == [([], "cancelled")] * 4


def _transition_scores(torch_model: torch.nn.Module, prompts: list[list[int]], eos: int, **kwargs: object) -> tuple[torch.Tensor, object]:
    width = max(map(len, prompts))
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids, attention_mask=mask, pad_token_id=eos, eos_token_id=eos,
                                   output_scores=True, return_dict_in_generate=True, **kwargs)
    beams = out.beam_indices if kwargs.get("num_beams", 1) > 1 else None  # type: ignore[operator]
    return torch_model.compute_transition_scores(out.sequences, out.scores, beams, normalize_logits=beams is None), out


def test_greedy_logprobs_equal_transformers(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    eos = model.defaults.eos_ids[0]
    options = dict(max_new_tokens=12, repetition_penalty=1.2)
    ours = model.generate(PROMPTS[:1], logprobs=3, **options)[0]
    scores, out = _transition_scores(torch_model, PROMPTS[:1], eos, do_sample=False, **options)
    n = len(ours.token_ids)
    np.testing.assert_allclose(ours.logprobs, scores[0, :n].numpy(), atol=2e-4)
    assert ours.score == pytest.approx(sum(ours.logprobs))
    for step, alternatives in enumerate(ours.top_logprobs or []):
        assert len(alternatives) == 3 and next(iter(alternatives)) == ours.token_ids[step]  # greedy: the best one
        assert list(alternatives.values()) == sorted(alternatives.values(), reverse=True)


def test_score_equals_transformers_log_likelihood(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """Model.score: each token's log-probability given those before it, as PyTorch's log-softmax gives it, the
    most likely tokens at each position best first, and the perplexity those make."""
    scores = model.score([PROMPTS[0], np.asarray(PROMPTS[2]), [7]], top_logprobs=4)
    for ids, score in zip([PROMPTS[0], PROMPTS[2]], scores):
        with torch.no_grad():
            lp = torch.log_softmax(torch_model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        expected = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
        assert score.token_ids == ids and score.logprobs[0] is None and score.top_logprobs[0] is None
        np.testing.assert_allclose(score.logprobs[1:], expected, atol=1e-4)
        for position, alternatives in enumerate(score.top_logprobs[1:]):
            assert list(alternatives) == lp[position].topk(4).indices.tolist()
        assert score.total == pytest.approx(float(expected.sum()), abs=1e-3)
        assert score.perplexity == pytest.approx(float(np.exp(-expected.mean())), rel=1e-4)
    assert scores[2].logprobs == [None] and scores[2].total == 0.0 and np.isnan(scores[2].perplexity)
    for bad, error, message in [(("Hello", 21), OptionsError, "top_logprobs"), (("", 0), OptionsError, "nothing to score"),
                                (([10**9], 0), OptionsError, "token ids"), (([1] * 5000, 0), onnxgen.ContextLengthError, "pass stride"),
                                (("Hello", 0, 0), OptionsError, "stride"), (("Hello", 0, model.context_length), OptionsError, "stride")]:
        with pytest.raises(error, match=message):
            model.score(*bad)


def test_score_past_the_context_window_in_strided_windows(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """A text longer than the context: windows of the context's length, `stride` apart, each token scored once,
    given the tokens of the first window that holds it with some before it (PyTorch on the same windows)."""
    ctx, stride = model.context_length, 50
    ids = [int(t) for t in np.random.default_rng(0).integers(0, model.dims.vocab_size, size=ctx + 2 * stride + 7)]
    score = model.score([ids], top_logprobs=2, stride=stride)[0]
    expected = [None]
    for begin in range(0, len(ids), stride):
        window = ids[begin : begin + ctx]
        with torch.no_grad():
            lp = torch.log_softmax(torch_model(torch.tensor([window])).logits[0, :-1].float(), dim=-1)
        targets = range(max(len(expected), begin + 1), begin + len(window))  # not scored by an earlier window
        expected += [float(lp[t - begin - 1, ids[t]]) for t in targets]
        if begin + len(window) == len(ids):
            break
    assert len(score.logprobs) == len(ids) == len(score.top_logprobs) and score.logprobs[0] is None
    np.testing.assert_allclose(score.logprobs[1:], expected[1:], atol=1e-4)
    assert score.logprobs[: ctx] == model.score([ids[:ctx]])[0].logprobs  # the first window alone is the short text's score


def test_cli_score_is_model_score(model: onnxgen.Model, exported: Path, tmp_path: Path) -> None:
    """`onnxgen score`: each file's perplexity as Model.score gives it, a file past the context window in windows
    half the window apart (the default stride), standard input as `-`; progress reported as windows end."""
    text = EVAL_TEXT.read_text()
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text(text[:200])
    long.write_text(text[:3000])
    seen: list[tuple[int, int]] = []
    expected = [model.score(text[:200])[0], model.score(text[:3000], stride=model.context_length // 2, progress=lambda *p: seen.append(p))[0],
                model.score("Call me Ishmael.")[0]]
    assert len(expected[1].token_ids) > model.context_length and len(seen) > 2 and seen[-1] == (len(expected[1].token_ids),) * 2
    r = subprocess.run([sys.executable, "-m", "onnxgen", "score", str(short), str(long), "-", "--model", str(exported), "--json"],
                       input="Call me Ishmael.", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [x["file"] for x in result] == [str(short), str(long), "-"]
    for got, score in zip(result, expected):
        assert got["tokens"] == len(score.token_ids)
        assert got["perplexity"] == pytest.approx(score.perplexity, rel=1e-6) and got["total_logprob"] == pytest.approx(score.total, rel=1e-6)
    # a text of one token has no token scored: no perplexity (Model.score's NaN, which JSON cannot hold, was written)
    one = tmp_path / "one.txt"
    one.write_text("a")
    r = subprocess.run([sys.executable, "-m", "onnxgen", "score", str(one), "--model", str(exported), "--json"], capture_output=True, text=True)
    got = json.loads(r.stdout, parse_constant=lambda constant: pytest.fail(f"not JSON: {constant}"))
    assert got == [{"file": str(one), "tokens": 1, "total_logprob": 0.0, "perplexity": None}]
    r = subprocess.run([sys.executable, "-m", "onnxgen", "score", str(one), "--model", str(exported)], capture_output=True, text=True)
    assert r.returncode == 0 and "nan" not in r.stdout and "no perplexity" in r.stdout, r.stdout


def test_sampled_logprobs_equal_transformers_warpers(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """Sampling draws differ from torch's RNG, so the reference scores our own draws: transformers' model and
    warpers on the same tokens, normalised as compute_transition_scores(normalize_logits=True) does."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    prompt = PROMPTS[0]
    ours = model.generate([prompt], max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.8, seed=5,
                          eos_token_id=None, logprobs=0)[0]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    sequence = torch.tensor([prompt + ours.token_ids])
    with torch.no_grad():
        raw = torch_model(sequence).logits[0, len(prompt) - 1 : -1]
    reference = []
    for i, token in enumerate(ours.token_ids):
        warped = warpers(sequence[:, : len(prompt) + i], raw[i : i + 1].clone())
        reference.append(torch.log_softmax(warped, dim=-1)[0, token].item())
    np.testing.assert_allclose(ours.logprobs, reference, atol=2e-4)
    assert ours.top_logprobs == [{}] * len(ours.token_ids)


@pytest.mark.parametrize(("scale", "negative"), [(1.5, None), (3.0, [7, 99, 150]), (0.5, [200, 201])])
def test_classifier_free_guidance_equals_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, scale: float,
                                                      negative: list[int] | None) -> None:
    """guidance_scale, with transformers' unconditional branch: each prompt's last token, or negative_prompt_ids (one
    negative prompt for every row of a left-padded batch): greedy's tokens and each step's guided log-probabilities."""
    eos = model.defaults.eos_ids[0]
    options = dict(max_new_tokens=12, guidance_scale=scale)
    ours = model.generate(PROMPTS, logprobs=0, negative_prompt=negative, **options)
    theirs = {} if negative is None else {"negative_prompt_ids": torch.tensor([negative] * len(PROMPTS))}
    scores, out = _transition_scores(torch_model, PROMPTS, eos, do_sample=False, **options, **theirs)
    width = max(map(len, PROMPTS))
    for row, c in enumerate(ours):
        n = len(c.token_ids)
        assert c.token_ids == out.sequences[row, width : width + n].tolist()
        np.testing.assert_allclose(c.logprobs, scores[row, :n].numpy(), atol=2e-4)
    assert [c.token_ids for c in ours] != [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=12)]  # it guided


def test_classifier_free_guidance_when_sampling(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    """Sampled tokens (numpy's draws, not torch's), each scored as transformers' guidance processor and warpers score
    it; a negative prompt as text is its tokens; seeded calls repeat."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    prompt, negative = PROMPTS[0], "It is a truth"
    options = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=30, seed=3, eos_token_id=None, guidance_scale=2.0)
    ours = model.generate([prompt], logprobs=0, negative_prompt=negative, **options)[0]
    negative_ids = model.tokenizer.encode(negative)
    assert model.generate([prompt], logprobs=0, negative_prompt=negative_ids, **options)[0] == ours
    processors = LogitsProcessorList([UnbatchedClassifierFreeGuidanceLogitsProcessor(2.0, torch_model, torch.tensor([negative_ids])),
                                      TemperatureLogitsWarper(0.8), TopKLogitsWarper(30)])
    sequence = torch.tensor([prompt + ours.token_ids])
    reference = []
    with torch.no_grad():
        raw = torch_model(sequence).logits[0, len(prompt) - 1 : -1]
        for i, token in enumerate(ours.token_ids):
            processed = processors(sequence[:, : len(prompt) + i], raw[i : i + 1].clone())
            reference.append(torch.log_softmax(processed, dim=-1)[0, token].item())
    np.testing.assert_allclose(ours.logprobs, reference, atol=2e-4)


@pytest.mark.parametrize("processed", [{}, {"repetition_penalty": 1.5, "renormalize_logits": True}])
def test_beam_scores_equal_transformers(model: onnxgen.Model, torch_model: torch.nn.Module, processed: dict) -> None:
    """Also with a processor that moves the scores, renormalised (the log-probabilities sum to 1 again); on the
    longest prompt alone there, since transformers' repetition penalty counts left padding as tokens seen."""
    eos = model.defaults.eos_ids[0]
    prompts = PROMPTS[:1] if processed else PROMPTS
    options = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, length_penalty=0.8, **processed)
    ours = model.generate(prompts, logprobs=2, **options)
    scores, out = _transition_scores(torch_model, prompts, eos, do_sample=False, **options)
    for row, c in enumerate(ours):
        n = len(c.token_ids)
        np.testing.assert_allclose(c.logprobs, scores[row, :n].numpy(), atol=2e-4)
        assert c.score == pytest.approx(out.sequences_scores[row].item(), abs=2e-4)
        assert all(len(a) == 2 and lp in a.values() or lp <= min(a.values()) for a, lp in zip(c.top_logprobs or [], c.logprobs))


def test_logit_bias_and_processors_steer_the_choice(model: onnxgen.Model, torch_model: torch.nn.Module) -> None:
    assert {t for c in model.generate(PROMPTS, max_new_tokens=6, logit_bias={17: 100.0}) for t in c.token_ids} == {17}
    with pytest.raises(OptionsError, match="logit_bias"):
        model.generate(PROMPTS, logit_bias={model.dims.vocab_size: 1.0})

    seen: list[tuple[int, ...]] = []

    def echo_last(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """transformers' convention: the left-padded tokens so far; here, repeat each row's last one."""
        seen.append(input_ids.shape)
        out = np.full_like(scores, -np.inf)
        out[np.arange(len(scores)), input_ids[:, -1]] = 0.0
        return out

    ours = [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=4, logits_processors=[echo_last])]
    assert ours == [[p[-1]] * 4 for p in PROMPTS]
    assert seen == [(3, 7), (3, 8), (3, 9), (3, 10)]

    class TorchEcho:  # the same processor, as transformers calls it
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(echo_last(input_ids.numpy(), scores.numpy()))

    from transformers import LogitsProcessorList

    eos = model.defaults.eos_ids[0]
    assert ours == hf_generate(torch_model, PROMPTS, eos, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([TorchEcho()]))


def test_stopping_criteria_end_rows(model: onnxgen.Model) -> None:
    width = max(map(len, PROMPTS))

    def three_new(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return np.full(len(input_ids), input_ids.shape[1] - width >= 3)

    out = model.generate(PROMPTS, max_new_tokens=10, eos_token_id=None, stopping_criteria=[three_new])
    assert [(len(c.token_ids), c.finish_reason) for c in out] == [(3, "stop")] * 3
    with pytest.raises(OptionsError, match="callables"):
        model.generate(PROMPTS, stopping_criteria=["not callable"])


def test_max_time_ends_rows_when_the_time_is_up(model: onnxgen.Model) -> None:
    """transformers' max_time: the rows still running when it is up end with the token they just got ("time")."""
    out = model.generate(PROMPTS, max_new_tokens=30, eos_token_id=None, max_time=1e-6)
    assert [(len(c.token_ids), c.finish_reason) for c in out] == [(1, "time")] * 3
    events = [e for e in model.stream(PROMPTS[0], max_new_tokens=30, eos_token_id=None, max_time=1e-6)]
    assert [e.finish_reason for e in events] == ["time"]
    assert all(c.finish_reason == "length" for c in model.generate(PROMPTS, max_new_tokens=5, eos_token_id=None, max_time=600.0))


def test_stream_of_several_prompts_tags_rows(model: onnxgen.Model) -> None:
    options = dict(max_new_tokens=12, do_sample=True, seed=9, num_return_sequences=2)
    texts: dict[int, str] = {}
    for event in model.stream(PROMPTS[:2], **options):
        texts[event.row] = texts.get(event.row, "") + event
    assert [texts[r] for r in range(4)] == [c.text for c in model.generate(PROMPTS[:2], **options)]


def test_stream_checks_options_when_called(model: onnxgen.Model) -> None:
    with pytest.raises(OptionsError, match="top_p"):
        model.stream("Hello", top_p=2.0)  # not iterated
    with pytest.raises(OptionsError, match="beam"):
        model.stream("Hello", num_beams=2)


def test_min_new_tokens_counts_steps_for_every_row(model: onnxgen.Model) -> None:
    """Row 0 stops early on a stop string; the other rows' minimum still counts their own steps (it was
    counted from row 0's tokens, so the others could never end with eos)."""
    eos = model.defaults.eos_ids[0]
    options = dict(max_new_tokens=20, min_new_tokens=6, logit_bias={eos: 4.0}, repetition_penalty=1.2)
    first = model.generate(PROMPTS[0], **options)[0]
    stop = next(model.tokenizer.decode([t]) for t in first.token_ids[1:] if model.tokenizer.decode([t]).strip())
    batch = model.generate(PROMPTS, stop=[stop], **options)
    assert batch[0].finish_reason == "stop" and any(c.finish_reason == "eos" for c in batch[1:])
    alone = [model.generate(p, stop=[stop], **options)[0] for p in PROMPTS]
    assert [(c.text, c.token_ids, c.finish_reason) for c in batch] == [(c.text, c.token_ids, c.finish_reason) for c in alone]


def test_token_ids_end_before_a_stop_string(model: onnxgen.Model) -> None:
    full = model.generate("It is a truth", max_new_tokens=30, eos_token_id=None)[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    c = model.generate("It is a truth", max_new_tokens=30, eos_token_id=None, stop=[stop], logprobs=0)[0]
    kept = model.tokenizer.decode(c.token_ids)
    assert c.finish_reason == "stop" and c.text.startswith(kept) and stop not in kept
    assert len(c.token_ids) < len(full.token_ids) and len(c.logprobs or []) == len(c.token_ids)
    assert full.token_ids[: len(c.token_ids)] == c.token_ids


def test_one_model_serves_many_threads(exported: Path) -> None:
    """8 threads x 50 seeded calls on one loaded model give exactly the serial results, and each thread's
    last_stats is its own last call's."""
    shared = onnxgen.load(exported, threads=1)

    def call(i: int) -> list[onnxgen.Completion]:
        kind = i % 3
        options: dict[str, object] = {"max_new_tokens": 4 + i % 7, "seed": i}
        if kind == 0:
            options.update(do_sample=True, top_p=0.9, stop=["e"])
        elif kind == 1:
            options.update(num_beams=2)
        return shared.generate(PROMPTS[i % 3 :], **options)

    serial = [call(i) for i in range(400)]
    results: dict[int, list[onnxgen.Completion]] = {}
    stats_ok: list[bool] = []
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(t, 400, 8):
                results[i] = call(i)
                stats = shared.last_stats
                stats_ok.append(stats is not None and stats.new_tokens == sum(len(c.token_ids) for c in results[i]))
        except BaseException as e:  # noqa: BLE001  (reported below, with the thread's calls)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [results[i] for i in range(400)] == serial
    assert len(stats_ok) == 400 and all(stats_ok)


def test_generator_stats_belong_to_the_call(model: onnxgen.Model) -> None:
    g = model.generator(PROMPTS, max_new_tokens=5, eos_token_id=None)
    drive(g)
    s = g.stats
    assert s.new_tokens == 15 and s.prompt_tokens == sum(map(len, PROMPTS)) and s.time_to_first_token_s > 0
    assert 0 < s.time_to_first_token_s <= s.total_s and s.decode_tokens_per_s > 0
    # A prompt counts once, however many rows run it (return sequences, beams, guidance's twins), as usage counts it
    for options in ({"do_sample": True, "num_return_sequences": 3}, {"num_beams": 3}, {"guidance_scale": 1.5}):
        g = model.generator(PROMPTS, max_new_tokens=2, **options)
        drive(g)
        assert g.stats.prompt_tokens == sum(map(len, PROMPTS)), options


def test_agenerate_and_astream_leave_the_event_loop_free(exported: Path, model: onnxgen.Model) -> None:
    """asyncio: the same answers as generate and stream, calls at once (sharing steps on a model loaded with max_batch),
    the event loop ticking all the while; a task cancelled mid-stream ends its rows; bad options raise as usual."""
    import asyncio

    batched = onnxgen.load(exported, threads=1, max_batch=4)
    prompts = ["It is a truth", "Call me", "Once upon a time"]
    # Calls long enough that a free loop ticks many times while they decode (at 15 tokens a loaded machine once gave 4).
    length = 60
    expected = [model.generate(p, max_new_tokens=length, eos_token_id=None)[0] for p in prompts]

    async def main() -> None:
        for m in (model, batched):
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            tick = asyncio.create_task(ticker())
            got = await asyncio.gather(*[m.agenerate(p, max_new_tokens=length, eos_token_id=None) for p in prompts])
            assert [g[0].token_ids for g in got] == [c.token_ids for c in expected]
            streamed = [piece async for piece in m.astream(prompts[0], max_new_tokens=length, eos_token_id=None)]
            assert "".join(streamed) == expected[0].text and m.last_stats is not None and m.last_stats.new_tokens == length
            tick.cancel()
            assert ticks > 5  # the loop ran other work while the calls decoded
            with pytest.raises(OptionsError, match="top_p"):
                await m.agenerate("Hello", top_p=2.0)

        started = asyncio.Event()

        async def cut_short() -> None:
            async for _ in batched.astream("Hello", max_new_tokens=100, eos_token_id=None):
                started.set()
                await asyncio.sleep(0.01)  # a slow reader: the call is still running when its task is cancelled

        task = asyncio.create_task(cut_short())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if batched._batcher is not None and batched._batcher.cancelled_rows:
                break
            await asyncio.sleep(0.01)
        assert batched._batcher is not None and batched._batcher.cancelled_rows == 1

    asyncio.run(main())
