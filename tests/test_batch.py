"""`onnxgen run-batch` (onnxgen/batch.py): OpenAI Batch API files answered in-process, each response what the HTTP API
answers, in the input's order; a bad file refused before anything runs, and no output left half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import onnxgen
from onnxgen.batch import read, run
from onnxgen.errors import OnnxgenError
from onnxgen.serve import Limits

GREEDY = {"temperature": 0, "max_tokens": 8}
PROMPTS = ["It is a truth", "Call me", "The city of", "Once upon a time", "It"]


def _write(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def _requests() -> list[dict[str, Any]]:
    """Greedy completions of several lengths, a seeded one of two prompts with n 2, a chat and a response (refused: the
    model has no template), one the options refuse, and one naming another model."""
    entries: list[dict[str, Any]] = [{"custom_id": f"greedy-{i}", "method": "POST", "url": "/v1/completions",
                                      "body": {"prompt": p, **GREEDY, "max_tokens": 4 + 3 * i}} for i, p in enumerate(PROMPTS)]
    entries += [
        {"custom_id": "seeded", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": ["One", "Two"], "max_tokens": 6, "n": 2, "seed": 3, "temperature": 0.8}},
        {"custom_id": "chat", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "Hi"}]}},
        {"custom_id": "response", "url": "/v1/responses", "body": {"input": "Hi"}},
        {"custom_id": "bad-option", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi", "top_p": 3}},
        {"custom_id": "other-model", "method": "POST", "url": "/v1/completions", "body": {"model": "gpt-4o", "prompt": "Hi"}},
    ]
    return entries


def test_each_response_is_what_the_api_answers_in_the_inputs_order(exported: Path, tmp_path: Path) -> None:
    model = onnxgen.load(exported, threads=1)
    source = _write(tmp_path / "requests.jsonl", _requests())
    counts = run(model, read(source), tmp_path / "out.jsonl", "tiny", Limits(max_batch=4), quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [e["custom_id"] for e in _requests()]
    assert all(line["id"].startswith("batch_req_") and line["error"] is None for line in lines)
    status = {line["custom_id"]: line["response"]["status_code"] for line in lines}
    assert [status[name] for name in ("chat", "response", "bad-option", "other-model")] == [400, 400, 400, 404]
    body = {line["custom_id"]: line["response"]["body"] for line in lines}
    assert all("has no chat template" in body[name]["error"]["message"] for name in ("chat", "response"))
    assert body["bad-option"]["error"]["param"] == "top_p"
    for i, prompt in enumerate(PROMPTS):
        expected = model.generate(prompt, max_new_tokens=4 + 3 * i, do_sample=False)[0]
        assert body[f"greedy-{i}"]["choices"][0]["text"] == expected.text
    seeded = model.generate(["One", "Two"], max_new_tokens=6, do_sample=True, temperature=0.8, top_k=0, seed=3, num_return_sequences=2)
    assert [c["text"] for c in body["seeded"]["choices"]] == [c.text for c in seeded]
    assert counts["requests"] == 10 and counts["failed"] == 4
    assert counts["completion_tokens"] == sum(b["usage"]["completion_tokens"] for b in body.values() if "usage" in b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "requests.jsonl"]  # no partial file left beside it


@pytest.mark.parametrize(("entry", "message"), [
    ("not json", "line 2 is not JSON"),
    ({"custom_id": 3, "url": "/v1/completions", "body": {}}, "line 2 is not a request"),
    ({"custom_id": "x", "url": "/v1/embeddings", "body": {}}, "line 2: a request is a POST to /v1/completions, /v1/chat/completions, /v1/responses, got POST /v1/embeddings"),
    ({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}}, "got GET /v1/completions"),
    ({"custom_id": "x", "url": "/v1/completions", "body": {"prompt": "a", "stream": True}}, "line 2: a batch's requests are not streamed"),
    ({"custom_id": "greedy-0", "url": "/v1/completions", "body": {"prompt": "a"}}, "line 2: custom_id 'greedy-0' again"),
])
def test_a_file_that_is_not_a_batch_is_refused_by_line(tmp_path: Path, entry: Any, message: str) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(_requests()[0]) + "\n" + (entry if isinstance(entry, str) else json.dumps(entry)) + "\n")
    with pytest.raises(OnnxgenError, match=message):
        read(path)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(OnnxgenError, match="holds no request"):
        read(tmp_path / "blank.jsonl")


def test_a_run_that_fails_leaves_no_output(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    model = onnxgen.load(exported, threads=1)
    requests = read(_write(tmp_path / "requests.jsonl", _requests()))
    sent = 0
    post = httpx.AsyncClient.post

    async def failing(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> httpx.Response:
        nonlocal sent
        sent += 1
        if sent == 6:
            raise OSError(28, "No space left on device")  # with five answers written
        return await post(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "post", failing)
    with pytest.raises(OSError, match="No space left"):
        run(model, requests, tmp_path / "out.jsonl", "tiny", Limits(max_queue=1), quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["requests.jsonl"]


def test_the_command(exported: Path, tmp_path: Path) -> None:
    """A file in, a file out and the summary on stdout; standard input to standard output (the summary on stderr);
    an output that exists is refused before the model loads, unless --force; a bad file is one line of error."""
    source = _write(tmp_path / "requests.jsonl", _requests()[:3])
    command = [sys.executable, "-m", "onnxgen", "run-batch", "--model", str(exported), "--threads", "1"]
    done = subprocess.run([*command, "-i", str(source), "-o", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("answered 3 requests (0 refused or failed) in ") and "completion tokens" in done.stdout
    piped = subprocess.run([*command, "-i", "-", "-o", "-", "--json"], input=source.read_text(), capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    texts = [[json.loads(line)["response"]["body"]["choices"][0]["text"] for line in out.splitlines()]
             for out in (piped.stdout, (tmp_path / "out.jsonl").read_text())]
    assert texts[0] == texts[1] and len(texts[0]) == 3
    assert json.loads(piped.stderr.strip().splitlines()[-1])["requests"] == 3
    again = subprocess.run([*command, "-i", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", "/nowhere"], capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"onnxgen: error: {tmp_path / 'out.jsonl'} already exists (use --force to replace it)"]
    forced = subprocess.run([*command, "-i", str(source), "-o", str(tmp_path / "out.jsonl"), "--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    bad = subprocess.run([*command, "-i", "-", "-o", str(tmp_path / "bad.jsonl")], input="{}\n", capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        'onnxgen: error: line 1 is not a request: {"custom_id": str, "method": "POST", "url": ..., "body": {...}}']
    assert not (tmp_path / "bad.jsonl").exists()
