"""`onnxgen bench`: time a model folder on this machine (decode tok/s, time to first token, memory)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OptionsError
from .model import load
from .options import STRATEGIES
from .progress import stderr
from .runtime import Provider


@dataclass(frozen=True)
class Case:
    batch: int = 1
    prompt_tokens: int = 32
    new_tokens: int = 128
    strategy: str = "greedy"


# The vector instructions onnxruntime's CPU kernels (MLAS) choose by, widest first (/proc/cpuinfo's names): int8 and
# int4 speed differ between them, and so does whether a row computes the same bits alone as beside others.
VECTOR_ISAS = (("AVX-512 VNNI", "avx512_vnni"), ("AVX-512", "avx512f"), ("AVX-VNNI", "avx_vnni"), ("AVX2", "avx2"),
               ("SVE", "sve"), ("NEON dot product", "asimddp"), ("NEON", "asimd"))


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This machine as benchmark figures depend on it: its CPU, cores and widest vector instructions (Linux's
    /proc/cpuinfo; elsewhere what Python's platform module knows)."""
    try:
        info = cpuinfo.read_text()
    except OSError:
        info = ""
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in info.splitlines())}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())  # x86's name, then ARM's
    isa = next((label for label, flag in VECTOR_ISAS if flag in flags), None)
    name = fields.get("model name") or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores" + (f", {isa}" if isa else "")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory afresh (Linux: VmHWM := VmRSS), so that the next
    peak_rss_mb() is the peak of what runs in between. False where that cannot be done: peaks then
    carry over, and each is the peak so far."""
    clear_refs = Path("/proc/self/clear_refs")
    try:
        clear_refs.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. Linux's VmHWM belongs to this program alone; getrusage's
    ru_maxrss (the fallback elsewhere) carries a parent's peak over fork and exec."""
    status = Path("/proc/self/status")
    if status.exists():
        return int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:"))) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS: Linux is the target


def run(folder: Path, cases: list[Case], runs: int = 3, threads: int | None = None, provider: Provider = "cpu",
        quiet: bool = False, mapped_weights: bool = False, cuda_graph: bool = False, adapter: Path | None = None) -> dict[str, Any]:
    """Every figure is the median (with min and max) of `runs` timed runs after one warm-up; with `adapter` (a LoRA
    adapter folder, for a model exported with --lora), every call runs with it."""
    from rich.progress import Progress

    if runs < 1:
        raise OptionsError(f"runs must be at least 1, got {runs}")
    bad = [c for c in cases if min(c.batch, c.prompt_tokens, c.new_tokens) < 1]
    if bad:
        case = bad[0]
        raise OptionsError(f"batch, prompt tokens and new tokens must be at least 1, got batch {case.batch}, "
                           f"{case.prompt_tokens} prompt tokens, {case.new_tokens} new tokens")
    start = time.perf_counter()
    model = load(folder, provider=provider, threads=threads, mapped_weights=mapped_weights, cuda_graph=cuda_graph,
                 adapters={"bench": adapter} if adapter is not None else None)
    load_s = time.perf_counter() - start
    load_peak = peak_rss_mb()
    model.folder.verify()  # timing a corrupted folder helps nobody (hashed outside the load time)
    model_mb = model.folder.weight_bytes / 2**20
    rng = np.random.default_rng(0)
    results = []
    with Progress(console=stderr, disable=quiet, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases) * (runs + 1))
        for case in cases:
            if case.strategy not in STRATEGIES:
                raise OptionsError(f"unknown strategy {case.strategy!r}: use {', '.join(STRATEGIES)}")
            if case.prompt_tokens + case.new_tokens > model.context_length:
                raise OptionsError(f"prompt {case.prompt_tokens} + new {case.new_tokens} tokens exceed the context window of {model.context_length}")
            prompts = rng.integers(0, model.dims.vocab_size, size=(case.batch, case.prompt_tokens)).tolist()
            opts = model.options(max_new_tokens=case.new_tokens, eos_token_id=None, min_new_tokens=0, **STRATEGIES[case.strategy],
                                 adapter="bench" if adapter is not None else None)
            ttft, tps = [], []
            reset_peak_rss()  # this case's own peak (the load's is reported apart)
            for i in range(runs + 1):
                model.generate(prompts, opts)
                progress.advance(task)
                if i and model.last_stats:  # run 0 warms up
                    ttft.append(model.last_stats.time_to_first_token_s * 1000)
                    tps.append(model.last_stats.decode_tokens_per_s)
            peak = peak_rss_mb()
            results.append({**asdict(case), "time_to_first_token_ms": spread(ttft), "decode_tokens_per_s": spread(tps),
                            "peak_rss_mb": peak, "peak_rss_over_model_file": peak / model_mb})
    peak = max([load_peak, *(c["peak_rss_mb"] for c in results)])
    return {"model": str(folder), "adapter": str(adapter) if adapter is not None else None, "machine": machine(), "provider": provider,
            "threads": threads, "mapped_weights": mapped_weights, "runs": runs, "load_s": load_s,
            "load_peak_rss_mb": load_peak, "peak_rss_mb": peak, "model_file_mb": model_mb,
            "peak_rss_over_model_file": peak / model_mb, "cases": results}


def table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"{result['model']}{' + ' + result['adapter'] if result.get('adapter') else ''} ({result['provider']}"
                    f"{', weights mapped' if result['mapped_weights'] else ''}, "
                    f"load {result['load_s']:.2f} s, peak RSS while loading "
                    f"{result['load_peak_rss_mb']:.0f} MiB, {result['load_peak_rss_mb'] / result['model_file_mb']:.2f}x the "
                    f"{result['model_file_mb']:.0f} MiB model file)", caption=result["machine"])
    for column in ("batch", "prompt", "new", "strategy", "decode tok/s (min-max)", "first token ms (min-max)", "peak RSS MiB (x file)"):
        t.add_column(column, justify="right")
    for c in result["cases"]:
        d, f = c["decode_tokens_per_s"], c["time_to_first_token_ms"]
        t.add_row(str(c["batch"]), str(c["prompt_tokens"]), str(c["new_tokens"]), c["strategy"],
                  f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})", f"{f['median']:.1f} ({f['min']:.1f}-{f['max']:.1f})",
                  f"{c['peak_rss_mb']:.0f} ({c['peak_rss_over_model_file']:.2f}x)")
    return t
