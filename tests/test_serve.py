"""`onnxgen serve` through the official `openai` client against a live server: blocking and streaming
completions equal model.generate with the same options and seed; errors in OpenAI's shape."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn

import onnxgen
from onnxgen.serve import Limits, create_app

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served(str):
    """The server's base URL, with its app (for what only the server can tell)."""

    app: object


@pytest.fixture(scope="module")
def server(exported: Path) -> Iterator[Served]:
    model = onnxgen.load(exported, threads=1, spinning=False)
    draft = onnxgen.load(exported, threads=1, spinning=False)  # its own weights: a draft that is always right
    app = create_app(model, "tiny", api_key=KEY, limits=Limits(max_tokens=64, max_n=4, max_queue=4, max_body_bytes=4096), draft=draft)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    served = Served(f"http://127.0.0.1:{port}")
    served.app = app
    yield served
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def test_blocking_completions_equal_generate(client: openai.OpenAI, model: onnxgen.Model) -> None:
    prompts = ["It is a truth", "Call me"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0.8, top_p=0.9, n=2, seed=4, logprobs=2)
    expected = model.generate(prompts, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=0,
                              num_return_sequences=2, seed=4, logprobs=2)
    assert [c.text for c in out.choices] == [c.text for c in expected] and [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == sum(len(c.token_ids) for c in expected)
    assert out.usage.prompt_tokens == sum(len(model.tokenizer.encode(p)) for p in prompts)
    first = out.choices[0].logprobs
    assert first.token_logprobs == pytest.approx(expected[0].logprobs)
    # OpenAI's "up to logprobs+1": the 2 most likely tokens, then the chosen one where it is not among them
    # (keyed by token text: two byte-level tokens can share one)
    decode = model.tokenizer.decode
    unlikely = 0
    for token, logprob, alternatives, entry in zip(expected[0].token_ids, expected[0].logprobs, expected[0].top_logprobs, first.top_logprobs):
        texts = list(dict.fromkeys(decode([a]) for a in alternatives))
        assert list(entry)[:len(texts)] == texts
        if decode([token]) in texts:
            assert len(entry) == len(texts)
        else:
            assert list(entry)[len(texts):] == [decode([token])] and entry[decode([token])] == pytest.approx(logprob)
            unlikely += 1
    assert unlikely  # sampled at temperature 0.8: some tokens chosen outside the two most likely
    assert "".join(first.tokens) == expected[0].text or expected[0].finish_reason == "stop"


def test_vllms_names_for_onnxgens_options(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """vLLM's min_tokens and ignore_eos, as its clients and `vllm bench serve --ignore-eos` send them."""
    from onnxgen.serve import CompletionRequest, Limits, _job_input

    plain = model.generate("Call me", max_new_tokens=20, do_sample=False, eos_token_id=None)[0].token_ids
    end = plain[5]  # taken as the end token, the text ends at its 6th token: min_tokens must carry it past
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=20, temperature=0, extra_body={"eos_token_id": end, "min_tokens": 9})
    expected = model.generate("Call me", max_new_tokens=20, do_sample=False, eos_token_id=end, min_new_tokens=9)[0]
    assert out.choices[0].text == expected.text and len(expected.token_ids) > 6
    request = CompletionRequest(prompt="Call me", ignore_eos=True)
    assert _job_input(model, request, Limits(), None, None)[1].eos_token_id is None and model.defaults.eos_token_id is not None
    # stop_token_ids: end tokens besides the model's (with ignore_eos, instead of them); top_k -1: vLLM's "off"
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=20, temperature=0, extra_body={"stop_token_ids": [end]})
    expected = model.generate("Call me", max_new_tokens=20, do_sample=False, eos_token_id=[*model.defaults.eos_ids, end])[0]
    assert out.choices[0].text == expected.text and expected.token_ids == plain[:6] and out.choices[0].finish_reason == "stop"
    ends = [_job_input(model, CompletionRequest(prompt="Hi", **extra), Limits(), None, None)[1].eos_ids
            for extra in ({"stop_token_ids": [end]}, {"stop_token_ids": [end], "ignore_eos": True}, {"stop_token_ids": []})]
    assert ends == [[*model.defaults.eos_ids, end], [end], model.defaults.eos_ids]
    assert _job_input(model, CompletionRequest(prompt="Hi", top_k=-1, temperature=0.5), Limits(), None, None)[1].top_k == 0
    for extra, message in [({"ignore_eos": "yes"}, "ignore_eos is true or false"), ({"ignore_eos": True, "eos_token_id": 3}, "give one of them"),
                           ({"min_tokens": 2, "min_new_tokens": 2}, "give one of them"), ({"stop_token_ids": [end], "eos_token_id": 3}, "give one of them"),
                           ({"stop_token_ids": "3"}, "stop_token_ids is a list of token ids")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model="tiny", prompt="Hi", max_tokens=5, extra_body=extra)


