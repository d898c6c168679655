"""Prometheus metrics for `lockstep serve`: an AsyncEngine observer and its exposition text.

Names follow vLLM's under the `lockstep:` prefix, so its dashboards read them. Every latency is
measured on the engine thread with time.perf_counter(): a request's arrival is when the caller
queued it, a token's time is when the engine thread handed it to the caller's stream.

Threads: the observer calls (on_added, on_step, on_outputs) come from the engine thread only and
are the only ones touching per-request state; render() runs on a server thread and only reads
prometheus_client objects and StepHistogram, which lock themselves.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .sequence import FinishReason, SeqOutput, Sequence

if TYPE_CHECKING:  # the server imports this module; the engine (and torch) come with AsyncEngine
    from .engine import Engine

PREFIX = "lockstep:"
# A CPU decode step takes a few ms and a GPU one well under 1 ms, so the buckets start at 100 us.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class _Request:
    arrival: float | None  # None: unknown (a sequence the observer never heard of): no TTFT or e2e time
    last_token: float | None = None


class _Partial:
    """A labelled metric with model_name already bound: .labels(program=...) gives the child."""

    def __init__(self, metric, bound: dict[str, str]) -> None:
        self.metric, self.bound = metric, bound

    def labels(self, **labels: str):
        return self.metric.labels(**self.bound, **labels)


class StepHistogram(Collector):
    """A histogram whose values come a step at a time: the inter-token latencies of every stream
    in a step. prometheus_client's Histogram.observe takes ~0.8 us a value (a lock and a scan of
    the buckets, in Python); observe_many takes the lock once and finds each value's bucket by
    bisection, ~0.09 us a value for a step of 64 (timeit, this machine). Exposed like a Histogram: _bucket (cumulative, le), _count, _sum.
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float], labels: dict[str, str],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(sorted(buckets))
        self.labels = labels
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: list[float]) -> None:
        """Counts each value in the first bucket whose upper bound is >= it (as Histogram does)."""
        if not values:
            return
        bounds, counts = self.bounds, self._counts
        with self._lock:
            for value in values:
                counts[bisect_left(bounds, value)] += 1
            self._sum += sum(values)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts):
            running += count
            cumulative.append((floatToGoString(bound), running))
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), cumulative, total)
        yield family


