"""Load on `onnxgen serve`: concurrent streaming clients against one server process.

    python benchmarks/serve_load.py onnxgen/bundled/prose-mini benchmarks/exports/gpt2/int8 --clients 1 4 16
    python benchmarks/serve_load.py FOLDER --baseline /tmp/w/base --max-tokens 8 32 128   # against another checkout

Starts `onnxgen serve` for each folder, then for each client count runs that many asyncio + httpx clients,
each sending its share of --requests streaming completions one after another (sampled, eos-free so that
every request makes its max_tokens; request i asks for the i-th of --max-tokens, cycling). Reports
throughput (completion tokens per second over the run), time to first token p50/p99 (request sent to the
first text chunk), errors (must be 0), and the server's RSS after the warm-up and after each run; the
largest client count runs twice, so that growth from the first large batches (onnxruntime's arena) is told
apart from a leak: the last two must match. Also times --clients' largest count of requests sent one after
another against the same count sent at once: the speed-up that batching buys. --rates: open-loop runs, requests
arriving at random (exponential gaps, one seeded schedule) at that many a second whatever the server does, as
a service's users send them: closed-loop clients fall into step with a server's batches, which hides what a
request that arrives mid-batch waits.
Stall: the gap between one piece of a stream's text and its next, p99 and largest (what a running stream
waits while another request's prompt is written; --long-prompt N makes every --long-every-th prompt N
tokens long).
--baseline DIR / --baseline-args "...": a second server, from another onnxgen checkout (a git worktree of an
earlier commit) or from this one with other `onnxgen serve` options, runs beside this one, the two taking
the same runs in turns, so that the ratio is measured on the same machine state.
    python benchmarks/serve_load.py FOLDER --baseline-args "--prefill-chunk 100000" --long-prompt 600 --rates 2
--beams N: every request is beam search with N beams (the text of each comes whole at its end).
--seeded-every N: every Nth request sends a seed (1: all; clients that want reproducible text), which decides whether
it can share steps (on int8 and CUDA it runs apart); with a mix, the unseeded requests' time to first token is
reported apart too (what a request that could share waits behind those that cannot).
Results: benchmarks/results/serve.{json,md} (--out, --name).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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


def prompt(i: int, long_tokens: int, long_every: int) -> str | list[int]:
    """Request i's prompt: one of PROMPTS, or every long_every-th request long_tokens token ids (below 5,100:
    inside every vocabulary here)."""
    if long_every and i % long_every == long_every - 1:
        return [100 + (i * 7919 + k * 104729) % 5000 for k in range(long_tokens)]
    return PROMPTS[i % len(PROMPTS)]


async def one(http: httpx.AsyncClient, i: int, max_tokens: int, text: str | list[int], seeded: bool, beams: int = 1) -> tuple[float, int, list[float]]:
    """(time to first token, completion tokens, the gaps between its pieces of text) of one streaming request
    (with `seeded`, seed i; with `beams` > 1, beam search, whose text comes whole at its end); raises on any error."""
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}, "eos_token_id": None, **({"seed": i} if seeded else {}),
            **({"num_beams": beams} if beams > 1 else {})}
    start, first, tokens, gaps, last = time.perf_counter(), None, 0, [], 0.0
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
            if any(c["text"] for c in chunk["choices"]):
                now = time.perf_counter()
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)
                last = now
    return (first if first is not None else time.perf_counter() - start), tokens, gaps


async def load(base: str, clients: int, requests: int, max_tokens: list[int], rate: float | None = None,
               long_tokens: int = 0, long_every: int = 0, seeded_every: int = 0, beams: int = 1) -> dict[str, Any]:
    """`clients` clients sending requests one after another (closed loop), or with `rate`, requests arriving
    at that many a second on average (open loop: exponential gaps, the same seeded schedule for every server)."""
    ttft: list[float] = []
    ttft_plain: list[float] = []  # of the unseeded requests, with a mix
    latency: list[float] = []
    gaps: list[float] = []  # between one piece of a stream's text and the next: how long a running stream stalls
    errors, tokens = 0, 0

    async def request(http: httpx.AsyncClient, i: int) -> None:
        nonlocal errors, tokens
        sent = time.perf_counter()
        try:
            seeded = seeded_every > 0 and i % seeded_every == 0
            first, n, pauses = await one(http, i, max_tokens[i % len(max_tokens)], prompt(i, long_tokens, long_every), seeded, beams)
            ttft.append(first)
            if not seeded:
                ttft_plain.append(first)
            gaps.extend(pauses)
            latency.append(time.perf_counter() - sent)
            tokens += n
        except Exception:  # counted, and the run goes on: errors must be 0
            errors += 1

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=300) as http:
            for i in range(c, requests, clients):
                await request(http, i)

    async def arrivals(rate: float) -> None:
        gaps = random.Random(0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
            tasks = []
            for i in range(requests):
                tasks.append(asyncio.create_task(request(http, i)))
                await asyncio.sleep(gaps.expovariate(rate))
            await asyncio.gather(*tasks)

    start = time.perf_counter()
    if rate is None:
        await asyncio.gather(*(client(c) for c in range(clients)))
    else:
        await arrivals(rate)
    elapsed = time.perf_counter() - start

    def q(values: list[float], at: int) -> float:  # NaN for none (beam search's text comes in one piece: no gaps)
        if not values:
            return float("nan")
        return (statistics.quantiles(values, n=100)[at - 1] if len(values) > 1 else values[0]) * 1000

    return {"clients": clients if rate is None else None, "rate": rate, "requests": requests, "errors": errors,
            "tokens_per_s": tokens / elapsed, "ttft_p50_ms": q(ttft, 50), "ttft_p99_ms": q(ttft, 99),
            "latency_p50_ms": q(latency, 50), "latency_p99_ms": q(latency, 99), "gap_p99_ms": q(gaps, 99),
            "gap_max_ms": max(gaps, default=0.0) * 1000, "seconds": elapsed,
            **({"ttft_unseeded_p50_ms": q(ttft_plain, 50), "ttft_unseeded_p99_ms": q(ttft_plain, 99)} if seeded_every > 1 and ttft_plain else {})}


def serve(folder: Path, port: int, threads: int, max_batch: int, source: Path | None, extra: list[str]) -> subprocess.Popen[bytes]:
    """`onnxgen serve` from this checkout, or from `source` (another checkout's onnxgen: run from there, since
    `python -m` puts the working directory ahead of PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    proc = subprocess.Popen([sys.executable, "-m", "onnxgen", "serve", "--model", str(folder.resolve()), "--port", str(port),
                             "--threads", str(threads), "--max-batch", str(max_batch), *extra], stderr=subprocess.DEVNULL, env=env,
                            cwd=source or HERE.parent)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"onnxgen serve did not start for {folder}")