def test_vllms_allowed_token_ids_and_bad_words(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """allowed_token_ids: the text holds only those tokens (each step's choice among them, as generate's with every
    other suppressed); bad_words: the text never holds the word's tokens, alone or after a space (vLLM's two spellings)."""
    plain = model.generate("Call me", max_new_tokens=12, do_sample=False, eos_token_id=None)[0].token_ids
    allowed = sorted(set(plain[::2]))  # some of the tokens it would choose, not all
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=12, temperature=0,
                                    extra_body={"allowed_token_ids": allowed, "eos_token_id": None})
    kept = model.generate("Call me", max_new_tokens=12, do_sample=False, eos_token_id=None,
                          suppress_tokens=sorted(set(range(model.dims.vocab_size)) - set(allowed)))[0]
    assert out.choices[0].text == kept.text and set(kept.token_ids) <= set(allowed) and kept.token_ids != plain
    word = model.tokenizer.decode([plain[3]]).strip()
    banned = {tuple(model.tokenizer.encode(w)) for w in (word, " " + word)}
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=12, temperature=0, extra_body={"bad_words": [word], "eos_token_id": None})
    expected = model.generate("Call me", max_new_tokens=12, do_sample=False, eos_token_id=None, bad_words_ids=[list(b) for b in sorted(banned)])[0]
    assert out.choices[0].text == expected.text and expected.token_ids != plain
    assert not any(tuple(expected.token_ids[i : i + len(b)]) == b for b in banned for i in range(len(expected.token_ids)))
    for extra, message in [({"allowed_token_ids": []}, "allowed_token_ids is a non-empty list"), ({"bad_words": [" "]}, "bad_words is a list of texts")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model="tiny", prompt="Hi", max_tokens=5, extra_body=extra)


def test_vllms_structured_outputs(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """vLLM's guided_json, guided_regex, guided_choice, guided_grammar and structured_outputs: the text generate gives
    under onnxgen's json_schema, regex or grammar; a choice is one of its texts whole (a Lark grammar of the same
    texts chooses the same tokens), special characters and all."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}}, "required": ["name"]}
    choices = ["a b-c", "x.y*(z)", "[1]|^$", "日本"]
    lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)

    def text(**extra: Any) -> str:
        out = client.completions.create(model="tiny", prompt="It is", max_tokens=30, temperature=0, extra_body=extra)
        return out.choices[0].text

    def generated(**constraint: Any) -> str:
        return model.generate("It is", max_new_tokens=30, do_sample=False, **constraint)[0].text

    assert text(guided_json=schema) == text(structured_outputs={"json": schema}) == generated(json_schema=schema)
    assert text(structured_outputs={"json_object": True}) == generated(json_schema={"type": "object"})
    assert text(guided_regex="[a-z]{3,8}!") == text(structured_outputs={"regex": "[a-z]{3,8}!"}) == generated(regex="[a-z]{3,8}!")
    assert text(guided_grammar=lark) == generated(grammar=lark)
    for chosen in (text(guided_choice=choices), text(structured_outputs={"choice": choices}), text(guided_choice=choices[::-1])):
        assert chosen in choices and chosen == generated(grammar=lark)
    sampled = {client.completions.create(model="tiny", prompt="It is", max_tokens=30, temperature=1.5, seed=seed,
                                         extra_body={"guided_choice": choices}).choices[0].text for seed in range(12)}
    assert sampled <= set(choices) and len(sampled) > 1
    for extra, message in [({"guided_json": schema, "guided_regex": "a"}, "one constraint a request"),
                           ({"structured_outputs": {"regex": "a"}, "regex": "b"}, "one constraint a request"),
                           ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs is"),
                           ({"guided_choice": []}, "guided_choice .* is a non-empty list of texts")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model="tiny", prompt="Hi", max_tokens=5, extra_body=extra)


def test_presence_and_frequency_penalties(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """OpenAI's penalties reach the model: the same text as generate() with them, not the text without them."""
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 2.0}
    out = client.completions.create(model="tiny", prompt="It is a truth", max_tokens=24, temperature=0, **penalties)
    expected = model.generate("It is a truth", max_new_tokens=24, do_sample=False, **penalties)[0].text
    assert out.choices[0].text == expected != model.generate("It is a truth", max_new_tokens=24, do_sample=False)[0].text


