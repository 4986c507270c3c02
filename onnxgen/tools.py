"""Tool calls (OpenAI's `tools` and `tool_choice`): the reply held to a call's JSON, then read back as calls.

Where the caller says which, as vLLM does without a tool parser:
    "none"                                   text, as without tools (the template still sees them)
    {"type": "function", "function": {...}}  one call of that function: the reply is its arguments, JSON that
                                             its `parameters` schema allows
    "required"                               one or more calls of the tools given: the reply is
                                             [{"name": ..., "parameters": {...}}, ...] (one call with
                                             parallel_tool_calls false), each item held to its tool's schema
The constraint is guidance.py's json_schema, so the JSON is compact and its properties come in the schema's order:
a call's name comes before its arguments, and `ToolCalls` can hand out each call's arguments as they are written.

"auto" (OpenAI's default with tools) lets the model choose between text and calls in the format it was fine-tuned
on, which a server reads only where it is started with a parser for it (vLLM's --tool-call-parser): "hermes", the
format of Hermes-style fine-tunes (and Qwen's), each call a `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
block in free text (`HermesCalls`). Without one, "auto" is refused, as vLLM refuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionsError

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # a function that declares none: {}
ARGUMENTS_KEY = ',"parameters":'  # what ends a call's name in "required"'s compact JSON


PARSERS = ("hermes",)  # the formats "auto" can read (a server's --tool-call-parser)


@dataclass(frozen=True)
class ToolChoice:
    """What a request's tools and tool_choice ask for: `schema` None is free text; `named` the one function the
    whole reply calls (its arguments); neither: "required"'s list of calls. `auto`: free text, read for calls in
    the parser's format (the functions it may call, and whether more than one)."""

    schema: dict[str, Any] | None
    named: str | None = None
    auto: tuple[str, ...] | None = None
    parallel: bool = True