def load_name(run: dict[str, Any]) -> str:
    return f"{run['rate']:g} requests/s" if run.get("rate") else f"{run['clients']} clients"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=1000, help="requests per client count, for the RSS check")
    ap.add_argument("--rates", nargs="*", type=float, default=[], help="also: open-loop runs at these requests per second")
    ap.add_argument("--max-tokens", nargs="+", type=int, default=[32], help="request i asks for the i-th, cycling")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--long-prompt", type=int, default=0, help="every --long-every-th request sends this many tokens")
    ap.add_argument("--long-every", type=int, default=4)
    ap.add_argument("--seeded-every", type=int, default=0, help="every Nth request sends a seed (its index), as clients that want "
                    "reproducible text do (1: every request)")
    ap.add_argument("--beams", type=int, default=1, help="every request asks for beam search with this many beams (temperature 0)")
    ap.add_argument("--server-args", default="", help="more `onnxgen serve` options for this checkout's server")
    ap.add_argument("--baseline", type=Path, help="another onnxgen checkout, served beside this one, in turns")
    ap.add_argument("--baseline-args", help="`onnxgen serve` options of a baseline server (from this checkout unless --baseline)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="serve", help="results file stem")
    args = ap.parse_args()
    servers: dict[str, tuple[Path | None, list[str]]] = {"this": (None, args.server_args.split())}
    if args.baseline or args.baseline_args is not None:
        servers["baseline"] = (args.baseline.resolve() if args.baseline else None, (args.baseline_args or "").split())
    long = {"long_tokens": args.long_prompt, "long_every": args.long_every if args.long_prompt else 0, "seeded_every": args.seeded_every,
            "beams": args.beams}
    results = []
    for folder in args.folders:
        procs, bases = {}, {}
        try:
            for label, (source, extra) in servers.items():
                port = free_port()
                procs[label] = serve(folder, port, args.threads, args.max_batch, source, extra)
                bases[label] = f"http://127.0.0.1:{port}"
            rss: dict[str, list[float]] = {label: [] for label in servers}
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
            for label in servers:
                asyncio.run(load(bases[label], 1, 8, args.max_tokens))  # warm-up
                rss[label].append(rss_mb(procs[label].pid))
            for clients in [*args.clients, max(args.clients)]:
                for label in servers:  # in turns: the servers see the same machine state
                    runs[label].append(asyncio.run(load(bases[label], clients, args.requests, args.max_tokens, **long)))
                    rss[label].append(rss_mb(procs[label].pid))
            for rate in args.rates:
                for label in servers:
                    runs[label].append(asyncio.run(load(bases[label], 0, args.requests, args.max_tokens, rate, **long)))
            n = max(args.clients)
            speedup = {}
            for label in servers:
                sequential = asyncio.run(load(bases[label], 1, n, args.max_tokens, seeded_every=args.seeded_every, beams=args.beams))
                together = asyncio.run(load(bases[label], n, n, args.max_tokens, seeded_every=args.seeded_every, beams=args.beams))
                speedup[label] = {"requests": n, "sequential_s": sequential["seconds"], "concurrent_s": together["seconds"],
                                  "ratio": sequential["seconds"] / together["seconds"]}
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
        for label, (source, extra) in servers.items():
            results.append({"folder": str(folder), "server": label, "source": str(source or "."), "args": " ".join(extra), "runs": runs[label],
                            "rss_mb": rss[label], "speedup": speedup[label]})
            print(json.dumps(results[-1]), flush=True)
    report = {"max_tokens": args.max_tokens, "threads": args.threads, "max_batch": args.max_batch, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lengths = ", ".join(map(str, args.max_tokens))
    lines = [f"`onnxgen serve`, {args.threads} onnxruntime threads, max batch {args.max_batch}; streaming, sampled, "
             f"max_tokens {lengths} (request by request, cycling); {args.requests} requests per row" + (f"; every {args.seeded_every}th request seeded" if args.seeded_every else "")
             + (f"; beam search, {args.beams} beams (a request's text comes at its end: first token = the whole request)" if args.beams > 1 else "")
             + (f"; every {args.long_every}th request a {args.long_prompt}-token prompt." if args.long_prompt else "."), "",
             "| model | server | load | tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | stall p99 ms | stall max ms | errors |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for run in r["runs"]:
            lines.append(f"| {Path(r['folder']).name} | {r['server']} | {load_name(run)} | {run['tokens_per_s']:,.0f} | "
                         f"{run['ttft_p50_ms']:.0f} | {run['ttft_p99_ms']:.0f} | {run['latency_p50_ms']:,.0f} | "
                         f"{run['latency_p99_ms']:,.0f} | {run['gap_p99_ms']:,.0f} | {run['gap_max_ms']:,.0f} | {run['errors']} |")
    lines.append("")
    for r in results:
        s = r["speedup"]
        lines.append(f"- {Path(r['folder']).name}, {r['server']} ({r['source']} {r['args']}): server RSS (MiB) after the warm-up and after each run: "
                     f"{', '.join(f'{m:.0f}' for m in r['rss_mb'])} ({len(r['runs']) * args.requests} requests); {s['requests']} requests "
                     f"at once {s['ratio']:.2f}x faster than one after another ({s['sequential_s']:.2f} s -> {s['concurrent_s']:.2f} s)")
    if "baseline" in servers:
        lines.append("")
        for folder in args.folders:
            pair = {r["server"]: r for r in results if r["folder"] == str(folder)}
            ratios = [f"{load_name(this)} {this['tokens_per_s'] / base['tokens_per_s']:.2f}x tok/s, TTFT p50 "
                      f"{base['ttft_p50_ms']:.0f} -> {this['ttft_p50_ms']:.0f} ms, latency p99 {base['latency_p99_ms']:,.0f} -> "
                      f"{this['latency_p99_ms']:,.0f} ms"
                      + (f", unseeded TTFT p50 {base['ttft_unseeded_p50_ms']:.0f} -> {this['ttft_unseeded_p50_ms']:.0f} ms, p99 "
                         f"{base['ttft_unseeded_p99_ms']:.0f} -> {this['ttft_unseeded_p99_ms']:.0f} ms" if "ttft_unseeded_p99_ms" in this else "")
                      for this, base in zip(pair["this"]["runs"], pair["baseline"]["runs"])]
            lines.append(f"- {folder.name}, this against the baseline: " + "; ".join(ratios))
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