def test_echo_with_logprobs_scores_the_prompt_as_pytorch_does(client: openai.OpenAI, torch_model: torch.nn.Module, model: onnxgen.Model) -> None:
    """OpenAI's legacy scoring (lm-evaluation-harness's loglikelihood): echo with logprobs gives each prompt token's
    log-probability given those before it (the first has none), max_tokens 0 the prompt alone, 1 one more token."""
    ids = model.tokenizer.encode("It is a truth universally acknowledged")
    scored = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = scored.choices[0].logprobs
    with torch.no_grad():
        reference = torch.log_softmax(torch_model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx(reference[torch.arange(len(ids) - 1), ids[1:]].tolist(), abs=1e-4)
    best = reference[2].topk(3)
    assert list(lp.top_logprobs[3].values())[:3] == pytest.approx(best.values.tolist(), abs=1e-4)  # most likely first
    for i in range(1, len(ids)):  # then the prompt's own token where it is not among them, as vLLM gives it
        assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i]) or ids[i] in reference[i - 1].topk(3).indices
    assert "".join(lp.tokens) == scored.choices[0].text == model.tokenizer.decode(ids) and scored.usage.completion_tokens == 0
    assert lp.text_offset == [len(model.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    one = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=3, temperature=0).choices[0].logprobs
    assert one.token_logprobs[: len(ids)] == lp.token_logprobs and len(one.token_logprobs) == len(ids) + 1
    expected = model.generate([ids], max_new_tokens=1, do_sample=False, logprobs=3)[0]
    assert one.token_logprobs[-1] == pytest.approx(expected.logprobs[0])


def test_greedy_stop_and_echo(client: openai.OpenAI, model: onnxgen.Model) -> None:
    full = model.generate("It is a truth", max_new_tokens=20, do_sample=False)[0]
    stop = full.text[5:7]
    out = client.completions.create(model="tiny", prompt="It is a truth", max_tokens=20, temperature=0, stop=stop, echo=True)
    expected = model.generate("It is a truth", max_new_tokens=20, do_sample=False, stop=[stop])[0]
    assert out.choices[0].text == "It is a truth" + expected.text and out.choices[0].finish_reason == "stop"
    ids = client.completions.create(model="tiny", prompt=[12, 40, 7], max_tokens=5, temperature=0)
    assert ids.choices[0].text == model.generate([[12, 40, 7]], max_new_tokens=5, do_sample=False)[0].text


@pytest.mark.parametrize("echo", [False, True])
def test_streaming_equals_blocking(client: openai.OpenAI, echo: bool) -> None:
    """The chunks of a choice add up to the blocking reply's choice: its text, and its logprobs entry by entry
    (text_offset: where each token starts in the choice's text, the echoed prompt's included)."""
    options = dict(model="tiny", prompt=["It is a truth", "Call me"], max_tokens=15, temperature=0.7, n=2, seed=11, logprobs=2, echo=echo)
    blocking = client.completions.create(**options)
    texts = {i: "" for i in range(4)}
    logprobs: dict[int, dict[str, list]] = {i: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for i in range(4)}
    reasons = {}
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **options):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            for key, entries in logprobs[choice.index].items():
                entries += getattr(choice.logprobs, key)
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
        if chunk.usage:
            assert chunk.usage.completion_tokens == blocking.usage.completion_tokens
    assert [texts[i] for i in range(4)] == [c.text for c in blocking.choices]
    assert [reasons[i] for i in range(4)] == [c.finish_reason for c in blocking.choices]
    assert [logprobs[i] for i in range(4)] == [c.logprobs.model_dump(include=set(logprobs[0])) for c in blocking.choices]
    assert all(offset == len(c.text[:offset]) for c in blocking.choices for offset in c.logprobs.text_offset)


def test_alternatives_the_filters_left_out_are_sent_as_json(server: str, model: onnxgen.Model) -> None:
    """An alternative that top_k left out has log-probability -inf, which JSON cannot hold: the blocking reply was a 500
    (json.dumps refused it) and the stream sent -Infinity, which strict parsers (JavaScript's JSON.parse) refuse. Both
    send vLLM's floor, -9999.0, and otherwise what generate gives."""
    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda constant: pytest.fail(f"not JSON: {constant}"))

    body = {"model": "tiny", "prompt": "It is a truth", "max_tokens": 4, "temperature": 0.8, "seed": 1, "logprobs": 2, "top_k": 1}
    expected = model.generate("It is a truth", max_new_tokens=4, do_sample=True, temperature=0.8, top_k=1, seed=1, logprobs=2)[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(server + "/v1/completions", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    logprobs = strict(reply.text)["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"] == pytest.approx(expected.logprobs)
    assert all(sorted(top.values()) == [-9999.0, pytest.approx(0.0)] for top in logprobs["top_logprobs"])
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=30) as streamed:
        chunks = [strict(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    assert [top for c in chunks for top in c["choices"][0]["logprobs"]["top_logprobs"]] == logprobs["top_logprobs"]


def test_response_format_holds_the_text_to_json(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """OpenAI's response_format (on completions too, as vLLM takes it): json_schema gives JSON its schema allows, the
    text generate() gives with that json_schema; json_object any JSON object; onnxgen's constraints as extra fields."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    out = client.completions.create(model="tiny", prompt="It is a truth", max_tokens=20, temperature=0.9, seed=2, extra_body={"response_format": fmt})
    expected = model.generate("It is a truth", max_new_tokens=20, do_sample=True, temperature=0.9, top_k=0, seed=2, json_schema=schema)[0]
    assert out.choices[0].text == expected.text and isinstance(json.loads(expected.text)["ok"], bool) and out.choices[0].finish_reason == "stop"
    anything = client.completions.create(model="tiny", prompt="Call me", max_tokens=40, temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert anything.choices[0].text == model.generate("Call me", max_new_tokens=40, do_sample=False, json_schema={"type": "object"})[0].text
    assert anything.choices[0].text.startswith("{")
    regex = client.completions.create(model="tiny", prompt="Call me", max_tokens=20, temperature=0, extra_body={"regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", regex.choices[0].text)
    for body, message in [({"response_format": {"type": "yaml"}}, "response_format is"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format is"),
                          ({"response_format": {"type": "json_object"}, "regex": "a"}, "not both"),
                          ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "json_schema is not usable")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model="tiny", prompt="Hi", max_tokens=5, extra_body=body)


def test_beam_search_as_an_extra_field(client: openai.OpenAI, model: onnxgen.Model) -> None:
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=8, temperature=0, n=2, extra_body={"num_beams": 3})
    assert [c.text for c in out.choices] == [c.text for c in model.generate("Call me", max_new_tokens=8, num_beams=3, num_return_sequences=2)]
    # beams at a temperature stay beam search (vLLM's); do_sample asks for beam sampling, at the request's temperature
    assert client.completions.create(model="tiny", prompt="Call me", max_tokens=8, temperature=0.8, n=2,
                                     extra_body={"num_beams": 3}).choices == out.choices
    sampled = client.completions.create(model="tiny", prompt="Call me", max_tokens=8, temperature=1.5, n=2, seed=4,
                                        extra_body={"num_beams": 3, "do_sample": True})
    assert [c.text for c in sampled.choices] == [c.text for c in model.generate(
        "Call me", max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=True, temperature=1.5, top_k=0, seed=4)]
    assert [c.text for c in sampled.choices] != [c.text for c in out.choices]
    # a stop string with beams: the beams that hold one end there and come back cut, as model.generate's
    stop = out.choices[0].text[3:5]
    stopped = client.completions.create(model="tiny", prompt="Call me", max_tokens=8, temperature=0, n=2, stop=[stop],
                                        extra_body={"num_beams": 3})
    ours = model.generate("Call me", max_new_tokens=8, num_beams=3, num_return_sequences=2, stop=[stop])
    assert [c.text for c in stopped.choices] == [c.text for c in ours] != [c.text for c in out.choices]
    assert "stop" in {c.finish_reason for c in ours} and not any(stop in c.text for c in stopped.choices)


def test_classifier_free_guidance_as_extra_fields(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """guidance_scale and negative_prompt: the request's twin rows run beside the server's shared step, the same
    text as model.generate, also with another request in the same steps."""
    guided = {"guidance_scale": 2.5, "negative_prompt": "It is a truth"}
    expected = [c.text for c in model.generate(["Call me", "Once upon"], max_new_tokens=10, **guided)]
    assert expected != [c.text for c in model.generate(["Call me", "Once upon"], max_new_tokens=10)]
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(client.completions.create, model="tiny", prompt=["Call me", "Once upon"], max_tokens=10, temperature=0,
                            extra_body=body) for body in (guided, {})]
        assert [c.text for c in runs[0].result().choices] == expected
        assert [c.text for c in runs[1].result().choices] == [c.text for c in model.generate(["Call me", "Once upon"], max_new_tokens=10)]


def test_prompt_lookup_as_an_extra_field(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """Run apart by the server (its steps write several positions of its row): plain decoding's text, streamed too."""
    prompt = "It is a truth. It is a truth. It is"
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)[0].text
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"prompt_lookup_num_tokens": 3})
    assert out.choices[0].text == expected
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"prompt_lookup_num_tokens": 3})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
    with pytest.raises(openai.BadRequestError, match="one sequence a call"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=12, n=2, extra_body={"prompt_lookup_num_tokens": 3})