def tool_choice(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None, parallel: bool = True,
                parser: str | None = None) -> ToolChoice:
    """The constraint that OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` ask for, with the server's
    `parser` for "auto" (None: "auto" is refused); an OptionsError for what cannot be done or is malformed."""
    functions = _functions(tools or [])
    if choice is None:
        choice = "auto" if functions else "none"
    if choice == "none":
        return ToolChoice(None)
    if not functions:
        raise OptionsError("tool_choice names a call, but the request gives no tools")
    if choice == "auto":
        if parser is None:
            raise OptionsError('tool_choice "auto" (OpenAI\'s default with tools) asks the model to choose between text and a call '
                               'in a format of its own, which this server reads only where started with --tool-call-parser (hermes): '
                               'give tool_choice "required", a function ({"type": "function", "function": {"name": ...}}) or "none"')
        return ToolChoice(None, auto=tuple(functions), parallel=parallel)
    if choice == "required":
        # Each schema's "$defs" go to the root, where its "#/$defs/..." references point once it is nested (pydantic's
        # schemas of nested models have them); one name defined two ways cannot be.
        definitions: dict[str, Any] = {}
        for name, parameters in functions.items():
            for key, value in parameters.get("$defs", {}).items():
                if definitions.setdefault(key, value) != value:
                    raise OptionsError(f"tools: the definition {key!r} ($defs) differs between functions; \"required\" needs one")
        calls = {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [name]}, "parameters": {k: v for k, v in parameters.items() if k != "$defs"}},
             "required": ["name", "parameters"]} for name, parameters in functions.items()]}
        return ToolChoice({"type": "array", "minItems": 1, "items": calls, **({} if parallel else {"maxItems": 1}),
                           **({"$defs": definitions} if definitions else {})})
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise OptionsError('tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name": ...}}, '
                           f"got {json.dumps(choice)[:80]}")
    if name not in functions:
        raise OptionsError(f"tool_choice names the function {name!r}, which is not among the tools ({', '.join(functions)})")
    return ToolChoice(functions[name], name)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """OpenAI's tools ([{"type": "function", "function": {"name", "description", "parameters"}}]) by name: their
    parameters' schemas."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise OptionsError(f'tools[{i}] is {{"type": "function", "function": {{"name": ..., "parameters": {{...}}}}}}')
        parameters = function.get("parameters") or NO_PARAMETERS
        if not isinstance(parameters, dict):
            raise OptionsError(f"tools[{i}].function.parameters is a JSON schema (an object)")
        if function["name"] in functions:
            raise OptionsError(f"tools: two functions are named {function['name']!r}")
        functions[function["name"]] = parameters
    return functions


@dataclass
class Call:
    name: str
    arguments: str = ""  # JSON text, as written so far


@dataclass
class ToolCalls:
    """One reply's calls, read as its text grows (the text the constraint of `tool_choice` holds). `push` gives what
    each piece adds: (call index, the call's name where the piece begins it else None, its arguments' new text)."""

    named: str | None
    calls: list[Call] = field(default_factory=list)
    _depth: int = 0  # brackets open outside strings
    _string: bool = False
    _escape: bool = False
    _head: str = ""  # the current item's text before its arguments: {"name":"...","parameters":
    _in_arguments: bool = False

    def push(self, text: str) -> list[tuple[int, str | None, str]]:
        news: list[tuple[int, str | None, str]] = []
        if self.named is not None:  # the whole reply is one call's arguments
            first = not self.calls
            if first:
                self.calls.append(Call(self.named))
            self.calls[0].arguments += text
            return [(0, self.named, text)] if first else [(0, None, text)] if text else []
        for ch in text:
            # An item's arguments end at the "," or "}" that follows them at the item's own depth
            if self._in_arguments and not self._string and self._depth == 2 and ch in ",}":
                self._in_arguments = False
            if self._in_arguments:
                self.calls[-1].arguments += ch
                if news and news[-1][0] == len(self.calls) - 1:
                    news[-1] = (news[-1][0], news[-1][1], news[-1][2] + ch)
                else:
                    news.append((len(self.calls) - 1, None, ch))
            elif self._depth >= 2 or (self._depth == 1 and ch == "{"):  # in an item, before its arguments
                self._head += ch
            self._scan(ch)
            if not self._in_arguments and self._head.endswith(ARGUMENTS_KEY) and not self._string and self._depth == 2:
                self.calls.append(Call(json.loads(self._head[: -len(ARGUMENTS_KEY)] + "}")["name"]))
                news.append((len(self.calls) - 1, self.calls[-1].name, ""))
                self._head, self._in_arguments = "", True
            elif self._depth == 1:
                self._head = ""
        return news

    def _scan(self, ch: str) -> None:
        if self._string:
            self._escape, self._string = (False, True) if self._escape else (ch == "\\", ch != '"')
        elif ch == '"':
            self._string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1


OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class HermesCalls:
    """A reply in the Hermes format read as its text grows: what is outside the `<tool_call>...</tool_call>` blocks
    is content; each block that holds {"name": one of `functions`, "arguments": {...}} (JSON) is a call; a block that
    does not is content, as written. `push` gives each piece's news, ("content", text) and ("call", name,
    arguments as JSON text), in order, and `end` the rest at the reply's end (an unclosed last block is read as if
    closed: a reply cut at max_tokens inside a call ends there). Whitespace before a block, and at the end of a reply
    with calls, is not content; held back until it is known, as is text that may be the start of a block."""

    functions: tuple[str, ...]
    parallel: bool = True  # False: the first call only, later blocks dropped
    calls: int = 0  # calls given out
    _text: str = ""  # read, not yet given out
    _in_block: bool = False

    def push(self, text: str) -> list[tuple[str, ...]]:
        self._text += text
        news: list[tuple[str, ...]] = []
        while True:
            if self._in_block:
                end = self._text.find(CLOSE)
                if end < 0:
                    return news
                news += self._block(self._text[:end])
                self._text, self._in_block = self._text[end + len(CLOSE) :], False
                continue
            start = self._text.find(OPEN)
            if start >= 0:
                news += self._content(self._text[:start].rstrip())
                self._text, self._in_block = self._text[start + len(OPEN) :], True
                continue
            held = _held(self._text)
            news += self._content(self._text[: len(self._text) - held])
            self._text = self._text[len(self._text) - held :]
            return news

    def whole(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """A whole reply read at once: its content (outside the calls), and its calls as (name, arguments)."""
        news = self.push(text) + self.end()
        return "".join(n[1] for n in news if n[0] == "content"), [(n[1], n[2]) for n in news if n[0] == "call"]

    def end(self) -> list[tuple[str, ...]]:
        text, self._text = self._text, ""
        if self._in_block:
            self._in_block = False
            return self._block(text, closed=False)
        return self._content(text.rstrip() if self.calls else text)

    def _content(self, text: str) -> list[tuple[str, ...]]:
        return [("content", text)] if text else []

    def _block(self, body: str, closed: bool = True) -> list[tuple[str, ...]]:
        try:
            call = json.loads(body)
        except ValueError:
            call = None
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if not (isinstance(call, dict) and call.get("name") in self.functions and isinstance(arguments, dict)):
            return self._content(OPEN + body + (CLOSE if closed else ""))
        if self.calls and not self.parallel:
            return []
        self.calls += 1
        return [("call", call["name"], json.dumps(arguments))]


def _held(text: str) -> int:
    """How many characters at the end of `text` are held back: trailing whitespace, and before it what may be the
    start of a block's tag."""
    partial = next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)
    body = text[: len(text) - partial]
    return partial + len(body) - len(body.rstrip())
