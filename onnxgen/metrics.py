"""What `onnxgen serve` tells Prometheus at GET /metrics (prometheus_client, in the `serve` extra).

Per request: how it ended, its tokens in and out, the time to its first token and to its end, taken in the
batcher's thread as the tokens come (Job.deliver). At each scrape: the batcher's queue, its running requests and
busy rows, and its own counters (steps, prompt cache hits, ...). A registry per app, so that two apps in one
process (tests, a server beside a Ray replica) count apart. vLLM's and llama.cpp's servers name theirs alike.

On Ray Serve (scale.py) each replica's /metrics is its own, and a scrape through Ray's proxy reaches one of
them; so there the per-request series are also recorded in Ray's metrics (ray.serve.metrics), which each
node's Ray exports to Prometheus as ray_onnxgen_* with the replica's deployment, replica and application
tags: the replicas add up. The batcher's state goes there too, set by a thread of the replica every second (Ray
exports what was last set, not what a collector reads at a scrape), so a sum over replicas says how many rows
of the deployment are busy and how many requests wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .batcher import Batcher
from .errors import OnnxgenError
from .generator import Completion

# Seconds: a first token comes after one prompt pass (ms on a GPU, up to seconds for a long prompt on 2 cores);
# a request lasts up to max_tokens steps.
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = ("completed", "cancelled", "error", "invalid", "rejected")
RAY_STATE_SECONDS = 1.0  # how often a Ray Serve replica sets its batcher's state in Ray's metrics (Ray exports every 10 s)

Deliver = Callable[[str, Any], None]


class Metrics:
    """`ray`: also record the per-request series in Ray's metrics (a Ray Serve replica's app; see above)."""

    def __init__(self, batcher: Batcher, ray: bool = False) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Any:
            kept = Counter(name, documentation, labels, registry=self.registry)
            return _Both(kept, _Ray.counter(name, documentation, labels)) if ray else kept

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Any:
            kept = Histogram(name, documentation, buckets=buckets, registry=self.registry)
            return _Both(kept, _Ray.histogram(name, documentation, buckets)) if ray else kept

        self.requests = counter("onnxgen_requests", "Requests by how they ended: completed, cancelled (the client went "
                                "away, while it waited or ran), error, invalid (refused before they started), rejected "
                                "(the queue was full)", ("outcome",))
        for outcome in OUTCOMES:  # every series from the start, so that rates work from the first scrape
            self.requests.labels(outcome)
        self.prompt_tokens = counter("onnxgen_prompt_tokens", "Prompt tokens of the requests that ended")
        self.generation_tokens = counter("onnxgen_generation_tokens", "Tokens generated")
        # Per LoRA adapter (a request's model naming one): what each fine-tune served, for those who share one base
        self.adapter_requests = counter("onnxgen_adapter_requests", "Requests that ended with completions, by LoRA adapter", ("adapter",))
        self.adapter_tokens = counter("onnxgen_adapter_generation_tokens", "Tokens generated, by LoRA adapter", ("adapter",))
        self.first_token = histogram("onnxgen_time_to_first_token_seconds", "From a request's start to its first token "
                                     "(beam search: none, its tokens come at its end)", FIRST_TOKEN_BUCKETS)
        self.duration = histogram("onnxgen_request_duration_seconds", "From a request's start to its end", DURATION_BUCKETS)
        state = _BatcherState(batcher)
        self.registry.register(state)
        if ray:
            threading.Thread(target=_RayState(state).run, name="onnxgen-ray-metrics", daemon=True).start()

    def tracked(self, deliver: Deliver, prompts: list[list[int]], adapter: str | None = None) -> Deliver:
        """`deliver` (a Job's), counting what passes through it for the request of `prompts` (run with `adapter`); its
        clock starts now."""
        start, first = time.perf_counter(), True

        def tracking(kind: str, value: Any) -> None:
            nonlocal first
            if kind == "event" and first:
                first = False
                self.first_token.observe(time.perf_counter() - start)
            elif kind == "done":
                self.finished(prompts, value[0], time.perf_counter() - start, adapter)
            elif kind == "error":  # an option the model refused at the start is the request's fault, anything else ours
                self.requests.labels("invalid" if isinstance(value, OnnxgenError) else "error").inc()
                self.duration.observe(time.perf_counter() - start)
            elif kind == "dropped":  # the client went away while it waited
                self.requests.labels("cancelled").inc()
            deliver(kind, value)

        return tracking

    def finished(self, prompts: list[list[int]], completions: list[Completion], seconds: float, adapter: str | None = None) -> None:
        """A request that ended with completions (usage's prompt tokens: each prompt once, whatever its n)."""
        cancelled = any(c.finish_reason == "cancelled" for c in completions)
        self.requests.labels("cancelled" if cancelled else "completed").inc()
        generated = sum(len(c.token_ids) for c in completions)
        self.generation_tokens.inc(generated)
        if adapter is not None:
            self.adapter_requests.labels(adapter).inc()
            self.adapter_tokens.labels(adapter).inc(generated)
        self.prompt_tokens.inc(sum(len(p) for p in prompts))
        self.duration.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The scrape's body and content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Both:
    """A series recorded in two places as one (the app's registry and Ray's), in prometheus_client's shape."""

    def __init__(self, *instruments: Any) -> None:
        self.instruments = instruments

    def labels(self, *values: str) -> _Both:
        return _Both(*(i.labels(*values) for i in self.instruments))

    def inc(self, amount: float = 1.0) -> None:
        for i in self.instruments:
            i.inc(amount)

    def observe(self, value: float) -> None:
        for i in self.instruments:
            i.observe(value)


class _Ray:
    """A ray.serve.metrics series in prometheus_client's shape: labels(...) gives it tag values."""

    def __init__(self, metric: Any, labels: tuple[str, ...], tags: dict[str, str] | None = None) -> None:
        self.metric, self.label_names, self.tags = metric, labels, tags

    @classmethod
    def counter(cls, name: str, documentation: str, labels: tuple[str, ...]) -> _Ray:
        from ray.serve import metrics as ray_metrics

        return cls(ray_metrics.Counter(name, documentation, tag_keys=labels), labels)

    @classmethod
    def histogram(cls, name: str, documentation: str, buckets: tuple[float, ...]) -> _Ray:
        from ray.serve import metrics as ray_metrics

        return cls(ray_metrics.Histogram(name, documentation, boundaries=list(buckets)), ())

    def labels(self, *values: str) -> _Ray:
        return _Ray(self.metric, self.label_names, dict(zip(self.label_names, values)))

    def inc(self, amount: float = 1.0) -> None:
        if amount:  # Ray refuses an increment of 0 (a request that generated nothing)
            self.metric.inc(amount, tags=self.tags)

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)


class _BatcherState(Collector):
    """The batcher's state, read when Prometheus asks (its worker thread changes it; a scrape sees a moment of it)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def collect(self) -> Iterator[Any]:
        b = self.batcher
        state = b.occupancy()
        yield GaugeMetricFamily("onnxgen_requests_waiting", "Requests queued for room", value=state.waiting)
        yield GaugeMetricFamily("onnxgen_requests_running", "Requests decoding (or writing their prompts)", value=state.running)
        yield GaugeMetricFamily("onnxgen_rows_busy", "Rows of the shared key/value cache in use", value=state.rows_busy)
        yield GaugeMetricFamily("onnxgen_rows", "Rows of the shared key/value cache (serve --max-batch)", value=b.max_batch)
        yield CounterMetricFamily("onnxgen_decode_steps", "Forwards of the shared rows", value=b.steps)
        yield CounterMetricFamily("onnxgen_prompt_parts", "Parts of long prompts written between steps", value=b.parts)
        yield CounterMetricFamily("onnxgen_joined_requests", "Requests that joined rows already decoding", value=b.joined)
        yield CounterMetricFamily("onnxgen_prompt_cache_hits", "Requests whose prompt's start came from a kept cache", value=b.resumed)
        yield CounterMetricFamily("onnxgen_cancelled_rows", "Rows ended because their client went away", value=b.cancelled_rows)


class _RayState:
    """The batcher's state (_BatcherState's series) in Ray's metrics: gauges set to the moment's value and
    counters grown by what they grew since, every RAY_STATE_SECONDS, by a thread that lives as the replica does."""

    def __init__(self, state: _BatcherState) -> None:
        from ray.serve import metrics as ray_metrics

        self.state = state
        self.series = {f.name: (ray_metrics.Gauge if f.type == "gauge" else ray_metrics.Counter)(f.name, f.documentation)
                       for f in state.collect()}
        self.counted = dict.fromkeys(self.series, 0.0)  # each counter's value when last pushed

    def push(self) -> None:
        for family in self.state.collect():
            value, series = family.samples[0].value, self.series[family.name]
            if family.type == "gauge":
                series.set(value)
            elif value > self.counted[family.name]:
                series.inc(value - self.counted[family.name])
                self.counted[family.name] = value

    def run(self) -> None:
        while True:
            self.push()
            time.sleep(RAY_STATE_SECONDS)
