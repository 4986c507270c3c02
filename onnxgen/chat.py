"""Chat templates: a checkpoint's Jinja template turns a conversation into the prompt text, as transformers'
`apply_chat_template(messages, tokenize=False)` does.

The export saves the template (tokenizer_config.json's `chat_template`, as transformers reads it) as
chat_template.jinja and the tokenizer's special tokens in the manifest, which templates name (`eos_token`, ...).
The template runs in jinja2's sandbox with what transformers gives it: trim_blocks and lstrip_blocks, loop
controls, `raise_exception`, `strftime_now`, a `tojson` that leaves non-ASCII text as it is, and `{% generation %}`
blocks (which mark an assistant's tokens for training) rendered as their content.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar

from .errors import OptionsError

Message = dict[str, Any]
CONTINUE = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of where the last message ends


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, Any]) -> None:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):  # {% generation %} ... {% endgeneration %}: the content, nothing more
            tags: ClassVar[set[str]] = {"generation"}

            def parse(self, parser: Any) -> Any:
                line = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body).set_lineno(line)

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        self._errors = jinja2.exceptions.TemplateError
        try:
            self._template = env.from_string(source)
        except self._errors as e:
            raise OptionsError(f"the model's chat template does not parse: {e}") from None
        self.special_tokens = special_tokens

    def render(self, messages: list[Message], add_generation_prompt: bool = True, continue_final_message: bool = False,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation as the model was trained to read it; with `add_generation_prompt`, followed by what
        opens an assistant's turn; with `continue_final_message`, ending inside the last message (a reply begun
        for the model to go on with), cut where transformers cuts it: at a marker appended to that message.
        `tools`: the functions the model may call (JSON schemas, as transformers gives them to the template); an
        assistant's message may then hold `tool_calls` instead of content, and a "tool" message a call's result."""
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and (
                isinstance(m.get("content"), str) or (m.get("content") is None and isinstance(m.get("tool_calls"), list))) for m in messages):
            raise OptionsError("messages must be a non-empty list of {'role': str, 'content': str} dicts (an assistant's "
                               "content may be None beside its 'tool_calls')")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise OptionsError("tools must be a list of JSON schemas (dicts), as transformers' apply_chat_template takes them")
        if add_generation_prompt and continue_final_message:
            raise OptionsError("add_generation_prompt opens a new turn and continue_final_message goes on with the last one: "
                               "one of them, as in transformers")
        if continue_final_message:
            if messages[-1].get("content") is None:
                raise OptionsError("continue_final_message: the last message has no content to go on with")
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + CONTINUE}]
        try:
            text = self._template.render(messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except self._errors as e:  # the template's own raise_exception: a conversation it refuses (roles out of order, ...)
            raise OptionsError(f"the chat template refuses these messages: {e}") from None
        if not continue_final_message:
            return text
        if CONTINUE.strip() not in text:
            raise OptionsError("continue_final_message: the chat template leaves out the last message's end, so there is "
                               "nothing to go on from")
        at = text.rindex(CONTINUE.strip())
        # A template that trims the message's trailing space trims the marker's leading one: trim the text too
        return text[:at] if text[at : at + len(CONTINUE)] == CONTINUE else text[:at].rstrip()
