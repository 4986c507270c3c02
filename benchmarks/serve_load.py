"""Load on `onnxgen serve`: concurrent streaming clients against one server process.

    python benchmarks/serve_load.py onnxgen/bundled/prose-mini benchmarks/exports/gpt2/int8 --clients 1 4 16

Starts `onnxgen serve` for each folder, then for each client count runs that many asyncio + httpx clients,
each sending its share of --requests streaming completions one after another (sampled, 32 tokens, an
eos-free length so every request does the same work). Reports throughput (completion tokens per second
over the run), time to first token p50/p99 (request sent to the first text chunk), errors (must be 0),
and the server's RSS after the warm-up and after each run; the largest client count runs twice, so that
growth from the first large batches (onnxruntime's arena) is told apart from a leak: the last two must match. Also times --clients' largest count of
requests sent one after another against the same count sent at once: the speed-up that batching buys.
Results: benchmarks/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
PROMPTS = ["It is a truth universally acknowledged", "Call me Ishmael.", "The city of", "Once upon a time", "In the beginning"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(http: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streaming request; raises on any error."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}, "eos_token_id": None}
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def load(base: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    ttft: list[float] = []
    errors, tokens = 0, 0

    async def client(c: int) -> None:
        nonlocal errors, tokens
        async with httpx.AsyncClient(base_url=base, timeout=300) as http:
            for i in range(c, requests, clients):
                try:
                    first, n = await one(http, i, max_tokens)
                    ttft.append(first)
                    tokens += n
                except Exception:  # counted, and the run goes on: errors must be 0
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(ttft, n=100) if len(ttft) > 1 else ttft * 99
    return {"clients": clients, "requests": requests, "errors": errors, "tokens_per_s": tokens / elapsed,
            "ttft_p50_ms": statistics.median(ttft) * 1000, "ttft_p99_ms": q[98] * 1000, "seconds": elapsed}


def serve(folder: Path, port: int, threads: int, max_batch: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "onnxgen", "serve", "--model", str(folder), "--port", str(port),
                             "--threads", str(threads), "--max-batch", str(max_batch)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"onnxgen serve did not start for {folder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=1000, help="requests per client count, for the RSS check")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    results = []
    for folder in args.folders:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = serve(folder, port, args.threads, args.max_batch)
        base = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(load(base, 1, 8, args.max_tokens))  # warm-up
            rss = [rss_mb(proc.pid)]
            runs = []
            for clients in [*args.clients, max(args.clients)]:
                runs.append(asyncio.run(load(base, clients, args.requests, args.max_tokens)))
                rss.append(rss_mb(proc.pid))
            n = max(args.clients)
            sequential = asyncio.run(load(base, 1, n, args.max_tokens))
            together = asyncio.run(load(base, n, n, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results.append({"folder": str(folder), "runs": runs, "rss_mb": rss,
                        "speedup": {"requests": n, "sequential_s": sequential["seconds"], "concurrent_s": together["seconds"],
                                    "ratio": sequential["seconds"] / together["seconds"]}})
        print(json.dumps(results[-1]), flush=True)
    report = {"max_tokens": args.max_tokens, "threads": args.threads, "max_batch": args.max_batch, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`onnxgen serve`, {args.threads} onnxruntime threads, max batch {args.max_batch}; streaming, sampled, "
             f"{args.max_tokens} tokens a request; {args.requests} requests per row.", "",
             "| model | clients | tok/s | TTFT p50 ms | TTFT p99 ms | errors |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for run in r["runs"]:
            lines.append(f"| {Path(r['folder']).name} | {run['clients']} | {run['tokens_per_s']:,.0f} | {run['ttft_p50_ms']:.0f} | "
                         f"{run['ttft_p99_ms']:.0f} | {run['errors']} |")
    lines.append("")
    for r in results:
        s = r["speedup"]
        lines.append(f"- {Path(r['folder']).name}: server RSS (MiB) after the warm-up and after each run: "
                     f"{', '.join(f'{m:.0f}' for m in r['rss_mb'])} ({len(r['runs']) * args.requests} requests); {s['requests']} requests "
                     f"at once {s['ratio']:.2f}x faster than one after another ({s['sequential_s']:.2f} s -> {s['concurrent_s']:.2f} s)")
    (args.out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