def test_the_servers_draft_model_on_request(client: openai.OpenAI, model: onnxgen.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """"assistant_model": true asks for the draft the server loaded (serve --assistant-model): plain decoding's text."""
    from onnxgen.cache import InPlaceCache

    appended, append = [], InPlaceCache.append

    def counted(cache: InPlaceCache, tokens: list[int]) -> np.ndarray:  # drafts, and the passes that check them
        appended.append(tokens)
        return append(cache, tokens)

    monkeypatch.setattr(InPlaceCache, "append", counted)
    expected = model.generate("Call me", max_new_tokens=12, do_sample=False)[0].text
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=12, temperature=0, extra_body={"assistant_model": True})
    assert out.choices[0].text == expected and appended  # plain decoding appends nothing
    for wrong in ("a/folder", 1):
        with pytest.raises(openai.BadRequestError, match="assistant_model is true"):
            client.completions.create(model="tiny", prompt="Call me", max_tokens=12, extra_body={"assistant_model": wrong})


def test_generation_config_options_as_extra_fields(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """sequence_bias in generation_config.json's JSON form (pairs of token ids and a bias); max_time's reason is
    OpenAI's "length" (the budget ran out)."""
    plain = model.generate("Call me", max_new_tokens=6)[0].token_ids
    bias = [[plain[:2], -50.0]]
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=6, temperature=0, extra_body={"sequence_bias": bias})
    assert out.choices[0].text == model.generate("Call me", max_new_tokens=6, sequence_bias={tuple(plain[:2]): -50.0})[0].text
    assert out.choices[0].text != model.tokenizer.decode(plain)
    out = client.completions.create(model="tiny", prompt="Call me", max_tokens=50, extra_body={"max_time": 1e-6, "eos_token_id": None})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 1


def test_token_healing_as_an_extra_field(client: openai.OpenAI, model: onnxgen.Model) -> None:
    """The text continues the prompt as sent; the first token's text re-covers the prompt's end, so its offset is the
    text's start and the next one's is where its own text begins; a stream sends the same text."""
    prompt = "It is a truth universally acknowledged, that a "
    expected = model.generate(prompt, max_new_tokens=6, token_healing=True, logprobs=1)[0]
    assert expected.healed == " "
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=1, extra_body={"token_healing": True})
    choice = out.choices[0]
    assert choice.text == expected.text and choice.logprobs.token_logprobs == pytest.approx(expected.logprobs)
    tokens = choice.logprobs.tokens
    assert "".join(tokens) == expected.healed + expected.text
    assert choice.logprobs.text_offset[:2] == [0, len(tokens[0]) - 1]
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                         extra_body={"token_healing": True})
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    # echoed with the prompt's log-probabilities: the first new token takes the place of the prompt's last one
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=1, echo=True,
                                       extra_body={"token_healing": True}).choices[0]
    assert echoed.text == prompt + expected.text and "".join(echoed.logprobs.tokens) == echoed.text
    offsets = echoed.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[len(model.tokenizer.encode(prompt)) - 1] == len(prompt) - 1
    assert echoed.logprobs.token_logprobs[-len(expected.logprobs):] == pytest.approx(expected.logprobs)
    chunks = [c.choices[0] for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                                                              echo=True, stream=True, extra_body={"token_healing": True})]
    assert "".join(c.text for c in chunks) == echoed.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == echoed.logprobs.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == offsets
    # beam search streams each choice whole, after the echo
    beams = [c.choices[0] for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=1, echo=True,
                                                             stream=True, extra_body={"token_healing": True, "num_beams": 2})]
    assert "".join(t for c in beams if c.logprobs for t in c.logprobs.tokens) == "".join(c.text for c in beams)
    beam_offsets = [o for c in beams if c.logprobs for o in c.logprobs.text_offset]
    assert beam_offsets == sorted(beam_offsets) and beam_offsets[len(model.tokenizer.encode(prompt)) - 1] == len(prompt) - 1


