"""`onnxgen run-batch`: a file of OpenAI Batch API requests answered in-process, as vLLM's `run-batch` does.

Each line of the input is {"custom_id": ..., "method": "POST", "url": "/v1/completions", "/v1/chat/completions" or
"/v1/responses", "body": {...}}; the body goes to that endpoint of the serve app (serve.py, over no network), every request at once into
its continuous batcher (as many waiting as its queue holds), and each answer becomes a line of the output, in the
input's order: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}, the body what
the HTTP API would have answered (a refused request's too: its 4xx and OpenAI's error object).

The whole file is checked before any request runs (a line that is not a request is an error naming it, and nothing
is written); the output is written beside its place and renamed into it once complete.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .errors import OnnxgenError
from .model import Model

URLS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


@dataclass(frozen=True)
class Request:
    custom_id: str
    url: str
    body: dict[str, Any]


def read(source: str | Path) -> list[Request]:
    """A batch file's requests ("-": standard input's), checked: each non-blank line one, its custom_id unique; an
    OnnxgenError names the first line that is not one."""
    try:
        lines = sys.stdin.read().splitlines() if str(source) == "-" else Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OnnxgenError(f"cannot read {source}: {getattr(e, 'strerror', None) or e}") from None
    requests, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise OnnxgenError(f"line {number} is not JSON: {e}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("custom_id"), str) or not isinstance(entry.get("body"), dict):
            raise OnnxgenError(f'line {number} is not a request: {{"custom_id": str, "method": "POST", "url": ..., "body": {{...}}}}')
        if entry.get("method", "POST") != "POST" or entry.get("url") not in URLS:
            raise OnnxgenError(f"line {number}: a request is a POST to {', '.join(URLS)}, got {entry.get('method', 'POST')} {entry.get('url')}")
        if entry["body"].get("stream"):
            raise OnnxgenError(f"line {number}: a batch's requests are not streamed (stream true)")
        if entry["custom_id"] in seen:
            raise OnnxgenError(f"line {number}: custom_id {entry['custom_id']!r} again (each request's is its own)")
        seen.add(entry["custom_id"])
        requests.append(Request(entry["custom_id"], entry["url"], entry["body"]))
    if not requests:
        raise OnnxgenError("the batch file holds no request")
    return requests


async def _answers(app: Any, requests: list[Request], in_flight: int, write: Callable[[str], None],
                   progress: Callable[[int, int], None]) -> dict[str, int]:
    """Every request sent to the app, at most `in_flight` at a time; each answer written as its line, in order."""
    import httpx

    gate, done = asyncio.Semaphore(in_flight), 0
    counts = {"requests": len(requests), "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}

    async def answer(client: httpx.AsyncClient, request: Request) -> dict[str, Any]:
        nonlocal done
        async with gate:
            response = await client.post(request.url, json=request.body)
        done += 1
        progress(done, len(requests))
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id, "response": {
            "status_code": response.status_code, "request_id": uuid.uuid4().hex, "body": response.json()}, "error": None}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://onnxgen", timeout=None) as client:
        tasks = [asyncio.create_task(answer(client, request)) for request in requests]
        try:
            for task in tasks:  # in the input's order; later answers wait in their tasks
                line = await task
                response = line["response"]
                counts["failed"] += response["status_code"] != 200
                usage = response["body"].get("usage") or {}
                counts["prompt_tokens"] += usage.get("prompt_tokens", 0)
                counts["completion_tokens"] += usage.get("completion_tokens", 0)
                write(json.dumps(line, ensure_ascii=False) + "\n")
        finally:  # a failure (a full disk, Ctrl-C) stops the requests not yet answered, before the client closes
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return counts


def run(model: Model, requests: list[Request], output: str | Path, name: str, limits: Any = None, force: bool = False,
        quiet: bool = False, tool_call_parser: str | None = None, watermark_key: int | None = None) -> dict[str, Any]:
    """Answer `requests` (read's) into `output` ("-": standard output) with `model`, served as `name` (what the
    requests' "model" may say; `tool_call_parser` and `watermark_key`: serve's); returns the counts: requests, failed
    (not 200), tokens, seconds."""
    from .progress import counter
    from .serve import Limits, create_app

    limits = limits or Limits()
    # nothing kept for previous_response_id: a file's requests run together, in no order one could refer back along
    app = create_app(model, name, limits=limits, stored_responses=0, tool_call_parser=tool_call_parser, watermark_key=watermark_key)
    start = time.perf_counter()
    with counter("Requests", quiet) as progress:
        if str(output) == "-":
            counts = asyncio.run(_answers(app, requests, limits.max_queue, sys.stdout.write, progress))
        else:
            out = Path(output)
            atomic.check_destination(out, force)  # said before the model loads by the CLI too; here for the API
            partial = out.resolve().parent / f"{atomic.scratch_prefix(out, 'partial')}batch"
            try:
                with partial.open("w", encoding="utf-8") as file:
                    counts = asyncio.run(_answers(app, requests, limits.max_queue, file.write, progress))
                os.replace(partial, out)
            finally:
                partial.unlink(missing_ok=True)
    return {**counts, "seconds": round(time.perf_counter() - start, 3)}