class EngineMetrics:
    """AsyncEngine's observer (runtime/async_engine.py Observer) with its own registry.

    Each instance owns a CollectorRegistry, so several servers or tests in one process never
    share or collide on series. render() gives the exposition for GET /metrics.
    """

    def __init__(self, model_name: str = "default") -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        # Every series carries model_name, as vLLM's do, so one dashboard tells servers apart.
        model = {"model_name": model_name}

        def histogram(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            metric = Histogram(PREFIX + name, doc, ("model_name", *labels), registry=reg, buckets=LATENCY_BUCKETS)
            return metric.labels(**model) if not labels else _Partial(metric, model)

        # prometheus_client appends _total to a counter's samples: these expose e.g. prompt_tokens_total.
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            metric = Counter(PREFIX + name, doc, ("model_name", *labels), registry=reg)
            return metric.labels(**model) if not labels else _Partial(metric, model)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, ("model_name",), registry=reg).labels(**model)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to the first generated token.")
        # Observed a step at a time (every stream's gap at once), so not a prometheus_client Histogram.
        self.itl = StepHistogram(PREFIX + "inter_token_latency_seconds", "Time between two tokens of one request.",
                                 LATENCY_BUCKETS, model, reg)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the request's terminal output.")
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival to the start of the first step the request was in.")
        self.step_duration = histogram("step_duration_seconds", "Wall time of one engine step, by step program.",
                                       ("program",))
        self._step_duration_by_program: dict[str, object] = {}
        self.running = gauge("num_requests_running", "Sequences holding KV in the scheduler.")
        self.waiting = gauge("num_requests_waiting", "Sequences queued for admission.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction (0..1) of KV blocks in use.")
        self.cost_correction = gauge("cost_model_correction",
                                     "Measured step time over the start-up cost table's prediction (median).")
        self.cost_correction.set(1.0)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests (a fork adds none).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = counter("request_success", "Sequences ended (a fork is one), by finish reason.",
                                       ("finished_reason",))
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        for reason in FinishReason:  # every reason shows from the start, at 0
            self.request_success.labels(finished_reason=reason.value)
        self._requests: dict[int, _Request] = {}  # live requests; engine thread only
        self._unscheduled: set[int] = set()  # of them, those not yet in a step (queue time still open)
        self._prefix_seen = (0, 0)  # the allocator's cumulative (queries, hits) at the last step
        self._gauges_set: tuple | None = None  # (running, waiting, KV usage) as last set

    # --- the observer (engine thread) ---------------------------------------------------------------

    def on_added(self, seq: Sequence, now: float) -> None:
        self._requests[seq.seq_id] = _Request(arrival=now)
        self._unscheduled.add(seq.seq_id)
        self.prompt_tokens.inc(seq.num_prompt_tokens)
        self.waiting.inc()  # exact again after the next step
        self._gauges_set = None

    def on_forked(self, parent: Sequence, children: list[Sequence], now: float) -> None:
        """A fork is timed from its request's arrival (n > 1: the parent's), its queue time
        counted once, with the parent's."""
        req = self._requests.get(parent.seq_id)
        for child in children:
            self._requests[child.seq_id] = _Request(arrival=req.arrival if req else None)

    def on_step(self, engine: Engine, seconds: float) -> None:
        step = engine.last_step
        if step is not None:
            name = step.program.name
            by_program = self._step_duration_by_program.get(name)
            if by_program is None:  # labels() takes a lock and a dict lookup: once per program
                by_program = self._step_duration_by_program[name] = self.step_duration.labels(program=name)
            by_program.observe(seconds)
            started = time.perf_counter() - seconds
            if self._unscheduled:  # a pass over the step only while some request waits for its first
                for item in step.items:
                    seq_id = item.seq.seq_id
                    if seq_id in self._unscheduled:
                        self._unscheduled.remove(seq_id)
                        self.queue_time.observe(max(0.0, started - self._requests[seq_id].arrival))
        # Each set or increment takes a lock: only what changed (a steady decode changes none of
        # these but the KV usage, a block at a time). On a GPU in overlap mode the device waits
        # for this call.
        model = engine.cost_model
        gauges = (len(engine.scheduler.running), engine.scheduler.num_waiting, engine.kv.usage(),
                  1.0 if model is None else model.factor)
        if gauges != self._gauges_set:
            running, waiting, usage, correction = gauges
            self.running.set(running)
            self.waiting.set(waiting)
            self.kv_usage.set(usage)
            self.cost_correction.set(correction)
            self._gauges_set = gauges
        allocator = engine.kv.allocator
        now = (allocator.prefix_queries(), allocator.prefix_hits())
        if now != self._prefix_seen:
            queries, hits = (n - seen for n, seen in zip(now, self._prefix_seen))
            if queries >= 0 and hits >= 0:  # negative: the counters were reset; start again from here
                self.prefix_queries.inc(queries)
                self.prefix_hits.inc(hits)
            self._prefix_seen = now

    def on_outputs(self, outputs: list[SeqOutput], now: float) -> None:
        """A step's outputs: one counter increment and one histogram update for all its tokens."""
        requests = self._requests
        gaps: list[float] = []
        tokens = 0
        for out in outputs:
            req = requests.get(out.seq_id)
            if out.token_id is not None:
                tokens += 1
                if req is None:  # made on the engine thread without the observer: inter-token times only
                    req = requests[out.seq_id] = _Request(arrival=None)
                if req.last_token is not None:
                    gaps.append(now - req.last_token)
                elif req.arrival is not None:
                    self.ttft.observe(now - req.arrival)
                req.last_token = now
            if out.finished:
                self.request_success.labels(finished_reason=FinishReason(out.finish_reason).value).inc()
                if req is not None and req.arrival is not None:
                    self.e2e.observe(now - req.arrival)
                requests.pop(out.seq_id, None)
                self._unscheduled.discard(out.seq_id)
        if tokens:
            self.generation_tokens.inc(tokens)
        self.itl.observe_many(gaps)

    # --- the server (any thread) ----------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric and its Content-Type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @property
    def num_tracked(self) -> int:
        """Requests with per-request state (live ones); for tests that it does not grow."""
        return len(self._requests)
