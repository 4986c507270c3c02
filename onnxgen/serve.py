"""`onnxgen serve`: OpenAI's completions and chat completions APIs over one loaded model (FastAPI; the `serve` extra).

    POST /v1/completions   prompt (text, texts, token ids or lists of them), max_tokens, temperature, top_p,
                           n, stop, seed, presence_penalty, frequency_penalty, logprobs, echo (with logprobs:
                           the prompt's too; max_tokens 0 scores the prompt alone), stream (server-sent
                           events), response_format (JSON: guidance.py), and onnxgen's other options as extra fields
                           (top_k, repetition_penalty, regex, ...)
    POST /v1/chat/completions  messages (the model's chat template makes them the prompt text: chat.py), max_tokens or
                           max_completion_tokens, temperature, top_p, n, stop, seed, the penalties, logprobs and
                           top_logprobs, stream, response_format, tools with tool_choice "required", a named
                           function or "none" (tools.py: the reply is then tool_calls; "auto" reads the calls a
                           model writes, with --tool-call-parser hermes, else is a 400), and extra
                           fields as above; 400 for a model without a template
    POST /v1/responses     OpenAI's Responses API over the same (responses.py): input, instructions, max_output_tokens,
                           temperature, top_p, text.format, function tools and tool_choice, stream (its events),
                           include logprobs, previous_response_id (a kept response's conversation goes on)
    GET, DELETE /v1/responses/ID  a kept response (the last --stored-responses, in memory), or forget it
    POST /tokenize         text, or a chat's messages (through the template) -> its token ids, count and the context
                           window (vLLM's shape), so that a client can fit a prompt with the served model's own
                           tokenizer (a fine-tune's added tokens)
    POST /detokenize       token ids -> text
    GET  /v1/models        the model served (max_model_len: its context window, as vLLM gives it), and its LoRA adapters,
                           each a model a request's "model" names (adapters.py; vLLM's --lora-modules)
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter  vLLM's: an adapter loaded or let go while the server runs
                           (create_app's adapter_loading, serve's --adapter-loading; off by default)
    GET  /health           200 once the model is loaded
    GET  /metrics          Prometheus' text format (metrics.py): requests by outcome, tokens, time to first token,
                           the batcher's queue and rows; like /health, no API key (as vLLM's)

Requests run through batcher.py (continuous batching: a request's rows join the rows already decoding at
the next step, and leave when they end). Errors use OpenAI's JSON shape with a 4xx code; no traceback ever
reaches a client. A client that disconnects ends its rows, streaming or not. Safe defaults: localhost, limits on body size, prompt, max_tokens and n
(each a 400), and a bounded queue that answers 429 when full.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .batcher import Batcher, Full, Job
from .errors import ModelFolderError, OnnxgenError, OptionsError, openai_error, told
from .generator import Completion, Event, for_json
from .guidance import CONSTRAINTS
from .healing import heal
from .metrics import Metrics
from .model import Model
from .options import WatermarkingConfig, under_key
from .responses import Reply, ResponsesRequest, Store, chat_request, input_items
from .tokenizer import TextStream
from .tools import PARSERS, HermesCalls, ToolCalls, ToolChoice, tool_choice


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024  # per completion; the context window caps it further
    max_n: int = 16
    max_prompts: int = 64
    max_batch: int = 8  # rows decoded together (the shared key/value cache's rows)
    prefill_chunk: int | None = None  # a longer prompt is written that many positions a step (batcher.py: 128 on the CPU, 512 on CUDA)
    max_queue: int = 64  # waiting requests before 429


class OpenAIRequest(BaseModel):
    """The fields OpenAI's completions and chat completions share, with OpenAI's defaults; onnxgen's other options
    pass through as extra fields."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (OpenAI's), on both endpoints as vLLM
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI reads null as "not given" (some clients send every field): its default, not a 400. Only for
        OpenAI's fields: an extra field's null means what it means to onnxgen (eos_token_id null: no end token)."""
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields} if isinstance(data, dict) else data


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # 0 with echo: the prompt scored, nothing generated (OpenAI's legacy use)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatRequest(OpenAIRequest):
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)  # None: what the context leaves, up to the server's max_tokens
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for it
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None  # OpenAI's functions, for the template and tool_choice (tools.py)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True


class TokenizeRequest(BaseModel):  # vLLM's: a prompt, or a chat's messages through the model's template
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages (a chat's, through the model's template)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class LoadAdapterRequest(BaseModel):  # vLLM's /v1/load_lora_adapter
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):  # vLLM's /v1/unload_lora_adapter
    model_config = ConfigDict(extra="forbid")
    lora_name: str


UNSUPPORTED = {"suffix": None, "best_of": None}  # refused unless default
# onnxgen's names for what OpenAI's fields say (and the server's limits hold), refused as extra fields.
OPENAIS = {"max_new_tokens": "max_tokens", "max_length": "max_tokens", "min_length": "max_tokens", "num_return_sequences": "n",
           "adapter": "model"}


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": openai_error(message, kind, param, code)}, status_code=status)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What error() sends: OpenAI's error object (errors.openai_error) under "error"."""

    error: ErrorDetail


