"""Chat templates (onnxgen/chat.py): the export keeps a checkpoint's template, and the runtime renders a
conversation to the same prompt text as transformers' apply_chat_template."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import onnxgen
from onnxgen.errors import OptionsError
from onnxgen.export import export
from onnxgen.quantize import QuantizeOptions, quantize

# What templates use: the special tokens by name, loop controls, tojson, raise_exception, {% generation %} blocks,
# the tools and an assistant's tool calls (their arguments an object, as transformers documents them) and results.
TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = 'You are helpful.' %}{% endif %}"
    "{{ bos_token }}system: {{ system | tojson }}\n"
    "{% if tools %}tools: {{ tools | map(attribute='function') | map(attribute='name') | join(', ') }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant', 'tool'] %}{{ raise_exception('roles are user, assistant and tool') }}{% endif %}"
    "{% if message['content'] == 'skip me' %}{% continue %}{% endif %}"
    "{% if message['role'] == 'assistant' %}assistant: {% generation %}{% if message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}{{ call['function']['name'] }}{{ call['function']['arguments'] | tojson }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endgeneration %}{{ eos_token }}\n"
    "{% elif message['role'] == 'tool' %}result: {{ message['content'] }}\n"
    "{% else %}user: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Answer in French — « oui »."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "skip me"}, {"role": "user", "content": "Again"}],
]


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = shutil.copytree(checkpoint, tmp_path_factory.mktemp("chat") / "ckpt")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def chat_folder(chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat-export") / "tiny-chat"
    export(str(chat_checkpoint), out, quiet=True)
    return out


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_a_conversation_renders_as_transformers_renders_it(chat_folder: Path, chat_checkpoint: Path, add_generation_prompt: bool) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chat_checkpoint)
    model = onnxgen.load(chat_folder, threads=1)
    assert (chat_folder / "chat_template.jinja").read_text() == TEMPLATE
    for messages in CONVERSATIONS:
        text = model.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert text.startswith("<|endoftext|>system: ") and text.endswith("assistant:") == add_generation_prompt


def test_what_a_template_refuses_is_an_options_error(chat_folder: Path, exported: Path) -> None:
    model = onnxgen.load(chat_folder, threads=1)
    with pytest.raises(OptionsError, match="chat template refuses these messages: roles are user, assistant and tool"):
        model.apply_chat_template([{"role": "critic", "content": "x"}])
    for bad in ([], [{"role": "user"}], "Hello", [{"role": "user", "content": 3}], [{"role": "assistant", "content": None}]):
        with pytest.raises(OptionsError, match="messages must be a non-empty list"):
            model.apply_chat_template(bad)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="messages must be a non-empty list"):  # the pipeline's chat too (was a KeyError)
        onnxgen.pipeline(model=model)([{"content": "Hello"}])
    with pytest.raises(OptionsError, match="tools must be a list of JSON schemas"):
        model.apply_chat_template(CONVERSATIONS[0], tools={"name": "f"})  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="the last message has no content to go on with"):
        model.apply_chat_template(_as_template_takes_it(ANSWERED[:2]), add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(OptionsError, match="has no chat template"):
        onnxgen.load(exported, threads=1).apply_chat_template(CONVERSATIONS[0])


def test_a_template_that_does_not_parse_keeps_the_model_from_chatting_not_from_loading(chat_folder: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(chat_folder, tmp_path / "broken")
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}")
    manifest = json.loads((broken / "onnxgen.json").read_text())  # the file's size changed: describe it again
    manifest["files"]["chat_template.jinja"]["bytes"] = (broken / "chat_template.jinja").stat().st_size
    (broken / "onnxgen.json").write_text(json.dumps(manifest))
    model = onnxgen.load(broken, threads=1)
    assert model.generate("It is", max_new_tokens=3)[0].token_ids
    with pytest.raises(OptionsError, match="chat template does not parse: .*no_such_filter"):
        model.apply_chat_template(CONVERSATIONS[0])


def test_a_quantized_folder_keeps_the_template(chat_folder: Path, tmp_path: Path) -> None:
    quantize(chat_folder, tmp_path / "int8", QuantizeOptions(mode="int8", max_ppl_increase=10.0), quiet=True)
    model = onnxgen.load(tmp_path / "int8", threads=1)
    assert model.apply_chat_template(CONVERSATIONS[1]) == onnxgen.load(chat_folder, threads=1).apply_chat_template(CONVERSATIONS[1])


@pytest.fixture(scope="module")
def chat_server(chat_folder: Path, exported: Path) -> Iterator[tuple[str, str]]:
    """`onnxgen serve` over the chat folder, and over a folder without a template, each on a port of its own."""
    import threading
    import time

    import uvicorn

    from onnxgen.serve import Limits, create_app

    from .test_serve import _free_port

    servers, bases = [], []
    for folder, name in ((chat_folder, "tiny-chat"), (exported, "tiny")):
        port = _free_port()
        app = create_app(onnxgen.load(folder, threads=1), name, limits=Limits(max_tokens=64, max_n=4))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        servers.append(server)
        bases.append(f"http://127.0.0.1:{port}")
    yield bases[0], bases[1]
    for server in servers:
        server.should_exit = True


def _client(base: str) -> Any:
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def test_chat_completions_answer_as_generate_on_the_rendered_prompt(chat_server: tuple[str, str], chat_folder: Path) -> None:
    """Through the official client: blocking and streamed replies equal model.generate on the conversation's
    prompt text; usage counts the rendered prompt's tokens; log-probabilities in OpenAI's chat shape."""
    model = onnxgen.load(chat_folder, threads=1)
    client, messages = _client(chat_server[0]), CONVERSATIONS[1]
    prompt = model.apply_chat_template(messages)
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False, logprobs=2)[0]
    out = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy.text
    assert out.usage.prompt_tokens == len(model.tokenizer.encode(prompt)) and out.usage.completion_tokens == len(greedy.token_ids)
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(greedy.logprobs, abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and bytes(c.bytes).decode() == c.token for c in content)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [out.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(greedy.token_ids)
    sampled = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0.8, n=2, seed=5)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=0, seed=5, num_return_sequences=2)
    assert [c.message.content for c in sampled.choices] == [c.text for c in expected]
    schema = {"type": "object", "properties": {"reply": {"type": "string", "maxLength": 12}}, "required": ["reply"], "additionalProperties": False}
    held = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "reply", "schema": schema}})  # OpenAI's structured outputs
    expected_json = model.generate(prompt, max_new_tokens=12, do_sample=False, json_schema=schema)[0].text
    assert held.choices[0].message.content == expected_json and expected_json.startswith('{"reply":"')  # cut short: 12 tokens


def test_chat_completions_refusals_and_default_length(chat_server: tuple[str, str]) -> None:
    import openai

    client = _client(chat_server[0])
    out = client.chat.completions.create(model="tiny-chat", messages=CONVERSATIONS[0], temperature=0, extra_body={"eos_token_id": None})
    assert out.choices[0].finish_reason == "length"  # no max_tokens: what the context leaves, up to the server's limit
    assert out.usage.completion_tokens == min(64, 128 - out.usage.prompt_tokens) == 64
    with pytest.raises(openai.BadRequestError, match="roles are user, assistant and tool"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "critic", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="tiny-chat", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CONVERSATIONS[0])
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]  # OpenAI's content parts
    texts = [client.chat.completions.create(model="tiny-chat", messages=m, max_tokens=5, temperature=0).choices[0].message.content
             for m in (parts, [{"role": "user", "content": "Hello\nthere"}])]
    assert texts[0] == texts[1]
    with pytest.raises(openai.BadRequestError, match="has no chat template"):  # a folder whose checkpoint had none
        _client(chat_server[1]).chat.completions.create(model="tiny", messages=CONVERSATIONS[0])


# OpenAI's tools: a function with parameters, one with small ones, one with none
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a"]}}},
    {"type": "function", "function": {"name": "now"}},
]
ASKED = [{"role": "user", "content": "Paris?"}]
# The conversation after a call: the assistant's call (content None, arguments as JSON text) and its result
ANSWERED = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18"}]


def _as_template_takes_it(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers' documented message shape: a call's arguments an object, not JSON text."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                 for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def test_tools_and_calls_render_as_transformers_renders_them(chat_folder: Path, chat_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chat_checkpoint)
    model = onnxgen.load(chat_folder, threads=1)
    for messages in (ASKED, _as_template_takes_it(ANSWERED)):
        text = model.apply_chat_template(messages, tools=TOOLS)
        assert text == hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert "tools: get_weather, add, now\n" in text
    assert 'assistant: get_weather{"city": "Rome", "unit": "c"}' in text and "result: 18\n" in text


def _streamed_calls(chunks: list[Any], index: int = 0) -> tuple[list[tuple[str, str]], list[str], str | None]:
    """A streamed choice's calls put together as a client does (by index: the first delta has the id and name, the
    others add to the arguments), their ids, and the finish reason."""
    calls: dict[int, list[str]] = {}
    ids, reason = [], None
    for chunk in chunks:
        choice = chunk.choices[0]
        if choice.index != index:
            continue
        assert choice.delta.content is None  # a reply of calls has no text
        for call in choice.delta.tool_calls or []:
            if call.id:
                assert call.index not in calls and call.type == "function" and call.function.name
                calls[call.index], ids = [call.function.name, ""], [*ids, call.id]
            calls[call.index][1] += call.function.arguments or ""
        reason = choice.finish_reason or reason
    return [(name, arguments) for name, arguments in calls.values()], ids, reason


def test_a_named_function_is_called_with_arguments_its_schema_allows(chat_server: tuple[str, str], chat_folder: Path) -> None:
    """tool_choice naming a function: the reply is one call of it, its arguments what generate gives under the
    function's parameters as json_schema (greedy, then seeded sampling of two choices); streamed, the same calls piece
    by piece."""
    model = onnxgen.load(chat_folder, threads=1)
    client, prompt = _client(chat_server[0]), model.apply_chat_template(ASKED, tools=TOOLS)
    left = min(64, 128 - len(model.tokenizer.encode(prompt)))  # what the server gives a reply without max_tokens
    for name, parameters in (("get_weather", TOOLS[0]["function"]["parameters"]), ("now", {"type": "object", "properties": {},
                                                                                          "additionalProperties": False})):
        choice = {"type": "function", "function": {"name": name}}
        for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 3, "max_tokens": 20, "n": 2}):
            out = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, tool_choice=choice, **sampling)
            expected = model.generate(prompt, max_new_tokens=sampling.get("max_tokens", left), do_sample="seed" in sampling, top_k=0,
                                      json_schema=parameters, num_return_sequences=sampling.get("n", 1),
                                      **{k: v for k, v in sampling.items() if k not in ("max_tokens", "n")})
            stream = list(client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, tool_choice=choice, stream=True,
                                                         **sampling))
            assert len(out.choices) == len(expected)
            for i, (choice_out, wanted) in enumerate(zip(out.choices, expected)):
                message = choice_out.message
                assert message.content is None and len(message.tool_calls) == 1 and message.tool_calls[0].id.startswith("call_")
                assert (message.tool_calls[0].function.name, message.tool_calls[0].function.arguments) == (name, wanted.text)
                assert choice_out.finish_reason == {"eos": "stop", "length": "length"}[wanted.finish_reason]  # OpenAI's for a named call
                assert _streamed_calls(stream, i)[::2] == ([(name, wanted.text)], choice_out.finish_reason)
            assert "seed" not in sampling or name == "now" or expected[0].text != expected[1].text  # two choices, each read apart
        assert expected[0].finish_reason == "length" or name == "now"  # sampled get_weather runs past its schema's properties
    assert [json.loads(c.text) for c in expected] == [{}, {}]  # a function that declares no parameters takes none
    weather = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, temperature=0,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    arguments = json.loads(weather.choices[0].message.tool_calls[0].function.arguments)
    assert set(arguments) == {"city", "unit"} and len(arguments["city"]) <= 8 and arguments["unit"] in ("c", "f")


def test_required_calls_one_or_more_of_the_tools(chat_server: tuple[str, str], chat_folder: Path) -> None:
    """tool_choice "required": the reply is a list of calls, each one of the tools with arguments its schema allows,
    as generate gives the list under the tools' schema (parallel_tool_calls false: at most one); finish reason
    "tool_calls" once the list is whole; streamed, the same calls with an id each."""
    model = onnxgen.load(chat_folder, threads=1)
    client, prompt = _client(chat_server[0]), model.apply_chat_template(ASKED, tools=TOOLS)
    left = min(64, 128 - len(model.tokenizer.encode(prompt)))  # what the server gives a reply without max_tokens
    named = {"type": "object", "anyOf": [{"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                         "parameters": t["function"].get("parameters") or {
                                                             "type": "object", "properties": {}, "additionalProperties": False}},
                                          "required": ["name", "parameters"]} for t in TOOLS]}
    for parallel, bound in ((True, {}), (False, {"maxItems": 1})):
        schema = {"type": "array", "minItems": 1, "items": named, **bound}
        expected = model.generate(prompt, max_new_tokens=left, do_sample=False, json_schema=schema)[0]
        assert expected.finish_reason == "eos"  # the list closed within the context
        calls = [(c["name"], c["parameters"]) for c in json.loads(expected.text)]
        out = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, tool_choice="required", temperature=0,
                                             parallel_tool_calls=parallel)
        message = out.choices[0].message
        assert message.content is None and out.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == calls
        assert len({c.id for c in message.tool_calls}) == len(calls) and len(calls) <= (1 if not parallel else len(calls))
        stream = list(client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, tool_choice="required",
                                                     temperature=0, parallel_tool_calls=parallel, stream=True))
        streamed, ids, reason = _streamed_calls(stream)
        assert streamed == [(c.function.name, c.function.arguments) for c in message.tool_calls] and reason == "tool_calls"
        assert len(set(ids)) == len(calls)
    cut = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=12)
    assert cut.choices[0].finish_reason == "length"  # the calls as far as they were written
    text = model.generate(prompt, max_new_tokens=12, do_sample=False, json_schema={"type": "array", "minItems": 1, "items": named})[0].text
    assert [(c.function.name, c.function.arguments) for c in cut.choices[0].message.tool_calls] == (
        [] if ',"parameters":' not in text else [(json.loads(text[1:text.index(',"parameters":')] + "}")["name"],
                                                   text[text.index(',"parameters":') + len(',"parameters":'):])])


def test_required_calls_take_tools_whose_schemas_define_their_parts(chat_server: tuple[str, str]) -> None:
    """Parameters with "$defs" (pydantic's schemas of nested models): under "required" each function's schema sits
    inside the list's, so its definitions go to the root that its references name; two functions defining one
    name two ways are refused."""
    import openai

    place = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4}}, "required": ["city"], "additionalProperties": False}
    go = {"type": "function", "function": {"name": "go", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Place"}}, "required": ["to"], "additionalProperties": False,
        "$defs": {"Place": place}}}}
    client = _client(chat_server[0])
    fly = {"type": "function", "function": {**go["function"], "name": "fly"}}  # the same definition again: one at the root
    out = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=[go, fly], tool_choice="required",
                                         parallel_tool_calls=False, temperature=0)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name in ("go", "fly")
    assert set(json.loads(calls[0].function.arguments)) == {"to"} and len(json.loads(calls[0].function.arguments)["to"]["city"]) <= 4
    clash = {"type": "function", "function": {"name": "stay", "parameters": {**go["function"]["parameters"], "$defs": {"Place": {"type": "string"}}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=[go, clash], tool_choice="required")
    assert re.search("the definition 'Place' .* differs between functions", refused.value.body["message"])  # str() varies by openai version


def test_a_conversation_goes_on_after_a_call(chat_server: tuple[str, str], chat_folder: Path) -> None:
    """The call (arguments as JSON text, OpenAI's shape) and its result sent back: the reply is what generate gives on
    the template's text of them, with "none" as with no tool_choice at all (text, not calls)."""
    model = onnxgen.load(chat_folder, threads=1)
    client = _client(chat_server[0])
    expected = model.generate(model.apply_chat_template(_as_template_takes_it(ANSWERED), tools=TOOLS), max_new_tokens=8, do_sample=False)[0]
    for choice in ({"tool_choice": "none"}, {}):
        tools = {"tools": TOOLS} if choice else {}
        out = client.chat.completions.create(model="tiny-chat", messages=ANSWERED, max_tokens=8, temperature=0, **tools, **choice)
        if choice:
            assert out.choices[0].message.content == expected.text and not out.choices[0].message.tool_calls
        else:  # without tools the template does not list them: another prompt
            assert out.usage.prompt_tokens < len(model.tokenizer.encode(model.apply_chat_template(_as_template_takes_it(ANSWERED), tools=TOOLS)))


def test_tool_requests_it_cannot_do_are_refused(chat_server: tuple[str, str]) -> None:
    import openai

    client = _client(chat_server[0])
    named = {"type": "function", "function": {"name": "get_weather"}}
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"tools": TOOLS}, 'tool_choice "auto".*give tool_choice "required"'),  # OpenAI's default with tools
        ({"tools": TOOLS, "tool_choice": "auto"}, 'tool_choice "auto"'),
        ({"tool_choice": "required"}, "the request gives no tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "'fly', which is not among the tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, 'tool_choice is "none", "auto", "required" or'),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}], "tool_choice": "required"}, r"tools\[0\] is"),
        ({"tools": [TOOLS[1], TOOLS[1]], "tool_choice": "required"}, "two functions are named 'add'"),
        ({"tools": TOOLS, "tool_choice": named, "response_format": {"type": "json_object"}}, "not with response_format"),
        ({"tools": TOOLS, "tool_choice": named, "extra_body": {"regex": "a+"}}, "not with response_format, json_schema, regex"),
    ]
    for fields, message in refusals:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny-chat", messages=ASKED, max_tokens=4, **fields)
    garbled = [{**ANSWERED[1], "tool_calls": [{**ANSWERED[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": "{city"}}]}]
    with pytest.raises(openai.BadRequestError, match="a tool call's arguments are not JSON: '{city'"):
        client.chat.completions.create(model="tiny-chat", messages=[*ASKED, *garbled], max_tokens=4)


def test_a_completions_field_in_a_chat_request_is_a_400(chat_server: tuple[str, str]) -> None:
    """echo or prompt sent to chat completions or the Responses API (extra fields, which pass to the options) were a
    500: the chat's own completion sets them."""
    import openai

    client = _client(chat_server[0])
    for field, value in (("echo", True), ("prompt", "Hi")):
        with pytest.raises(openai.BadRequestError, match=f"{field} is a completions field, not a chat one"):
            client.chat.completions.create(model="tiny-chat", messages=ASKED, max_tokens=4, extra_body={field: value})
        with pytest.raises(openai.BadRequestError, match=f"{field} is a completions field, not a chat one"):
            client.responses.create(model="tiny-chat", input="Hi", max_output_tokens=4, extra_body={field: value})


RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's tools: flat


def test_responses_answer_as_chat_completions_do(chat_server: tuple[str, str]) -> None:
    """/v1/responses through the official client: instructions and input (a text, or messages with a developer's and
    text parts) answer what chat completions answer for the same conversation, blocking and streamed, greedy and
    seeded; cut by max_output_tokens, the response is incomplete (its stream ends with response.incomplete)."""
    client = _client(chat_server[0])

    def chat(messages: list[dict[str, Any]], **options: Any) -> Any:
        return client.chat.completions.create(model="tiny-chat", messages=messages, **options)

    system, asked = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}
    inputs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = [
        ({"instructions": "Be brief.", "input": "Hello there"}, [system, asked]),
        ({"input": [{"role": "developer", "content": "Be brief."}, {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Hello"}, {"type": "input_text", "text": "there"}]}]}, [system, {"role": "user", "content": "Hello\nthere"}]),
    ]
    for fields, messages in inputs:
        for options in ({"temperature": 0}, {"temperature": 0.8, "extra_body": {"seed": 4}}):
            expected = chat(messages, max_tokens=30, **options)
            out = client.responses.create(model="tiny-chat", max_output_tokens=30, **fields, **options)
            assert out.output_text == expected.choices[0].message.content and out.output[0].role == "assistant"
            assert (out.usage.input_tokens, out.usage.output_tokens) == (expected.usage.prompt_tokens, expected.usage.completion_tokens)
            assert out.status == ("incomplete" if expected.choices[0].finish_reason == "length" else "completed")
            events = list(client.responses.create(model="tiny-chat", max_output_tokens=30, stream=True, **fields, **options))
            assert [e.sequence_number for e in events] == list(range(len(events)))
            assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == out.output_text
            assert events[-1].type == f"response.{out.status}" and events[-1].response.output_text == out.output_text
    cut = client.responses.create(model="tiny-chat", input="Hello there", max_output_tokens=3, temperature=0, extra_body={"eos_token_id": None})
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens" and cut.usage.output_tokens == 3
    with client.responses.stream(model="tiny-chat", input="Hello there", temperature=0, extra_body={"stop": ["e"]}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()  # the client's own accumulation of the events
    assert final.output_text == chat([asked], temperature=0, stop=["e"]).choices[0].message.content
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    schema = {"type": "object", "properties": {"reply": {"type": "string", "maxLength": 12}}, "required": ["reply"]}
    held = client.responses.create(model="tiny-chat", input="Hello there", temperature=0, max_output_tokens=40,
                                   text={"format": {"type": "json_schema", "name": "reply", "schema": schema}})
    assert held.output_text == chat([asked], temperature=0, max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}).choices[0].message.content


def test_responses_call_functions_as_chat_completions_do(chat_server: tuple[str, str]) -> None:
    """Function tools (flat, as the Responses API gives them): a named function and "required" give function_call
    items with the calls chat completions make, streamed as function_call_arguments deltas; a conversation goes on
    with the call and its output as input items."""
    client = _client(chat_server[0])
    for choice, chat_choice in (({"type": "function", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
                                ("required", "required")):
        expected = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, tool_choice=chat_choice, temperature=0)
        calls = [(c.function.name, c.function.arguments) for c in expected.choices[0].message.tool_calls]
        out = client.responses.create(model="tiny-chat", input="Paris?", tools=RESPONSES_TOOLS, tool_choice=choice, temperature=0)
        assert [(o.type, o.name, o.arguments) for o in out.output] == [("function_call", name, arguments) for name, arguments in calls]
        assert all(o.call_id.startswith("call_") and o.status == "completed" for o in out.output) and out.status == "completed"
        with client.responses.stream(model="tiny-chat", input="Paris?", tools=RESPONSES_TOOLS, tool_choice=choice, temperature=0) as stream:
            deltas = "".join(e.delta for e in stream if e.type == "response.function_call_arguments.delta")
            final = stream.get_final_response()
        assert [(o.name, o.arguments) for o in final.output] == calls and deltas == "".join(arguments for _, arguments in calls)
    call = ANSWERED[1]["tool_calls"][0]
    items = [{"role": "user", "content": "Paris?"},
             {"type": "function_call", "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]},
             {"type": "function_call_output", "call_id": call["id"], "output": "18"}]
    out = client.responses.create(model="tiny-chat", input=items, tools=RESPONSES_TOOLS, tool_choice="none", temperature=0, max_output_tokens=8)
    expected = client.chat.completions.create(model="tiny-chat", messages=ANSWERED, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8)
    assert out.output_text == expected.choices[0].message.content


def test_responses_go_on_from_a_kept_response(chat_server: tuple[str, str]) -> None:
    """previous_response_id: a kept response's conversation (its input, and its output, text or calls) comes before the
    new input, without its instructions (as OpenAI does it), blocking and streamed, along a chain of them; the
    answer is chat completions' on that whole conversation. GET gives a kept response back, DELETE forgets it (and
    the chain through it), and store: false keeps none."""
    import openai

    client = _client(chat_server[0])

    def chat(messages: list[dict[str, Any]], **options: Any) -> str:
        return client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=10, **options).choices[0].message.content

    first = client.responses.create(model="tiny-chat", instructions="Be brief.", input="Hello there", temperature=0, max_output_tokens=10)
    second = client.responses.create(model="tiny-chat", previous_response_id=first.id, input="And then?", temperature=0, max_output_tokens=10)
    said = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And then?"}]
    assert second.output_text == chat(said) and second.previous_response_id == first.id and second.store
    third = list(client.responses.create(model="tiny-chat", previous_response_id=second.id, input=[{"role": "user", "content": "Why?"}],
                                         temperature=0, max_output_tokens=10, stream=True))[-1].response
    assert third.output_text == chat([*said, {"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Why?"}])
    assert client.responses.retrieve(first.id).output_text == first.output_text
    assert client.responses.retrieve(third.id).previous_response_id == second.id  # a streamed response is kept too
    called = client.responses.create(model="tiny-chat", input="Paris?", tools=RESPONSES_TOOLS, temperature=0,
                                     tool_choice={"type": "function", "name": "get_weather"})
    call = called.output[0]
    after = client.responses.create(model="tiny-chat", previous_response_id=called.id, tools=RESPONSES_TOOLS, tool_choice="none",
                                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18"}], temperature=0,
                                    max_output_tokens=10)
    assert after.output_text == chat([*ASKED, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18"}], tools=TOOLS, tool_choice="none")
    assert client.responses.delete(first.id) is None  # the client returns nothing for a deletion that succeeded
    for gone in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id),
                 lambda: client.responses.create(model="tiny-chat", previous_response_id=third.id, input="Hi")):
        with pytest.raises(openai.NotFoundError):
            gone()
    unkept = client.responses.create(model="tiny-chat", input="Hi", store=False, max_output_tokens=2)
    assert not unkept.store
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_responses_give_log_probabilities_when_included(chat_server: tuple[str, str]) -> None:
    """include ["message.output_text.logprobs"] with top_logprobs: each output token's, chat completions' entries,
    whole and on the stream's text deltas."""
    client = _client(chat_server[0])
    expected = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello there"}], temperature=0,
                                              max_tokens=6, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    asked = {"model": "tiny-chat", "input": "Hello there", "temperature": 0, "max_output_tokens": 6,
             "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    whole = client.responses.create(**asked).output[0].content[0].logprobs
    streamed = [lp for e in client.responses.create(**asked, stream=True) if e.type == "response.output_text.delta" for lp in e.logprobs]
    for got in (whole, streamed):
        assert [(g.token, round(g.logprob, 5), [(a.token, round(a.logprob, 5)) for a in g.top_logprobs]) for g in got] == [
            (e.token, round(e.logprob, 5), [(a.token, round(a.logprob, 5)) for a in e.top_logprobs]) for e in expected]
    assert client.responses.create(**{**asked, "include": []}).output[0].content[0].logprobs == []


def test_responses_refuse_what_they_cannot_do(chat_server: tuple[str, str]) -> None:
    import openai

    client = _client(chat_server[0])
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"include": ["file_search_call.results"]}, r"include: only 'message.output_text.logprobs' is supported"),
        ({"tools": [{"type": "web_search"}]}, "function tools only"),
        ({"tools": RESPONSES_TOOLS}, 'tool_choice "auto"'),
        ({"reasoning": {"effort": "low"}}, "reasoning is not supported"),
        ({"truncation": "auto"}, 'truncation is "disabled"'),
        ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, r"input\[0\]: text parts only"),
        ({"input": [{"type": "reasoning", "summary": []}]}, r"input\[0\]: a message, function_call or function_call_output"),
        ({"input": [{"role": "critic", "content": "x"}]}, "roles are user, assistant and tool"),
    ]
    for fields, message in refusals:
        with pytest.raises(openai.BadRequestError, match=message):
            client.responses.create(model="tiny-chat", **{"input": "Hi", **fields})
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other", input="Hi")
    with pytest.raises(openai.NotFoundError, match="previous_response_id: no response 'resp_1' is kept here"):
        client.responses.create(model="tiny-chat", input="Hi", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="has no chat template"):
        _client(chat_server[1]).responses.create(model="tiny", input="Hi")


def test_tool_calls_are_read_the_same_whatever_the_pieces() -> None:
    """tools.ToolCalls: a list of calls read piece by piece (a character, a few, all at once) gives each call's name and
    its arguments' exact text, strings holding brackets, commas and escaped quotes included; cut short, as far as written."""
    from onnxgen.tools import ToolCalls

    text = '[{"name":"get_weather","parameters":{"city":"P,}a\\"r{]","unit":"c"}},{"name":"add","parameters":{"a":5}},{"name":"now","parameters":{}}]'
    whole = [("get_weather", '{"city":"P,}a\\"r{]","unit":"c"}'), ("add", '{"a":5}'), ("now", "{}")]
    for size in (1, 2, 7, len(text)):
        reader, news = ToolCalls(None), []
        for at in range(0, len(text), size):
            piece = reader.push(text[at : at + size])
            assert len(piece) == len({i for i, _, _ in piece})  # a piece tells each call once: its name with its arguments
            news += piece
        assert [(c.name, c.arguments) for c in reader.calls] == whole
        assert [name for _, name, _ in news if name] == [name for name, _ in whole]
        assert ["".join(a for i, _, a in news if i == k) for k in range(3)] == [arguments for _, arguments in whole]
    start = text.index('{"city"')
    for end, calls in ((12, []), (start, [("get_weather", "")]), (start + 10, [("get_weather", text[start : start + 10])])):
        cut = ToolCalls(None)
        cut.push(text[:end])
        assert [(c.name, c.arguments) for c in cut.calls] == calls
    named = ToolCalls("f")
    assert named.push("") == [(0, "f", "")] and named.push('{"x"') == [(0, None, '{"x"')] and named.calls[0].arguments == '{"x"'
    assert ToolCalls("f").push("{") == [(0, "f", "{")]  # a call's first delta: its name with what its arguments begin with


def test_the_pipeline_takes_chats_as_transformers_does(chat_folder: Path, chat_checkpoint: Path) -> None:
    """A chat in, the chat with the reply out (a new assistant message, or the last one gone on with when it is the
    assistant's), as transformers' text-generation pipeline gives it for the same weights; a list of chats; the reply
    alone without return_full_text."""
    import transformers

    from .conftest import EOS

    hf = transformers.pipeline("text-generation", model=str(chat_checkpoint), tokenizer=str(chat_checkpoint))
    mine = onnxgen.pipeline("text-generation", model=chat_folder, threads=1)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    begun = [*CONVERSATIONS[0], {"role": "assistant", "content": "Well,"}]
    for chat in (CONVERSATIONS[1], begun):
        expected = hf(chat, **greedy, pad_token_id=hf.tokenizer.convert_tokens_to_ids(EOS))
        assert mine(chat, **greedy) == expected
        assert mine(chat, return_full_text=False, **greedy) == hf(chat, return_full_text=False, **greedy,
                                                                  pad_token_id=hf.tokenizer.convert_tokens_to_ids(EOS))
    assert mine(begun, **greedy)[0]["generated_text"][-1]["content"].startswith("Well,")
    assert mine([CONVERSATIONS[1], begun], **greedy) == [mine(CONVERSATIONS[1], **greedy), mine(begun, **greedy)]
    model = onnxgen.load(chat_folder, threads=1)
    assert model.apply_chat_template(begun, add_generation_prompt=False, continue_final_message=True).endswith("assistant: Well,")
    with pytest.raises(OptionsError, match="one of them"):
        model.apply_chat_template(begun, continue_final_message=True)


def test_the_chat_command_watermarks_with_a_key(chat_folder: Path) -> None:
    """`onnxgen chat --watermark-key`: each reply what generate gives under that watermark (not the plain reply)."""
    import subprocess
    import sys

    model = onnxgen.load(chat_folder, threads=1)
    prompt = model.apply_chat_template([{"role": "user", "content": "Hello"}])
    marked = model.generate(prompt, max_new_tokens=8, do_sample=False, watermarking_config={"hashing_key": 3})[0].text
    assert marked != model.generate(prompt, max_new_tokens=8, do_sample=False)[0].text
    r = subprocess.run([sys.executable, "-m", "onnxgen", "chat", "--model", str(chat_folder), "--strategy", "greedy", "--max-new-tokens", "8",
                        "--threads", "1", "--watermark-key", "3"], input="Hello\n", capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == marked + "\n", r.stderr


def test_the_chat_command_keeps_the_conversation(chat_folder: Path, exported: Path) -> None:
    """`onnxgen chat`: a line a turn, each reply what generate gives for the conversation so far; blank lines skipped;
    a model without a template is one line of error."""
    import subprocess
    import sys

    model = onnxgen.load(chat_folder, threads=1)
    messages: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
    replies = []
    for turn in ("Hello", "Again"):
        messages.append({"role": "user", "content": turn})
        replies.append(model.generate(model.apply_chat_template(messages), max_new_tokens=5, do_sample=False)[0].text)
        messages.append({"role": "assistant", "content": replies[-1]})
    command = [sys.executable, "-m", "onnxgen", "chat", "--model", str(chat_folder), "--system", "Be brief.", "--strategy", "greedy",
               "--max-new-tokens", "5", "--threads", "1"]
    r = subprocess.run(command, input="Hello\n\nAgain\n", capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "".join(reply + "\n" for reply in replies), r.stderr
    r = subprocess.run(command, input="Hello\n" + "word " * 200 + "\n", capture_output=True, text=True)  # past the 128-token window
    assert r.returncode == 1 and r.stdout == replies[0] + "\n" and r.stderr.strip().splitlines() == [
        ("onnxgen: error: the conversation no longer fits the context window of 128 tokens with a reply of 5: start a new one, "
         "or lower --max-new-tokens")]
    r = subprocess.run([*command[:5], str(exported)], input="Hello\n", capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"onnxgen: error: onnxgen chat needs a model whose checkpoint has a chat template; {exported.name!r} has none: use onnxgen "
        "generate, or give one with --chat-template FILE"]


def test_a_chats_next_turn_resumes_from_the_prompt_cache(chat_folder: Path) -> None:
    """Each turn resends the conversation; with a prompt cache the server starts the next turn from the last one's
    cache (the rendered conversation begins with the tokens it held), and the reply is what generate gives."""
    import asyncio

    import httpx

    from onnxgen.serve import Limits, create_app

    model = onnxgen.load(chat_folder, threads=1, prompt_cache_mib=16)
    app = create_app(model, "tiny-chat", limits=Limits(max_tokens=8))
    messages = [{"role": "user", "content": "It is a truth universally acknowledged that a single man"}]

    async def turns() -> list[str]:
        replies = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            for turn in ("Go on please", "And then?"):
                r = await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
                replies.append(r.json()["choices"][0]["message"]["content"])
                messages.extend([{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": turn}])
        return replies

    replies = asyncio.run(turns())
    assert app.state.batcher.resumed == 1  # the second turn; the first had nothing to start from
    plain = onnxgen.load(chat_folder, threads=1)
    assert replies[1] == plain.generate(plain.apply_chat_template(messages[:3]), max_new_tokens=8, do_sample=False)[0].text


def test_a_chat_template_given_at_load_is_the_one_used(exported: Path, chat_folder: Path, checkpoint: Path, tmp_path: Path) -> None:
    """load(chat_template=...) (--chat-template FILE): a model whose checkpoint had no template chats with it, rendered
    as transformers renders that template; one given over a checkpoint's replaces it; the chat command and the server
    take the file; a file that cannot be read is one line of error."""
    import asyncio
    import subprocess
    import sys

    import httpx
    from transformers import AutoTokenizer

    from onnxgen.serve import create_app

    other = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    hf = AutoTokenizer.from_pretrained(checkpoint)
    given = onnxgen.load(exported, threads=1, chat_template=TEMPLATE)
    assert given.has_chat_template and given.apply_chat_template(CONVERSATIONS[1]) == hf.apply_chat_template(
        CONVERSATIONS[1], chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True)
    replaced = onnxgen.load(chat_folder, threads=1, chat_template=other)
    assert replaced.apply_chat_template(CONVERSATIONS[0]) == "[user] Hello there\n[assistant]"
    with pytest.raises(OptionsError, match="chat_template is a Jinja template's text"):
        onnxgen.load(exported, threads=1, chat_template=Path("x"))  # type: ignore[arg-type]

    async def ask() -> dict[str, Any]:
        app = create_app(given, "tiny")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as http:
            r = await http.post("/v1/chat/completions", json={"messages": CONVERSATIONS[0], "max_tokens": 5, "temperature": 0})
            return r.json()

    expected = given.generate(given.apply_chat_template(CONVERSATIONS[0]), max_new_tokens=5, do_sample=False)[0].text
    assert asyncio.run(ask())["choices"][0]["message"]["content"] == expected
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    command = [sys.executable, "-m", "onnxgen", "chat", "--model", str(exported), "--strategy", "greedy", "--max-new-tokens", "5",
               "--threads", "1", "--chat-template"]
    done = subprocess.run([*command, str(tmp_path / "template.jinja")], input="Hello there\n", capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == expected + "\n", done.stderr
    missing = subprocess.run([*command, str(tmp_path / "none.jinja")], input="Hi\n", capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"onnxgen: error: cannot read the chat template {tmp_path / 'none.jinja'}: No such file or directory"]


def test_tokenize_takes_a_chats_messages(chat_server: tuple[str, str], chat_folder: Path) -> None:
    """vLLM's /tokenize with messages: the template's prompt (tools too), as many tokens as a chat completion's
    prompt_tokens; without the generation prompt, fewer; a model without a template, or both fields or none, a 400."""
    import httpx

    model = onnxgen.load(chat_folder, threads=1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    r = httpx.post(chat_server[0] + "/tokenize", json={"messages": messages}).json()
    expected = model.tokenizer.encode(model.apply_chat_template([messages[0], {"role": "user", "content": "Hello there"}]))
    assert r["tokens"] == expected and r["count"] == _client(chat_server[0]).chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=1).usage.prompt_tokens
    bare = httpx.post(chat_server[0] + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["count"] < r["count"]
    with_tools = httpx.post(chat_server[0] + "/tokenize", json={"messages": ASKED, "tools": TOOLS}).json()
    assert with_tools["tokens"] == model.tokenizer.encode(model.apply_chat_template(ASKED, tools=TOOLS))
    none = httpx.post(chat_server[1] + "/tokenize", json={"messages": messages})
    assert none.status_code == 400 and "has no chat template" in none.json()["error"]["message"]
    for body in ({}, {"prompt": "Hi", "messages": messages}):
        wrong = httpx.post(chat_server[0] + "/tokenize", json=body)
        assert wrong.status_code == 400 and "give prompt or messages" in wrong.json()["error"]["message"]


def test_hermes_calls_are_read_the_same_whatever_the_pieces() -> None:
    """tools.HermesCalls ("auto" with --tool-call-parser hermes): content outside the <tool_call> blocks, each block of a
    known function a call, read alike piece by piece (a character, a few, all at once); whitespace before a block and
    at the end of a reply with calls is no content; a block that is not a call stays content; an unclosed last
    block is read as if closed; parallel false keeps the first call."""
    from onnxgen.tools import HermesCalls

    def read(text: str, size: int, **kw: Any) -> list[tuple[str, ...]]:
        reader, news = HermesCalls(("get_weather", "now"), **kw), []
        for at in range(0, len(text), size):
            news += reader.push(text[at : at + size])
        news += reader.end()
        merged: list[tuple[str, ...]] = []
        for item in news:
            if item[0] == "content" and merged and merged[-1][0] == "content":
                merged[-1] = ("content", merged[-1][1] + item[1])
            else:
                merged.append(item)
        return merged

    two = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>{"name":"now","arguments":{}}</tool_call>\n'
    cases = [
        (two, {}, [("content", "Let me look."), ("call", "get_weather", '{"city": "Paris"}'), ("call", "now", "{}")]),
        (two, {"parallel": False}, [("content", "Let me look."), ("call", "get_weather", '{"city": "Paris"}')]),
        ("No call here, <tool> tags \n", {}, [("content", "No call here, <tool> tags \n")]),
        ('<tool_call>{"name": "fly", "arguments": {}}</tool_call>', {}, [("content", '<tool_call>{"name": "fly", "arguments": {}}</tool_call>')]),
        ('<tool_call>{"name": "now"', {}, [("content", '<tool_call>{"name": "now"')]),
        ('<tool_call>{"name": "now", "arguments": {"a": [1, 2]}}', {}, [("call", "now", '{"a": [1, 2]}')]),
        ('<tool_call>{"name": "now"}</tool_call> Done.', {}, [("call", "now", "{}"), ("content", " Done.")]),
    ]
    for text, options, expected in cases:
        for size in (1, 2, 5, len(text)):
            assert read(text, size, **options) == expected, (text, size)


@pytest.fixture(scope="module")
def hermes_server(chat_folder: Path) -> Iterator[str]:
    """The chat folder served with --tool-call-parser hermes."""
    import threading
    import time

    import uvicorn

    from onnxgen.serve import create_app

    from .test_serve import _free_port

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(onnxgen.load(chat_folder, threads=1), "tiny-chat", tool_call_parser="hermes"),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


# At most 59 tokens (a character each) after the 58 of the prompt: within the tiny model's context of 128
HERMES_REPLY = r'Ok<tool_call>\{"name":"add","arguments":\{"a":5\}\}</tool_call>'


def test_auto_reads_the_calls_a_model_writes_in_the_hermes_format(hermes_server: str) -> None:
    """tool_choice "auto" (and OpenAI's default with tools) on a server started with --tool-call-parser hermes: the
    reply's text outside its calls is the content and its calls are tool_calls, finish reason "tool_calls"; streamed,
    the same content and calls; a reply without calls is text. The tiny model is held to a Hermes reply by a regex."""
    client = _client(hermes_server)
    for choice in ({"tool_choice": "auto"}, {}):
        out = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, temperature=0, max_tokens=64,
                                             extra_body={"regex": HERMES_REPLY}, **choice)
        message = out.choices[0].message
        assert message.content == "Ok" and out.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [("add", {"a": 5})]
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, temperature=0, max_tokens=64,
                                                 extra_body={"regex": HERMES_REPLY}, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert content == "Ok" and [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "add", {"a": 5})] and calls[0].id
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    plain = client.chat.completions.create(model="tiny-chat", messages=ASKED, tools=TOOLS, temperature=0, max_tokens=64,
                                           extra_body={"regex": "Rome is warm[.]"})
    assert plain.choices[0].message.content == "Rome is warm." and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason == "stop"
    response = client.responses.create(model="tiny-chat", input="Paris?", tools=RESPONSES_TOOLS, max_output_tokens=64,
                                       extra_body={"regex": HERMES_REPLY})
    assert [(item.type, getattr(item, "name", None)) for item in response.output] == [("message", None), ("function_call", "add")]
    assert response.output[0].content[0].text == "Ok" and json.loads(response.output[1].arguments) == {"a": 5}
    events = list(client.responses.create(model="tiny-chat", input="Paris?", tools=RESPONSES_TOOLS, max_output_tokens=64,
                                          extra_body={"regex": HERMES_REPLY}, stream=True))
    final = events[-1].response
    assert [(item.type, getattr(item, "name", None)) for item in final.output] == [("message", None), ("function_call", "add")]
    assert final.output[0].content[0].text == "Ok" and json.loads(final.output[1].arguments) == {"a": 5}