def test_models_and_health(client: openai.OpenAI, server: str, model: onnxgen.Model) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    listed = httpx.get(server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert listed["max_model_len"] == model.context_length == 128  # vLLM's name for the context window
    assert httpx.get(server + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize(("options", "message"), [
    ({"max_tokens": 1000}, "max_tokens"),
    ({"n": 9}, "n is at most"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"prompt": [10**9]}, "token ids"),
    ({"prompt": [[1.5]]}, "prompt"),
    ({"n": 2, "temperature": 0}, "greedy"),
    ({"extra_body": {"top_k": 2.5}}, "top_k"),
    ({"extra_body": {"nonsense": 1}}, "unknown"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"best_of": 2}, "best_of"),
    ({"extra_body": {"max_new_tokens": 900}}, "max_new_tokens is OpenAI's max_tokens here"),  # would pass the max_tokens limit
    ({"extra_body": {"max_length": 40}}, "max_length is OpenAI's max_tokens"), ({"extra_body": {"num_return_sequences": 9}}, "n here"),
    ({"max_tokens": 0, "echo": True, "stream": True}, "not streamed"),
    ({"extra_body": {"num_beams": None}}, "num_beams must be an integer"),  # was a 500 (a TypeError)
])
def test_bad_requests_are_400_in_openais_shape(client: openai.OpenAI, options: dict[str, object], message: str) -> None:
    request = {"model": "tiny", "prompt": "Hello", "max_tokens": 5, **options}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**request)  # type: ignore[call-overload]
    assert caught.value.status_code == 400 and message in caught.value.body["message"]  # type: ignore[index]


def test_null_fields_mean_openais_defaults(server: Served) -> None:
    """Clients that send every field send null for those they do not set; an extra field's null keeps its meaning."""
    nulls = {k: None for k in ("max_tokens", "temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stop", "seed",
                               "logprobs", "echo", "stream", "stream_options", "user", "model")}
    r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"prompt": "Hello", **nulls})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16  # max_tokens: OpenAI's default
    from onnxgen.serve import CompletionRequest

    request = CompletionRequest.model_validate({"prompt": "Hello", "temperature": None, "eos_token_id": None})
    assert request.temperature == 1.0 and request.model_extra == {"eos_token_id": None}


def test_a_request_for_another_model_is_404(client: openai.OpenAI, server: Served) -> None:
    """OpenAI's answer (and vLLM's) to a model the server does not have; a request that names none gets this one."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hello", max_tokens=3)
    assert caught.value.body["code"] == "model_not_found" and "'tiny'" in caught.value.body["message"]  # type: ignore[index]
    r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_the_openapi_document_says_what_the_server_answers(server: Served) -> None:
    """/openapi.json, what clients and gateways are generated from: errors in OpenAI's shape for every route behind the
    API, never FastAPI's 422 (this server answers a refused body 400), the event streams, /metrics' text."""
    from onnxgen.serve import ErrorBody

    document = httpx.get(server + "/openapi.json").json()
    routes = {(method, path): operation["responses"] for path, methods in document["paths"].items() for method, operation in methods.items()}
    assert "422" not in json.dumps(document) and "HTTPValidationError" not in document["components"]["schemas"]
    for (method, path), responses in routes.items():
        if path not in ("/health", "/metrics"):
            assert responses["4XX"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        assert set(routes["post", path]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert list(routes["get", "/metrics"]["200"]["content"]) == ["text/plain"]
    headers = {"Authorization": f"Bearer {KEY}"}
    answers = [httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 5}),  # no key
               httpx.post(server + "/v1/completions", headers=headers, json={"prompt": "x", "top_p": 2}),
               httpx.post(server + "/v1/completions", headers=headers, json={"max_tokens": 5}),  # no prompt
               httpx.post(server + "/v1/completions", headers=headers, json={"prompt": "x", "model": "gpt-4"}),
               httpx.get(server + "/v1/responses/resp_none", headers=headers),
               # what FastAPI and Starlette answer themselves: no such route, a method the route lacks, a body not UTF-8
               httpx.get(server + "/v1/nothing", headers=headers), httpx.put(server + "/v1/completions", headers=headers),
               httpx.post(server + "/v1/completions", headers={**headers, "Content-Type": "application/json"}, content=b'{"prompt": "\xff"}'),
               httpx.post(server + "/v1/responses/resp_none", headers=headers)]  # a path with two routes, GET and DELETE
    assert [r.status_code for r in answers] == [401, 400, 400, 404, 404, 404, 405, 400, 405]
    for r in answers:
        ErrorBody.model_validate(r.json())
    assert answers[6].headers["allow"] == "POST" and answers[-1].headers["allow"] == "DELETE, GET"


Samples = dict[tuple[str, tuple[str, ...]], float]


def _samples(scrape: str) -> Samples:
    """A /metrics page's values by sample name and label values."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(s.labels.values())): s.value for family in text_string_to_metric_families(scrape) for s in family.samples}