# What the OpenAPI document (/openapi.json) says a route answers besides its 200, so that a client generated from it
# knows the errors: OpenAI's shape for every 4xx and 5xx. A "4XX" entry also keeps FastAPI from listing its own 422,
# which this server never sends (a refused body is a 400, as OpenAI's is: `invalid` below).
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "refused: 400 bad request, 401 API key, 404 no such model or response, "
                                               "429 queue full"},
    "5XX": {"model": ErrorBody, "description": "a bug in onnxgen"},
}
# A route that streams when the request asks ("stream": true) answers server-sent events instead of JSON.
STREAMS: dict[int | str, dict[str, Any]] = {**ERRORS, 200: {"description": "the answer, or with stream: true its server-sent events",
                                                              "content": {"text/event-stream": {}}}}


def create_app(model: Model, name: str, api_key: str | None = None, limits: Limits | None = None,
               draft: Model | None = None, ray_metrics: bool = False, allowed_origins: list[str] | None = None,
               adapter_loading: bool = False, stored_responses: int = 1000, tool_call_parser: str | None = None,
               watermark_key: int | None = None) -> FastAPI:
    """The app over `model`; `draft`: a draft model that requests ask for with "assistant_model": true;
    `ray_metrics`: a Ray Serve replica's app, whose requests Ray's metrics count too (metrics.py); `allowed_origins`:
    the web pages (scheme://host:port, or "*") whose scripts may call it from a browser (CORS); `adapter_loading`: LoRA
    adapters loaded and unloaded while it runs, by vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter;
    `stored_responses`: how many finished /v1/responses answers are kept for previous_response_id (0: none);
    `tool_call_parser`: the format ("hermes") in which the model writes tool calls, which makes tool_choice "auto"
    possible (tools.py; vLLM's --tool-call-parser); `watermark_key`: every text written under a watermark with this
    private key (options.under_key, watermark.py), which no request can change (as none can where the folder's
    generation_config.json has a watermarking_config)."""
    limits = limits or Limits()
    watermark = None if watermark_key is None else under_key(model.defaults.watermarking_config, watermark_key)
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise OptionsError(f"tool call parser {tool_call_parser!r}: onnxgen reads {', '.join(PARSERS)}")
    if adapter_loading and model.runtime.lora is None:
        raise OptionsError(f"adapter loading: {model.folder.path} takes no LoRA adapters (export the base with --lora)")
    batcher = Batcher(model, limits.max_batch, limits.max_queue, limits.prefill_chunk)
    store = Store(stored_responses)
    scoring = asyncio.Semaphore(1)  # prompts scored for echo with logprobs, one request at a time (_prompt_logprobs)
    app = FastAPI(title="onnxgen", docs_url=None, redoc_url=None)
    metrics = Metrics(batcher, ray=ray_metrics)
    app.state.batcher, app.state.draft = batcher, draft

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    if allowed_origins:  # added last, so outermost: a browser's preflight is answered before the API key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        if request.url.path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):  # what the metrics count
            metrics.requests.labels("invalid").inc()
        first = e.errors()[0]
        content_type = request.headers.get("content-type", "")
        if tuple(first.get("loc", ())) == ("body",) and "json" not in content_type:  # FastAPI reads JSON only so labelled (CSRF)
            return error(400, f"send the body as JSON, with Content-Type: application/json (this one's: {content_type or 'none'})")
        if first.get("type") == "json_invalid":  # its loc is the character, not a field
            at = first.get("loc", ("body", "?"))[-1]
            return error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))} (character {at})")
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'body'}: {first.get('msg')}", where)

    @app.exception_handler(StarletteHTTPException)
    async def refused_by_starlette(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """What FastAPI and Starlette answer themselves (no such route, a method the route lacks, a body that is not UTF-8),
        in OpenAI's shape too."""
        response = error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
        response.headers.update(e.headers or {})
        if e.status_code == 405:  # Allow: the methods of every route at this path (Starlette names the first route's only)
            methods = {m for route in request.app.routes if route.matches(request.scope)[0] != Match.NONE
                       for m in getattr(route, "methods", None) or ()}
            response.headers["Allow"] = ", ".join(sorted(methods))
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def scrape() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def other_model(asked: str | None) -> JSONResponse | None:
        """A request naming another model gets a 404: answering with this one would be a wrong answer. A LoRA adapter
        the server was started with is a model of its own (vLLM's --lora-modules): `model` names it."""
        if asked is None or asked == name or asked in model.adapters:
            return None
        served = ", ".join(repr(n) for n in [name, *model.adapters])
        return error(404, f"the model {asked!r} does not exist: this server has {served}", "model", code="model_not_found")

    def refused(response: JSONResponse) -> JSONResponse:
        """A completion or chat completion refused before it started, as the metrics count it."""
        metrics.requests.labels("invalid").inc()
        return response

    @app.post("/tokenize", response_model=None, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> Any:
        if wrong := other_model(body.model):
            return wrong
        try:
            text = body.prompt if body.messages is None else model.apply_chat_template(
                [_template_message(m) for m in body.messages], add_generation_prompt=body.add_generation_prompt, tools=body.tools)
        except OnnxgenError as e:  # no template, or one that refuses these messages
            return error(400, str(e), "messages")
        tokens = model.tokenizer.encode(text or "")
        return {"count": len(tokens), "max_model_len": model.context_length, "tokens": tokens}

    @app.post("/detokenize", response_model=None, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> Any:
        if wrong := other_model(body.model):
            return wrong
        outside = [t for t in body.tokens if not 0 <= t < model.tokenizer.vocab_size]
        if outside:
            return error(400, f"tokens: {outside[0]} is not a token id (0 to {model.tokenizer.vocab_size - 1})", "tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}

    @app.get("/v1/responses/{response_id}", response_model=None, responses=ERRORS)
    async def stored(response_id: str) -> Any:
        response = store.get(response_id)
        return response if response is not None else error(404, f"no response {response_id!r} is kept here", code="not_found")

    @app.delete("/v1/responses/{response_id}", response_model=None, responses=ERRORS)
    async def forget(response_id: str) -> Any:
        if not store.delete(response_id):
            return error(404, f"no response {response_id!r} is kept here", code="not_found")
        return {"id": response_id, "object": "response", "deleted": True}

    if adapter_loading:
        @app.post("/v1/load_lora_adapter", response_model=None, responses=ERRORS)
        async def load_adapter(body: LoadAdapterRequest) -> Any:
            """An adapter folder on the server's machine (the request names a path there: behind the API key) becomes a
            model that later requests name."""
            if body.lora_name == name:
                return error(400, f"lora_name {name!r} is the served model's own name", "lora_name")
            try:
                await asyncio.to_thread(model.load_adapter, body.lora_name, body.lora_path)
            except OnnxgenError as e:
                return error(400, str(e), "lora_path" if isinstance(e, ModelFolderError) else "lora_name")
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", response_model=None, responses=ERRORS)
        async def unload_adapter(body: UnloadAdapterRequest) -> Any:
            """Later requests cannot name it; those running with it finish with it."""
            try:
                model.unload_adapter(body.lora_name)
            except OnnxgenError as e:
                return error(404, str(e), "lora_name")
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/v1/models", responses=ERRORS)
    async def models() -> dict[str, Any]:
        # max_model_len: the context window, as vLLM names it (clients that budget a prompt read it there)
        # LoRA adapters as vLLM lists them: their own id, the base model as parent, their folder as root
        adapters = [{"id": adapter, "object": "model", "created": 0, "owned_by": "onnxgen", "root": str(folder), "parent": name,
                     "max_model_len": model.context_length} for adapter, folder in model.adapters.items()]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "onnxgen",
                                            "max_model_len": model.context_length}, *adapters]}

    @app.post("/v1/completions", response_model=None, responses=STREAMS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        start = time.perf_counter()
        if wrong := other_model(body.model):
            return refused(wrong)
        try:
            prompts, options = _job_input(model, body, limits, draft, watermark)
        except (OnnxgenError, ValueError) as e:
            return refused(error(400, str(e)))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or name}
        echoed = None
        if body.echo and body.logprobs is not None:
            async with scoring:
                echoed = await asyncio.to_thread(_prompt_logprobs, model, prompts, body.logprobs, options.adapter)
        if body.max_tokens == 0:
            asked = [] if body.logprobs is not None else None
            done = [Completion("", [], "length", i, asked, asked) for i in range(len(prompts)) for _ in range(body.n)]
            metrics.finished(prompts, done, time.perf_counter() - start, options.adapter)
            return {**meta, "object": "text_completion", "choices": [_choice(model, body, prompts, c, i, echoed) for i, c in enumerate(done)],
                    "usage": _usage(prompts, done)}
        submitted = submit(prompts, options)
        if isinstance(submitted, JSONResponse):
            return submitted
        job, channel = submitted
        if body.stream:
            # token healing: echoed, a choice's first token starts at its prompt's end, which it re-covers
            tails = [len(h.tail) if options.token_healing and body.echo and (h := heal(model.tokenizer, p)) else 0 for p in prompts]
            opening = [{"text": model.tokenizer.decode(prompts[i // body.n]), "index": i,
                        "logprobs": _echoed(echoed[i // body.n], tails[i // body.n] > 0) if echoed else None,
                        "finish_reason": None} for i in range(len(prompts) * body.n)] if body.echo else []
            sent = [len(c["text"]) for c in opening] or [0] * (len(prompts) * body.n)  # each choice's text so far: offsets
            before = [tails[i // body.n] for i in range(len(prompts) * body.n)]  # the first token's start, before its text

            def piece(index: int, text: str, source: Event | Completion) -> dict[str, Any]:
                offset, sent[index] = sent[index], sent[index] + len(text)
                if isinstance(source, Event):
                    offset, before[index] = offset - before[index], 0
                return {"text": text, "index": index, "logprobs": _logprobs(model, source, offset, body.echo),
                        "finish_reason": _finish(source.finish_reason)}
            return _streamed(job, channel, request, {**meta, "object": "text_completion"}, piece, opening, body, prompts)
        done = await ended(job, channel, request)
        if isinstance(done, JSONResponse):
            return done
        choices = [_choice(model, body, prompts, c, i, echoed) for i, c in enumerate(done)]
        return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(prompts, done)}

    @app.post("/v1/chat/completions", response_model=None, responses=STREAMS)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """OpenAI's chat completions over the model's chat template (chat.py): the conversation becomes the prompt
        text, which then runs as a completion does."""
        if wrong := other_model(body.model):
            return refused(wrong)
        started = start_chat(body)
        if isinstance(started, JSONResponse):
            return started
        job, channel, prompts, calls = started
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or name}
        if body.stream:
            readers = [ToolCalls(calls.named) for _ in range(body.n)]
            parsers = [HermesCalls(calls.auto, calls.parallel) for _ in range(body.n)] if calls.auto is not None else []

            def piece(index: int, text: str, source: Event | Completion) -> dict[str, Any]:
                delta: dict[str, Any] = {"content": text} if text and calls.schema is None and calls.auto is None else {}
                if calls.schema is not None and (news := readers[index].push(text)):
                    delta["tool_calls"] = [{"index": call, **({"id": _call_id(), "type": "function"} if name else {}),
                                            "function": {**({"name": name} if name else {}), "arguments": arguments}}
                                           for call, name, arguments in news]
                if parsers:  # "auto": the text read for the format's calls
                    before = parsers[index].calls
                    delta = _parsed(parsers[index].push(text) + (parsers[index].end() if source.finish_reason else []), before)
                called = bool(parsers) and parsers[index].calls > 0
                return {"index": index, "delta": delta, "logprobs": _chat_logprobs(model, source),
                        "finish_reason": _finish(source.finish_reason, calls, called)}

            opening = [{"index": i, "delta": {"role": "assistant", "content": "" if calls.schema is None else None}, "logprobs": None,
                        "finish_reason": None} for i in range(body.n)]
            return _streamed(job, channel, request, {**meta, "object": "chat.completion.chunk"}, piece, opening, body, prompts)
        done = await ended(job, channel, request)
        if isinstance(done, JSONResponse):
            return done
        messages = [_message(c.text, calls) for c in done]
        choices = [{"index": i, "message": message, "logprobs": _chat_logprobs(model, c),
                    "finish_reason": _finish(c.finish_reason, calls, calls.auto is not None and bool(message.get("tool_calls")))}
                   for i, (c, message) in enumerate(zip(done, messages))]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(prompts, done)}

    @app.post("/v1/responses", response_model=None, responses=STREAMS)
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        """OpenAI's Responses API (responses.py): the request as a chat completion, its answer as a response object."""
        if wrong := other_model(body.model):
            return refused(wrong)
        previous = None
        if body.previous_response_id is not None:
            previous = store.conversation(body.previous_response_id)
            if previous is None:
                kept = f"keeps the last {store.limit} responses" if store.limit else "keeps no responses"
                return refused(error(404, f"previous_response_id: no response {body.previous_response_id!r} is kept here (this server "
                                          f"{kept}); send the conversation in input", "previous_response_id", code="previous_response_not_found"))
        try:
            chat = ChatRequest(**chat_request(body, previous))
        except ValidationError as e:  # a message of the input that chat's fields refuse
            first = e.errors()[0]
            return refused(error(400, f"input: {'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg')}"))
        except ValueError as e:
            return refused(error(400, str(e)))
        started = start_chat(chat)
        if isinstance(started, JSONResponse):
            return started
        job, channel, prompts, calls = started
        asked = input_items(body)

        def scored(source: Event | Completion) -> list[dict[str, Any]] | None:
            logprobs = _chat_logprobs(model, source)
            return logprobs["content"] if logprobs else None

        def kept(response: dict[str, Any]) -> None:
            store.keep(response, asked, body.previous_response_id)

        reply = Reply(body, body.model or name, calls, len(prompts[0]), scored, kept if body.store and store.limit else None)
        if body.stream:
            return StreamingResponse(reply.events(news(job, channel, request)), media_type="text/event-stream")
        done = await ended(job, channel, request)
        if isinstance(done, JSONResponse):
            return done
        return reply.whole(done[0])

    def start_chat(body: ChatRequest) -> tuple[Job, asyncio.Queue[tuple[str, Any]], list[list[int]], ToolChoice] | JSONResponse:
        """A chat request's job queued, with its channel, prompt and what tool_choice asks for; or why it was not."""
        try:
            prompts, options, calls = _chat_input(model, body, limits, draft, tool_call_parser, watermark)
        except (OnnxgenError, ValueError) as e:
            return refused(error(400, str(e)))
        submitted = submit(prompts, options)
        return submitted if isinstance(submitted, JSONResponse) else (*submitted, prompts, calls)

    def submit(prompts: list[list[int]], options: Any) -> tuple[Job, asyncio.Queue[tuple[str, Any]]] | JSONResponse:
        """The request's job, queued for the batcher, and the channel its news come back by; or a 429."""
        channel: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(prompts, options, metrics.tracked(lambda kind, value: loop.call_soon_threadsafe(channel.put_nowait, (kind, value)), prompts,
                                                    options.adapter))
        try:
            batcher.submit(job)
        except Full as e:
            metrics.requests.labels("rejected").inc()
            return error(429, f"server busy: {e}; retry shortly", kind="rate_limit_error")
        return job, channel

    return app


class Guard:
    """The API key, the body's size, and a bug's one line: an ASGI middleware of its own (Starlette's `@app.middleware`
    keeps a handler from hearing that its client went away, which `ended` listens for)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        guarded = request.url.path.startswith("/v1/") or request.url.path in ("/tokenize", "/detokenize")
        if self.api_key and guarded and request.headers.get("authorization") != f"Bearer {self.api_key}":
            await error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")(scope, receive, send)
            return
        if int(request.headers.get("content-length") or 0) > self.max_body_bytes:
            await error(400, f"request body over {self.max_body_bytes} bytes")(scope, receive, send)
            return
        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # a bug: one line to the client, never a traceback
            if started:  # a reply already on its way (a stream) cannot become another
                raise
            await JSONResponse({"error": told(e)}, status_code=500)(scope, receive, send)


async def ended(job: Job, channel: asyncio.Queue[tuple[str, Any]], request: Request) -> list[Completion] | JSONResponse:
    """A job's completions once it ends (its events passed over), or its error. A client that goes away before then
    ends the job's rows: nothing tells a handler that does not stream (a stream's ends when its sending fails)."""
    async def hang_up() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        job.cancelled.set()

    watch = asyncio.create_task(hang_up())
    try:
        kind, value = await channel.get()
        while kind == "event":
            kind, value = await channel.get()
    finally:
        watch.cancel()
    if kind == "error":
        return JSONResponse({"error": told(value)}, status_code=400 if isinstance(value, OnnxgenError) else 500)
    return value[0]


def _chat_input(model: Model, body: ChatRequest, limits: Limits, draft: Model | None, parser: str | None,
                watermark: WatermarkingConfig | None) -> tuple[list[list[int]], Any, ToolChoice]:
    """A chat request as the completion it runs as: the template's prompt (tools included), onnxgen options (a tool
    call's JSON as the constraint), and what tool_choice asks for (`parser`: the server's for "auto")."""
    calls = tool_choice(body.tools, body.tool_choice, body.parallel_tool_calls, parser)
    messages = [_template_message(m) for m in body.messages]
    prompt = model.tokenizer.encode(model.apply_chat_template(messages, add_generation_prompt=True, tools=body.tools))
    # OpenAI's default is as many tokens as the context leaves; the server's limit caps it
    asked = body.max_completion_tokens or body.max_tokens or max(1, min(limits.max_tokens, model.context_length - len(prompt)))
    shared = {field: getattr(body, field) for field in OpenAIRequest.model_fields}
    extra = dict(body.model_extra or {})
    for field in sorted(extra.keys() & CompletionRequest.model_fields.keys()):  # echo, prompt: set below, as a chat runs
        raise ValueError(f"{field} is a completions field, not a chat one")
    if calls.schema is not None:
        if (body.response_format or {}).get("type", "text") != "text" or extra.keys() & set(CONSTRAINTS):
            raise ValueError("tool_choice holds the reply to a call's JSON: not with response_format, json_schema, regex or grammar")
        extra["json_schema"] = calls.schema
    completion = CompletionRequest.model_construct(**shared, **extra, prompt=prompt, max_tokens=asked, echo=False,
                                                   logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    return (*_job_input(model, completion, limits, draft, watermark), calls)


def _job_input(model: Model, body: CompletionRequest, limits: Limits, draft: Model | None,
               watermark: WatermarkingConfig | None) -> tuple[list[list[int]], Any]:
    """The request as token ids and onnxgen options: OpenAI's names mapped, onnxgen's extras passed on (the server's
    watermark, where it has one, over them)."""
    extra = dict(body.model_extra or {})
    if "watermarking_config" in extra and (watermark or model.defaults.watermarking_config) is not None:
        raise ValueError("this server watermarks its text: watermarking_config is the server's, not a request's")
    if extra.get("assistant_model") is not None:  # JSON cannot carry a model: true asks for the server's draft
        if extra["assistant_model"] is not True or draft is None:
            raise ValueError("assistant_model is true (the server's draft model: onnxgen serve --assistant-model DIR) or "
                             f"null{'' if draft else '; this server has none'}")
        extra["assistant_model"] = draft
    for field, default in UNSUPPORTED.items():
        if extra.pop(field, default) not in (default, None):
            raise ValueError(f"{field} is not supported")
    for field in OPENAIS.keys() & extra.keys():
        raise ValueError(f"{field} is OpenAI's {OPENAIS[field]} here")
    _vllms_names(extra, model)
    if body.max_tokens == 0 and body.stream:
        raise ValueError("max_tokens 0 (the prompt scored, nothing generated) is not streamed")
    if body.max_tokens > limits.max_tokens:
        raise ValueError(f"max_tokens is at most {limits.max_tokens}, got {body.max_tokens}")
    if body.n > limits.max_n:
        raise ValueError(f"n is at most {limits.max_n}, got {body.n}")
    prompt = body.prompt
    batch = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if len(batch) > limits.max_prompts:
        raise ValueError(f"at most {limits.max_prompts} prompts a request, got {len(batch)}")
    constraint = _response_format(body.response_format)
    if constraint and extra.keys() & set(CONSTRAINTS):
        raise ValueError("response_format, or one of json_schema, regex and grammar: not both")
    # OpenAI: temperature 0 is greedy; beams are beam search and penalty_alpha contrastive search unless do_sample asks
    # for sampling (a bad num_beams or penalty_alpha: options' 400)
    searching = extra.get("num_beams", 1) != 1 or extra.get("penalty_alpha", 0) not in (0, None)
    sampling = body.temperature > 0 and (not searching or extra.get("do_sample") is True)
    # max_tokens 0 generates nothing: its options are checked as for 1
    # `model` naming a LoRA adapter the server was started with runs it (other names are refused before this)
    overrides: dict[str, Any] = {"adapter": body.model if body.model in model.adapters else None,
                                 "max_new_tokens": max(body.max_tokens, 1), "num_return_sequences": body.n, "do_sample": sampling,
                                 "top_k": 0, "top_p": body.top_p, "stop": body.stop, "seed": body.seed, "logprobs": body.logprobs,
                                 "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                                 **({"temperature": body.temperature} if sampling else {}), **constraint, **extra,
                                 **({"watermarking_config": watermark} if watermark is not None else {})}
    options = model.options(**overrides)
    return model.prompt_ids(batch, options), options  # the same checks as generate()


# vLLM's structured outputs: its older extra fields, and the keys of its newer `structured_outputs` field
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _vllms_names(extra: dict[str, Any], model: Model) -> None:
    """vLLM's extra fields that say what onnxgen options say, as its clients and its benchmark send them: min_tokens
    (min_new_tokens), ignore_eos (no end token: every row runs to max_tokens), stop_token_ids (end tokens besides
    the model's), top_k -1 (vLLM's "off", onnxgen's 0), allowed_token_ids (every other token suppressed), bad_words (texts
    never generated: each as it is tokenized alone and after a space, as vLLM bans them, onnxgen's bad_words_ids), and
    its structured outputs (_vllms_constraint): guided_json,
    guided_regex, guided_choice (one of the texts), guided_grammar (Lark, as vLLM's guidance backend reads it), or
    structured_outputs {"json"|"regex"|"choice"|"grammar": ...} / {"json_object": true}."""
    if "min_tokens" in extra:
        if "min_new_tokens" in extra:
            raise ValueError("min_tokens is vLLM's name for min_new_tokens: give one of them")
        extra["min_new_tokens"] = extra.pop("min_tokens")
    if extra.get("top_k") == -1:
        extra["top_k"] = 0
    ignore_eos, stop_ids = extra.pop("ignore_eos", False), extra.pop("stop_token_ids", None)
    if ignore_eos not in (True, False):
        raise ValueError(f"ignore_eos is true or false, got {ignore_eos!r}")
    if stop_ids is not None and not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise ValueError("stop_token_ids is a list of token ids")
    if ignore_eos or stop_ids:
        if "eos_token_id" in extra:
            raise ValueError("ignore_eos and stop_token_ids (vLLM's) say what eos_token_id says: give one of them")
        extra["eos_token_id"] = ([] if ignore_eos else model.defaults.eos_ids) + (stop_ids or []) or None
    allowed, words = extra.pop("allowed_token_ids", None), extra.pop("bad_words", None)
    if allowed is not None:
        if not (isinstance(allowed, list) and allowed and all(isinstance(t, int) and not isinstance(t, bool) for t in allowed)):
            raise ValueError("allowed_token_ids is a non-empty list of token ids")
        extra["suppress_tokens"] = sorted(set(range(model.dims.vocab_size)) - set(allowed) | set(extra.get("suppress_tokens") or []))
    if words is not None:
        if not (isinstance(words, list) and all(isinstance(w, str) and w.strip() for w in words)):
            raise ValueError("bad_words is a list of texts")
        sequences = {tuple(model.tokenizer.encode(text)) for w in words for text in (w.strip(), " " + w.strip())}
        extra["bad_words_ids"] = [*(extra.get("bad_words_ids") or []), *map(list, sorted(sequences))]
    _vllms_constraint(extra)


def _vllms_constraint(extra: dict[str, Any]) -> None:
    """vLLM's structured outputs as onnxgen's json_schema, regex or grammar: one a request, as onnxgen's own."""
    guided = [(GUIDED[name], extra.pop(name)) for name in list(extra) if name in GUIDED]
    structured = extra.pop("structured_outputs", None)
    if structured is not None:
        if not isinstance(structured, dict) or not structured.keys() <= {*GUIDED.values(), "json_object"}:
            raise ValueError('structured_outputs is {"json": schema}, {"regex": ...}, {"choice": [...]}, {"grammar": ...} or '
                             '{"json_object": true}')
        guided += [("json", {"type": "object"}) if key == "json_object" else (key, value) for key, value in structured.items()
                   if value is not None and value is not False]
    if len(guided) > 1 or (guided and extra.keys() & set(CONSTRAINTS)):
        raise ValueError("one constraint a request: one of json_schema, regex and grammar, or vLLM's guided_json, guided_regex, "
                         "guided_choice, guided_grammar or structured_outputs")
    for key, value in guided:
        if key == "choice":
            if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
                raise ValueError("guided_choice (structured_outputs.choice) is a non-empty list of texts")
            key, value = "regex", "(?:" + "|".join(re.escape(c) for c in value) + ")"  # Python's escapes are llguidance's too
        extra[{"json": "json_schema"}.get(key, key)] = value


def _response_format(value: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's response_format as onnxgen's options: text is free, json_object any JSON object, json_schema
    {"json_schema": {"name": ..., "schema": {...}}} JSON that its schema allows (guidance.py)."""
    kind = (value or {}).get("type", "text")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    schema = (value or {}).get("json_schema")
    if kind != "json_schema" or not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
        raise ValueError('response_format is {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                         '"json_schema": {"name": ..., "schema": {...}}}')
    return {"json_schema": schema["schema"]}


def _finish(reason: str | None, calls: ToolChoice | None = None, called: bool = False) -> str | None:
    """OpenAI's finish reasons: "length", "stop", and "tool_calls" where a "required" reply ends whole, or an "auto"
    one that made calls (`called`) ends (a named function's call ends with "stop", as OpenAI's does)."""
    if reason is None:
        return None
    if reason in ("length", "time"):
        return "length"
    required = calls is not None and calls.schema is not None and calls.named is None
    if (required and reason == "eos") or (called and reason in ("eos", "stop")):
        return "tool_calls"
    return "stop"


def _parsed(news: list[tuple[str, ...]], before: int) -> dict[str, Any]:
    """A chat delta of what an "auto" reply's reader found in a piece (tools.py's HermesCalls): its content, and each
    call whole (the calls before it in the reply: `before`)."""
    delta: dict[str, Any] = {}
    content = "".join(item[1] for item in news if item[0] == "content")
    if content:
        delta["content"] = content
    found = [item for item in news if item[0] == "call"]
    if found:
        delta["tool_calls"] = [{"index": before + i, "id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
                               for i, (_, name, arguments) in enumerate(found)]
    return delta


def _message(text: str, calls: ToolChoice) -> dict[str, Any]:
    """A chat reply's message: its text, or the calls it makes (tools.py; arguments as far as they were written); an
    "auto" reply's, the text outside its calls (None if none) and the calls."""
    if calls.auto is not None:
        content, found = HermesCalls(calls.auto, calls.parallel).whole(text)
        return {"role": "assistant", "content": content or None, **({"tool_calls": _calls(found)} if found else {})}
    if calls.schema is None:
        return {"role": "assistant", "content": text}
    reader = ToolCalls(calls.named)
    reader.push(text)
    return {"role": "assistant", "content": None, "tool_calls": _calls([(c.name, c.arguments) for c in reader.calls])}


def _calls(found: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """OpenAI's tool_calls of a message: (name, arguments as JSON text) each, with an id."""
    return [{"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}} for name, arguments in found]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"  # OpenAI's shape; a client sends it back with the call's result


def _logprobs(model: Model, source: Event | Completion, offset: int, echo: bool = False) -> dict[str, Any] | None:
    """OpenAI's completions logprobs of a completion, or of a streamed token; `offset`: where its text starts in the
    choice's text (sent so far). Token healing: a completion's first token re-covers the prompt's end; it starts
    there where the prompt is echoed (`echo`), else where the text does."""
    scored = _scored(source)
    healed = len(source.healed) if isinstance(source, Completion) else 0
    return None if scored is None else _logprobs_object(model, *scored, offset - healed if echo else offset, 0 if echo else healed)


def _scored(source: Event | Completion) -> tuple[list[int], list[float], list[dict[int, float]]] | None:
    """The tokens of a completion or a streamed token, their log-probabilities and alternatives (None: not asked),
    as JSON holds them (generator.for_json)."""
    if isinstance(source, Event):
        ids, logprobs, alternatives = [source.token_id], [source.logprob], [source.top_logprobs or {}]
    else:
        ids, logprobs, alternatives = source.token_ids, source.logprobs, source.top_logprobs or []
    if logprobs is None or None in logprobs:
        return None
    return ids, *for_json(logprobs, alternatives)  # type: ignore[arg-type]


def _logprobs_object(model: Model, ids: list[int], logprobs: list[float | None], alternatives: list[dict[int, float] | None],
                     offset: int, after: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object: each token's text, where it starts, its log-probability and its alternatives (None
    for a token that has none: a prompt's first); `after`: characters of the tokens' text before the choice's."""
    return {**_tokens(model, ids, offset, after), "token_logprobs": logprobs,
            "top_logprobs": [None if alts is None else _by_text(model, alts, (t, lp)) for t, lp, alts in zip(ids, logprobs, alternatives)]}


def _tokens(model: Model, ids: list[int], offset: int, after: int = 0) -> dict[str, list[Any]]:
    """OpenAI's logprobs "tokens" (each token's text) and "text_offset" (where each starts in the choice's text)."""
    tokens, offsets, stream = [], [], TextStream(model.tokenizer, after)
    for token in ids:
        offsets.append(offset + len(stream.text))
        tokens.append(model.tokenizer.decode([token]))
        stream.push(token)
    return {"tokens": tokens, "text_offset": offsets}


def _by_text(model: Model, alternatives: dict[int, float], chosen: tuple[int, float]) -> dict[str, float]:
    """OpenAI's completions alternatives: the most likely tokens, then the chosen one where it is not among them
    ("up to logprobs+1 elements", as vLLM gives them too), keyed by token text (two byte-level tokens can share one)."""
    by_text = {model.tokenizer.decode([t]): lp for t, lp in alternatives.items()}
    if chosen[0] not in alternatives:
        by_text.setdefault(model.tokenizer.decode([chosen[0]]), chosen[1])
    return by_text


def _prompt_logprobs(model: Model, prompts: list[list[int]], top: int, adapter: str | None) -> list[dict[str, Any]]:
    """echo with logprobs: each prompt token's log-probability given the tokens before it (the first has none),
    and the `top` most likely tokens there, as OpenAI's logprobs object (Model.score: one pass at a time)."""
    return [_logprobs_object(model, s.token_ids, s.logprobs, s.top_logprobs, 0) for s in model.score(prompts, top, adapter=adapter)]


def _choice(model: Model, body: CompletionRequest, prompts: list[list[int]], c: Completion, index: int,
            echoed: list[dict[str, Any]] | None) -> dict[str, Any]:
    prefix = model.tokenizer.decode(prompts[c.prompt_index]) if body.echo else ""
    logprobs = _logprobs(model, c, len(prefix), body.echo)
    if echoed is not None and logprobs is not None:  # the prompt's entries, then the completion's
        logprobs = {key: _echoed(echoed[c.prompt_index], bool(c.healed))[key] + logprobs[key] for key in logprobs}
    return {"text": prefix + c.text, "index": index, "logprobs": logprobs, "finish_reason": _finish(c.finish_reason)}


def _echoed(entries: dict[str, Any], healed: bool) -> dict[str, Any]:
    """A prompt's logprobs entries as echoed: with token healing, the first new token takes its last token's place."""
    return {key: values[:-1] for key, values in entries.items()} if healed else entries


def _usage(prompts: list[list[int]], done: list[Completion]) -> dict[str, int]:
    prompt_tokens, completion_tokens = sum(len(p) for p in prompts), sum(len(c.token_ids) for c in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _streamed(job: Job, channel: asyncio.Queue[tuple[str, Any]], request: Request, head: dict[str, Any],
              piece: Callable[[int, str, Event | Completion], dict[str, Any]], opening: list[dict[str, Any]],
              body: OpenAIRequest, prompts: list[list[int]]) -> StreamingResponse:
    """The reply as server-sent events (_stream), with the usage where the request asks for it."""
    usage = prompts if (body.stream_options or {}).get("include_usage") else None
    return StreamingResponse(_stream(job, channel, request, head, piece, opening, usage), media_type="text/event-stream")


async def _stream(job: Job, channel: asyncio.Queue[tuple[str, Any]], request: Request, head: dict[str, Any],
                  piece: Callable[[int, str, Event | Completion], dict[str, Any]], opening: list[dict[str, Any]],
                  usage: list[list[int]] | None) -> AsyncIterator[str]:
    """Server-sent events: the `opening` choices (an echo, a chat's role), a chunk per new piece of text, a last
    chunk per choice, the usage where asked (the prompts), then [DONE]. `head` and `piece` give the chunks' shape."""
    def data(payload: dict[str, Any]) -> str:
        return "data: " + json.dumps(payload) + "\n\n"

    for choice in opening:
        yield data({**head, "choices": [choice]})
    async for kind, value in news(job, channel, request):
        if kind == "event":
            row, event = value
            yield data({**head, "choices": [piece(row, event.text, event)]})
        elif kind == "error":
            yield data({"error": told(value)})
        else:
            done, _ = value
            if job.options.num_beams > 1:  # beam search streams nothing until it ends: each choice whole
                for i, c in enumerate(done):
                    yield data({**head, "choices": [piece(i, c.text, c)]})
            if usage is not None:
                yield data({**head, "choices": [], "usage": _usage(usage, done)})
            yield "data: [DONE]\n\n"


async def news(job: Job, channel: asyncio.Queue[tuple[str, Any]], request: Request) -> AsyncIterator[tuple[str, Any]]:
    """A streamed job's news as they come: ("event", (row, Event)) each, then ("done", ...) or ("error", ...). A client
    that goes away (asked each second without news) ends the job's rows; so does one that stops reading."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(channel.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield kind, value
            if kind != "event":
                return
    finally:
        job.cancelled.set()  # a finished job is unaffected



def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's message as chat templates take it: content parts ([{"type": "text", "text": ...}, ...], which clients
    send for text too) as one text, the parts a line each; a tool call's arguments (JSON text in OpenAI's messages) as
    the object templates read, as vLLM gives them; other content as it is, for the template to take or refuse."""
    parts = message.get("content")
    if isinstance(parts, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        message = {**message, "content": "\n".join(p["text"] for p in parts)}
    if isinstance(message.get("tool_calls"), list):
        message = {**message, "tool_calls": [_arguments_read(call) for call in message["tool_calls"]]}
    return message


def _arguments_read(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
    except ValueError:
        raise ValueError(f"a tool call's arguments are not JSON: {function['arguments'][:80]!r}") from None


def _chat_logprobs(model: Model, source: Event | Completion) -> dict[str, Any] | None:
    """OpenAI's chat logprobs: per token its text, log-probability, UTF-8 bytes and the most likely alternatives."""
    scored = _scored(source)
    if scored is None:
        return None
    tokens, logprobs, alternatives = scored

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = model.tokenizer.decode([token], clean=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts.items()]}
                        for t, lp, alts in zip(tokens, logprobs, alternatives)]}
