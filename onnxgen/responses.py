"""OpenAI's Responses API (`POST /v1/responses`) as a chat completion in other words.

A request becomes a chat request (`chat_request`): `instructions` the system message, `input` (a text, or a list of
messages, function calls and their outputs) the conversation, `max_output_tokens`, `text.format` (text, json_object,
json_schema) the response_format, function `tools` and `tool_choice` the chat's (tools.py). Its answer (`Reply`)
comes back as a response object whose `output` is a message of text, or the function calls made; streamed, as the
Responses API's events (response.created, .output_item.added, .output_text.delta, ..., response.completed), each
text piece with its tokens' log-probabilities where `include` asks for them. Finished responses are kept in memory
(`Store`, the most recent few: `store: false` keeps none) for `previous_response_id`, which continues the conversation
a kept response ended, and for GET and DELETE /v1/responses/{id}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import told
from .generator import Completion
from .tools import HermesCalls, ToolCalls, ToolChoice


class ResponsesRequest(BaseModel):
    """The Responses API's fields that onnxgen takes; onnxgen's other options pass through as extra fields, as on
    the other endpoints."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", "name", "schema"}}
    tools: list[dict[str, Any]] | None = None  # function tools: {"type": "function", "name", "description", "parameters"}
    tool_choice: str | dict[str, Any] | None = None  # "none", "auto", "required" or {"type": "function", "name": ...}
    parallel_tool_calls: bool = True
    stream: bool = False
    store: bool = True  # kept for previous_response_id (where the server keeps responses)
    metadata: dict[str, str] | None = None  # given back in the response
    previous_response_id: str | None = None
    include: list[str] | None = None  # LOGPROBS only
    top_logprobs: int | None = Field(None, ge=0, le=20)  # with LOGPROBS: each token's most likely alternatives
    user: str | None = None