def test_auth_size_and_queue_limits(server: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).completions.create(model="tiny", prompt="x")
    r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"prompt": "x" * 10000})
    assert r.status_code == 400 and "request body over" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"] == "the body is not valid JSON: Expecting property name enclosed in double quotes (character 1)"
    # curl -d's form type: FastAPI reads a body as JSON only where the request says it is JSON (against cross-site posts)
    r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"},
                   content=b'{"prompt": "x"}')
    assert r.status_code == 400 and r.json()["error"]["message"] == ("send the body as JSON, with Content-Type: application/json "
                                                                     "(this one's: application/x-www-form-urlencoded)")
    rejected = _samples(httpx.get(server + "/metrics").text)["onnxgen_requests_total", ("rejected",)]
    # More requests at once than the queue holds: the surplus is answered 429 at once, the rest complete. The
    # model is held at its first forward until a 429 has come back, so that the queue is full whatever the
    # machine's speed (without it, a fast server drained the queue as the requests came in).
    def call(i: int) -> int:
        return httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"prompt": "It is", "max_tokens": 60, "temperature": 0.5, "seed": i}).status_code

    session = server.app.state.batcher.model.runtime.session  # type: ignore[attr-defined]
    run, gate = session.run_with_iobinding, threading.Event()
    session.run_with_iobinding = lambda *args: gate.wait(30) and run(*args)
    try:
        with ThreadPoolExecutor(16) as pool:
            calls = [pool.submit(call, i) for i in range(16)]
            deadline = time.time() + 30
            while not any(c.done() and c.result() == 429 for c in calls) and time.time() < deadline:
                time.sleep(0.01)
            gate.set()
            codes = [c.result() for c in calls]
    finally:
        session.run_with_iobinding = run
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    assert _samples(httpx.get(server + "/metrics").text)["onnxgen_requests_total", ("rejected",)] == rejected + codes.count(429)


