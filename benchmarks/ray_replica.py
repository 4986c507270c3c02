"""One Ray Serve replica under concurrent clients: requests a replica takes at once, Ray's default (5) against
onnxgen's (its batcher's rows, max_batch), in turns on one local Ray cluster.

    python benchmarks/ray_replica.py benchmarks/exports/gpt2/memory-parts-int8 --clients 8 --requests 48 --rounds 2

Each client sends its share of --requests non-streaming sampled completions (eos-free, --max-tokens each) one
after another; tok/s = completion tokens over the run. A replica that takes fewer requests than its batcher
has rows decodes fewer rows a step; the others wait at Ray's router. Results: benchmarks/results/ray_replica.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from onnxgen import scale

HERE = Path(__file__).resolve().parent


async def load(port: int, clients: int, requests: int, max_tokens: int) -> float:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
        async def client(c: int) -> int:
            tokens = 0
            for _ in range(c, requests, clients):
                r = await http.post("/v1/completions", json={"prompt": "It is a truth universally", "max_tokens": max_tokens,
                                                             "temperature": 0.8, "eos_token_id": None})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
            return tokens

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client(c) for c in range(clients))))
        return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    onnxgen_options = scale.replica_options
    cases = {"Ray's default (5)": 5, "onnxgen's (max_batch, 8)": None}
    results: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(args.rounds):
            for name, ongoing in cases.items():  # in turns: both see the same machine state
                scale.replica_options = lambda *a, o=ongoing: {**onnxgen_options(*a), **({"max_ongoing_requests": o} if o else {})}
                serve.run(scale.deployment(str(args.folder), threads=args.threads), name="onnxgen", route_prefix="/")
                asyncio.run(load(port, 2, 4, args.max_tokens))  # warm-up
                results[name].append(asyncio.run(load(port, args.clients, args.requests, args.max_tokens)))
                print(name, f"{results[name][-1]:.0f} tok/s", flush=True)
                serve.delete("onnxgen")
    finally:
        scale.replica_options = onnxgen_options
        serve.shutdown()
        ray.shutdown()
    base = statistics.median(results["Ray's default (5)"])
    report: dict[str, Any] = {"folder": str(args.folder), "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
                              "threads": args.threads, "tokens_per_s": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_replica.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# One Ray Serve replica, {args.clients} clients ({args.folder.name}, {args.threads} threads)", "",
             (f"`python benchmarks/ray_replica.py {args.folder} --clients {args.clients} --requests {args.requests} --rounds {args.rounds}`; "
              f"sampled completions of {args.max_tokens} tokens; each round's runs in turns."), "",
             "| requests a replica takes at once | tok/s (each round) | median vs Ray's default |", "| --- | --- | ---: |"]
    for name, runs in results.items():
        lines.append(f"| {name} | {', '.join(f'{r:.0f}' for r in runs)} | {statistics.median(runs) / base:.2f}x |")
    (args.out / "ray_replica.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