LOGPROBS = "message.output_text.logprobs"  # what `include` may ask for: each output token's log-probability


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as a list of items (a text is a user's message)."""
    return [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) else list(body.input)


def chat_request(body: ResponsesRequest, previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The chat request (serve.ChatRequest's fields) that says what `body` says, after the conversation a previous
    response ended (`previous`: its items, Store.conversation); a ValueError for what it cannot."""
    if body.tools is not None and not all(isinstance(t, dict) and t.get("type") == "function" for t in body.tools):
        raise ValueError('tools: function tools only ({"type": "function", "name": ..., "parameters": {...}})')
    # As OpenAI does it: a previous response's instructions are not carried over, its input and output are
    messages = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    messages += _messages([*(previous or []), *input_items(body)])
    if not messages:
        raise ValueError("input holds no message")
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":  # the Responses API names it flat
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in body.tools] if body.tools else None
    extra = {k: v for k, v in (body.model_extra or {}).items() if k not in ("reasoning", "truncation", "background")}
    for field in ("reasoning", "background"):  # what onnxgen does not do: refused rather than ignored
        if (body.model_extra or {}).get(field):
            raise ValueError(f"{field} is not supported")
    if set(body.include or []) - {LOGPROBS}:
        raise ValueError(f"include: only {LOGPROBS!r} is supported, got {sorted(set(body.include or []) - {LOGPROBS})}")
    if (body.model_extra or {}).get("truncation", "disabled") != "disabled":
        raise ValueError('truncation is "disabled": a conversation longer than the context is refused')
    return {**extra, "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "stream": body.stream, "response_format": _format(body.text),
            "tools": tools, "tool_choice": choice, "parallel_tool_calls": body.parallel_tool_calls, "user": body.user,
            "logprobs": LOGPROBS in (body.include or []), "top_logprobs": body.top_logprobs}


def _messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Responses API's input items as chat messages: messages (their text parts joined, a line each; "developer"
    is the system's role), function calls (one assistant message per run of them) and their outputs (tool messages)."""
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and isinstance(item.get("role"), str):
            content = item.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text") for p in content):
                    raise ValueError(f"input[{i}]: text parts only (input_text, output_text)")
                content = "\n".join(p.get("text", "") for p in content)
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
        else:
            raise ValueError(f"input[{i}]: a message, function_call or function_call_output, got {kind!r}")
    return messages


def _format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's response_format: json_schema's name and schema sit flat in the Responses API."""
    shape = (text or {}).get("format")
    if not isinstance(shape, dict) or shape.get("type") in (None, "text"):
        return None
    if shape.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": shape.get("name"), "schema": shape.get("schema")}}
    return shape


class Store:
    """Finished responses, the most recently used `limit` of them, in this process's memory: each with its own input
    items and the response it continued, so a conversation is read back along its chain (`conversation`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], str | None]] = OrderedDict()

    def keep(self, response: dict[str, Any], items: list[dict[str, Any]], previous: str | None) -> None:
        self._kept[response["id"]] = (response, items, previous)
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)

    def get(self, response_id: str) -> dict[str, Any] | None:
        if response_id not in self._kept:
            return None
        self._kept.move_to_end(response_id)  # used: a conversation's earlier responses stay while it goes on
        return self._kept[response_id][0]

    def delete(self, response_id: str) -> bool:
        return self._kept.pop(response_id, None) is not None

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every input item and output item of the conversation that response ended, in order; None where it, or a
        response before it, is not kept."""
        items: list[dict[str, Any]] = []
        while response_id is not None:
            response = self.get(response_id)
            if response is None:
                return None
            _, given, previous = self._kept[response_id]
            items = [*given, *response["output"], *items]
            response_id = previous  # type: ignore[assignment]
        return items


class Reply:
    """A request's response object, whole (`whole`) or as streamed events (`events`). `scored(source)`: the log-
    probabilities of an event's or completion's tokens, OpenAI's entries, or None where not asked for; `kept(response)`
    is called with the finished response, to store it."""

    def __init__(self, body: ResponsesRequest, name: str, calls: ToolChoice, prompt_tokens: int,
                 scored: Callable[[Any], list[dict[str, Any]] | None], kept: Callable[[dict[str, Any]], None] | None) -> None:
        self.body, self.calls, self.prompt_tokens, self.scored, self.kept = body, calls, prompt_tokens, scored, kept
        self.head = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "model": name,
                     "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "temperature": body.temperature,
                     "top_p": body.top_p, "tools": body.tools or [], "tool_choice": body.tool_choice or ("auto" if body.tools else "none"),
                     "parallel_tool_calls": body.parallel_tool_calls, "text": body.text or {"format": {"type": "text"}},
                     "metadata": body.metadata or {}, "previous_response_id": body.previous_response_id, "store": kept is not None,
                     "top_logprobs": body.top_logprobs, "error": None}

    def whole(self, done: Completion) -> dict[str, Any]:
        status = "incomplete" if done.finish_reason in ("length", "time") else "completed"
        if self.calls.auto is not None:  # the text outside the calls (if any) as a message, then the calls
            content, found = HermesCalls(self.calls.auto, self.calls.parallel).whole(done.text)
            items = [_message(content, status, [] if found else self.scored(done) or [])] if content else []
            items += [_call(name, arguments, status) for name, arguments in found]
        elif self.calls.schema is None:
            items = [_message(done.text, status, self.scored(done) or [])]
        else:
            reader = ToolCalls(self.calls.named)
            reader.push(done.text)
            items = [_call(c.name, c.arguments, status) for c in reader.calls]
        return self._finished(self._response(items, done))

    def _finished(self, response: dict[str, Any]) -> dict[str, Any]:
        if self.kept is not None:
            self.kept(response)
        return response

    def _response(self, items: list[dict[str, Any]], done: Completion | None) -> dict[str, Any]:
        cut = done is not None and done.finish_reason in ("length", "time")
        status = "in_progress" if done is None else "incomplete" if cut else "completed"
        usage = None if done is None else {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                                           "output_tokens": len(done.token_ids), "output_tokens_details": {"reasoning_tokens": 0},
                                           "total_tokens": self.prompt_tokens + len(done.token_ids)}
        return {**self.head, "status": status, "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                "output": items, "usage": usage}

    async def events(self, news: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[str]:
        """The Responses API's server-sent events for the job whose `news` (serve.news) come in."""
        sequence = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal sequence
            sequence += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': sequence - 1, **fields})}\n\n"

        items: list[dict[str, Any]] = []  # the output so far, each item as it stands

        def opened(item: dict[str, Any]) -> list[str]:
            items.append(item)
            said = [event("response.output_item.added", output_index=len(items) - 1, item=item)]
            if item["type"] == "message":
                said.append(event("response.content_part.added", item_id=item["id"], output_index=len(items) - 1, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []}))
            return said

        def closed(status: str) -> list[str]:
            item, index = items[-1], len(items) - 1
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                return [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=part["text"]),
                        event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part),
                        event("response.output_item.done", output_index=index, item=item)]
            return [event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=item["arguments"]),
                    event("response.output_item.done", output_index=index, item=item)]

        def parsed(found: list[tuple[str, ...]]) -> list[str]:
            """An "auto" reply's news (tools.py's HermesCalls): content into a message item, opened at its first text,
            and each call an item of its own, whole."""
            said: list[str] = []
            for item in found:
                if item[0] == "content":
                    if not items or items[-1]["type"] != "message":
                        said += (closed("completed") if items else []) + opened(_message("", "in_progress"))
                    items[-1]["content"][0]["text"] += item[1]
                    said.append(event("response.output_text.delta", item_id=items[-1]["id"], output_index=len(items) - 1,
                                      content_index=0, delta=item[1], logprobs=[]))
                else:
                    said += (closed("completed") if items else []) + opened(_call(item[1], item[2], "in_progress"))
                    said.append(event("response.function_call_arguments.delta", item_id=items[-1]["id"], output_index=len(items) - 1,
                                      delta=item[2]))
            return said

        yield event("response.created", response=self._response([], None))
        yield event("response.in_progress", response=self._response([], None))
        reader = ToolCalls(self.calls.named) if self.calls.schema is not None else None
        parser = HermesCalls(self.calls.auto, self.calls.parallel) if self.calls.auto is not None else None
        if reader is None and parser is None:
            for said in opened(_message("", "in_progress")):
                yield said
        async for kind, value in news:
            if kind == "event":
                text = value[1].text
                if parser is not None:
                    for said in parsed(parser.push(text) + (parser.end() if value[1].finish_reason else [])):
                        yield said
                    continue
                if reader is None:
                    part = items[-1]["content"][0]
                    part["text"] += text
                    scored = self.scored(value[1]) or []
                    part["logprobs"] += scored
                    if text or scored:
                        yield event("response.output_text.delta", item_id=items[-1]["id"], output_index=0, content_index=0, delta=text,
                                    logprobs=scored)
                    continue
                for _, name, arguments in reader.push(text):
                    if name is not None:
                        for said in (closed("completed") if items else []) + opened(_call(name, "", "in_progress")):
                            yield said
                    items[-1]["arguments"] += arguments
                    if arguments:
                        yield event("response.function_call_arguments.delta", item_id=items[-1]["id"], output_index=len(items) - 1,
                                    delta=arguments)
            elif kind == "error":
                yield event("error", code=None, message=told(value)["message"], param=None)
            else:
                done = value[0][0]
                status = "incomplete" if done.finish_reason in ("length", "time") else "completed"
                for said in parsed(parser.end()) if parser is not None else []:  # none left once its last piece came
                    yield said
                for said in closed(status) if items else []:
                    yield said
                final = self._finished(self._response(items, done))
                yield event("response.incomplete" if status == "incomplete" else "response.completed", response=final)


def _message(text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def _call(name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": name,
            "arguments": arguments, "status": status}