def test_requests_sent_at_once_share_steps(exported: Path, model: onnxgen.Model) -> None:
    """Unseeded greedy requests sent at once decode in shared steps (tests/test_batcher.py has the batcher's
    own tests), with each answer what the prompt gives alone."""
    app = create_app(onnxgen.load(exported, threads=1), "tiny", limits=Limits(max_batch=8))
    transport = httpx.ASGITransport(app=app)
    prompts = ["It is a truth", "Call me", "The", "Once upon"]

    async def run() -> list[str]:
        import asyncio

        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            replies = await asyncio.gather(*(http.post("/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 0})
                                             for p in prompts))
        return [r.json()["choices"][0]["text"] for r in replies]

    import asyncio

    texts = asyncio.run(run())
    assert texts == [model.generate(p, max_new_tokens=6, do_sample=False)[0].text for p in prompts]
    assert app.state.batcher.jobs == 4 and app.state.batcher.steps < 4 * 5


def test_the_serve_command(exported: Path, model: onnxgen.Model) -> None:
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "onnxgen", "serve", "--model", str(exported), "--port", str(port), "--threads", "1",
                             "--max-batch", "4", "--prefill-chunk", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model=exported.name, prompt="Call me", max_tokens=6, temperature=0)
        assert out.choices[0].text == model.generate("Call me", max_new_tokens=6, do_sample=False)[0].text
        long = "It is a truth universally acknowledged"  # written 2 tokens a step
        out = client.completions.create(model=exported.name, prompt=long, max_tokens=6, temperature=0)
        assert out.choices[0].text == model.generate(long, max_new_tokens=6, do_sample=False)[0].text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_serve_command_refuses_an_address_it_cannot_listen_on_before_loading(exported: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host, why in (("127.0.0.1", "Address already in use"), ("no-such-host.invalid", "")):
            done = subprocess.run([sys.executable, "-m", "onnxgen", "serve", "--model", str(exported), "--host", host, "--port", str(port)],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 1 and done.stderr.startswith(f"onnxgen: error: cannot listen on {host}:{port}: {why}")
            assert len(done.stderr.splitlines()) == 1  # nothing loaded: no "serving ..." line
    # Other machines' requests without a key: said once, before the load (here of a folder that is not there)
    port = _free_port()
    for host, key, warned in (("0.0.0.0", [], True), ("0.0.0.0", ["--api-key", "k"], False), ("127.0.0.1", [], False)):
        done = subprocess.run([sys.executable, "-m", "onnxgen", "serve", "--model", "/no/such/folder", "--host", host, "--port", str(port), *key],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.splitlines()[-1] == "onnxgen: error: model folder not found: /no/such/folder"
        assert (done.stderr.splitlines()[0] == "onnxgen: warning: 0.0.0.0 takes requests from other machines, and without --api-key "
                                               "anyone who reaches the port can use the model") == warned


def test_the_serve_command_refuses_a_cache_it_cannot_reserve(exported: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "onnxgen", "serve", "--model", str(exported), "--max-batch", "1000000000000"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("onnxgen: error: max_batch 1000000000000: a key/value cache")


def test_metrics_count_requests_tokens_and_times(exported: Path) -> None:
    """GET /metrics, Prometheus' text format without the API key (as /health): each request's outcome, its usage's
    tokens, the time to its first token (none for beam search and scoring) and its duration; the batcher's state."""
    import asyncio

    app = create_app(onnxgen.load(exported, threads=1), "tiny", api_key=KEY, limits=Limits(max_tokens=64))
    auth = {"Authorization": f"Bearer {KEY}"}
    completed = [{"prompt": "Call me", "max_tokens": 5, "n": 2, "seed": 3},
                 {"prompt": "The", "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
                 {"prompt": "It is", "max_tokens": 3, "temperature": 0, "num_beams": 2},
                 {"prompt": "Once upon a time", "max_tokens": 0, "echo": True, "logprobs": 1}]  # scored, nothing generated
    invalid = [{"prompt": "x", "max_tokens": 1000}, {"prompt": "x", "model": "other"}, {"prompt": "x", "max_tokens": -1}]

    async def run() -> tuple[list[dict[str, int]], list[int], httpx.Response, Samples]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            usages = []
            for body in completed:
                r = await http.post("/v1/completions", json=body, headers=auth)
                assert r.status_code == 200, r.text
                last = json.loads(r.text.split("data: ")[-2]) if body.get("stream") else r.json()  # a stream's usage: its last chunk
                usages.append(last["usage"])
            codes = [(await http.post("/v1/completions", json=body, headers=auth)).status_code for body in invalid]
            unauthorized = await http.get("/v1/models")
            scrape = await http.get("/metrics")
        assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
        return usages, codes, unauthorized, _samples(scrape.text)

    usages, codes, unauthorized, samples = asyncio.run(run())
    assert codes == [400, 404, 400] and unauthorized.status_code == 401
    outcomes = {outcome: samples["onnxgen_requests_total", (outcome,)] for outcome in ("completed", "cancelled", "error", "invalid", "rejected")}
    assert outcomes == {"completed": 4, "cancelled": 0, "error": 0, "invalid": 3, "rejected": 0}
    assert samples["onnxgen_prompt_tokens_total", ()] == sum(u["prompt_tokens"] for u in usages)
    assert samples["onnxgen_generation_tokens_total", ()] == sum(u["completion_tokens"] for u in usages) > 0
    assert samples["onnxgen_time_to_first_token_seconds_count", ()] == 2  # the sampled and the streamed request
    assert samples["onnxgen_request_duration_seconds_count", ()] == 4
    assert 0 < samples["onnxgen_time_to_first_token_seconds_sum", ()] < samples["onnxgen_request_duration_seconds_sum", ()]
    state = {name: samples[name, ()] for name in ("onnxgen_requests_waiting", "onnxgen_requests_running", "onnxgen_rows_busy", "onnxgen_rows")}
    assert state == {"onnxgen_requests_waiting": 0, "onnxgen_requests_running": 0, "onnxgen_rows_busy": 0, "onnxgen_rows": 8}
    assert samples["onnxgen_decode_steps_total", ()] == app.state.batcher.steps > 0


def test_tokenize_and_detokenize(server: Served, model: onnxgen.Model) -> None:
    """vLLM's shapes, with the served model's own tokenizer; behind the API key; bad ids and other models refused."""
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "It is a truth universally acknowledged"
    r = httpx.post(server + "/tokenize", json={"prompt": text}, headers=auth)
    assert r.status_code == 200 and r.json() == {"count": len(model.tokenizer.encode(text)), "max_model_len": 128,
                                                 "tokens": model.tokenizer.encode(text)}
    r = httpx.post(server + "/detokenize", json={"tokens": r.json()["tokens"], "model": "tiny"}, headers=auth)
    assert r.status_code == 200 and r.json() == {"prompt": text}
    assert httpx.post(server + "/tokenize", json={"prompt": text}).status_code == 401
    r = httpx.post(server + "/detokenize", json={"tokens": [5, 10**6]}, headers=auth)
    assert r.status_code == 400 and "1000000 is not a token id" in r.json()["error"]["message"]
    r = httpx.post(server + "/tokenize", json={"prompt": text, "model": "other"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.post(server + "/tokenize", json={"text": text}, headers=auth).status_code == 400  # not its field


def test_a_browser_page_of_an_allowed_origin_may_call_the_server(exported: Path) -> None:
    """--allowed-origin (CORS): a preflight from that origin is answered (before the API key is asked for), and the
    reply, a 401 included, carries the header that lets the page's script read it; another origin gets none."""
    import asyncio

    app = create_app(onnxgen.load(exported, threads=1), "tiny", api_key=KEY, allowed_origins=["https://app.example"])
    plain = create_app(onnxgen.load(exported, threads=1), "tiny", api_key=KEY)

    async def run(app: Any) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            preflight = await http.options("/v1/completions", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                                                       "Access-Control-Request-Headers": "authorization,content-type"})
            answered = await http.post("/v1/completions", json={"prompt": "It is", "max_tokens": 2}, headers={
                "Origin": "https://app.example", "Authorization": f"Bearer {KEY}"})
            refused = await http.post("/v1/completions", json={"prompt": "It is"}, headers={"Origin": "https://app.example"})
            other = await http.post("/v1/completions", json={"prompt": "It is", "max_tokens": 2}, headers={
                "Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
            return [preflight, answered, refused, other]

    preflight, answered, refused, other = asyncio.run(run(app))
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"] and "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://app.example"
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example"
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers  # the browser keeps it from the page
    preflight, answered, _, _ = asyncio.run(run(plain))
    assert preflight.status_code == 401 and "access-control-allow-origin" not in answered.headers  # no origin allowed by default


def test_the_serve_command_serves_https(exported: Path, tmp_path: Path) -> None:
    """--ssl-certfile and --ssl-keyfile: the API over HTTPS (a self-signed certificate the client trusts); a key that
    is not the certificate's, or one of the pair alone, is one line of error before the model loads."""
    import ssl
    import subprocess
    import sys

    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.pem")],
                       check=True, capture_output=True)
    port = _free_port()
    command = [sys.executable, "-m", "onnxgen", "serve", "--model", str(exported), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*command, "--ssl-certfile", str(tmp_path / "a.pem"), "--ssl-keyfile", str(tmp_path / "a.key")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, answer = time.time() + 60, None
        while answer is None and time.time() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(f"https://127.0.0.1:{port}/v1/completions", json={"prompt": "It is", "max_tokens": 3, "temperature": 0},
                                    verify=ssl.create_default_context(cafile=tmp_path / "a.pem"))
            except httpx.ConnectError:
                time.sleep(0.2)
        assert answer is not None and answer.status_code == 200, proc.stderr.read() if proc.poll() is not None else "no answer"
        with pytest.raises(httpx.ConnectError):  # not trusted under another certificate
            httpx.get(f"https://127.0.0.1:{port}/health", verify=ssl.create_default_context(cafile=tmp_path / "b.pem"))
        with pytest.raises(httpx.RemoteProtocolError):  # nor spoken in plain HTTP
            httpx.get(f"http://127.0.0.1:{port}/health")
    finally:
        proc.terminate()
        stderr = proc.communicate(timeout=30)[1]
    assert f"on https://127.0.0.1:{port}/v1" in stderr
    for extra, message in ((["--ssl-certfile", str(tmp_path / "a.pem"), "--ssl-keyfile", str(tmp_path / "b.key")], "cannot serve HTTPS with"),
                           (["--ssl-certfile", str(tmp_path / "a.pem")], "HTTPS needs both --ssl-certfile and --ssl-keyfile"),
                           (["--ssl-certfile", str(tmp_path / "none.pem"), "--ssl-keyfile", str(tmp_path / "a.key")], "No such file")):
        done = subprocess.run([*command[:5], "/no/such/model", *command[6:], *extra], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_a_client_that_goes_away_ends_its_rows(exported: Path) -> None:
    """A client that hangs up, streamed or not, ends its request's rows within a moment (each step here slowed to
    20 ms: the 100 tokens asked for would take 2 s); the metrics count both cancelled."""
    app = create_app(onnxgen.load(exported, threads=1), "tiny", limits=Limits(max_tokens=100))
    cache = app.state.batcher.cache
    decode = cache.decode
    cache.decode = lambda *args, **kw: (time.sleep(0.02), decode(*args, **kw))[1]
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    body = {"prompt": "It is", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    try:
        start = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting: its connection closes
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=0.3)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={**body, "stream": True}) as streamed:
            next(streamed.iter_lines())  # the first chunk, then the client hangs up
        while app.state.batcher.cancelled_rows < 2 and time.perf_counter() - start < 10:
            time.sleep(0.05)
        took = time.perf_counter() - start
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.should_exit = True
    assert app.state.batcher.cancelled_rows == 2 and took < 1.9  # well before either's 100 slowed steps
    assert 'onnxgen_requests_total{outcome="cancelled"} 2.0' in scrape


def test_a_bug_is_one_line_of_error_not_a_traceback(exported: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The client is told one line; the traceback goes to the server's log, for whoever runs it: a bug in a handler, and
    one in the decode worker's thread, answered whole or streamed."""
    import asyncio

    model = onnxgen.load(exported, threads=1)
    app = create_app(model, "tiny")

    async def run(path: str, body: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            return await http.post(path, json=body)

    def broken(*args: Any, **kwargs: Any) -> Any:  # a bug's stand-in
        raise IndexError("list index out of range")

    bug = {"message": "internal error (IndexError)", "type": "server_error", "param": None, "code": None}
    with monkeypatch.context() as patch:
        patch.setattr(model.tokenizer, "encode", broken)
        r = asyncio.run(run("/tokenize", {"prompt": "It is"}))
    assert r.status_code == 500 and r.json()["error"] == bug
    monkeypatch.setattr(model, "generator", broken)  # the batcher's worker makes each request's generator
    r = asyncio.run(run("/v1/completions", {"prompt": "It is", "max_tokens": 3}))
    assert r.status_code == 500 and r.json()["error"] == bug
    streamed = asyncio.run(run("/v1/completions", {"prompt": "It is", "max_tokens": 3, "stream": True}))
    assert streamed.status_code == 200 and f"data: {json.dumps({'error': bug})}" in streamed.text
    logged = [r for r in caplog.records if r.name == "onnxgen" and r.exc_info]
    assert len(logged) == 3 and all(r.exc_info[0] is IndexError and "Traceback" in caplog.text for r in logged)  # type: ignore[index]
