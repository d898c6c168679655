"""Prometheus metrics of the server (runtime/metrics.py): requests run through a real AsyncEngine
on the default model, then the exposition text is parsed and checked against what the requests
really had (prompt lengths, generated tokens, how each ended).
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from lockstep.runtime.async_engine import AsyncEngine
from lockstep.runtime.metrics import LATENCY_BUCKETS, EngineMetrics, StepHistogram
from lockstep.runtime.sampling_params import SamplingParams
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

# Long enough to fill several 16-token blocks, so a second run of it hits the prefix cache.
SHARED = ("The old lighthouse keeper climbed the spiral stairs every evening, counting each of the "
          "two hundred steps, and lit the lamp that guided the fishing boats home through the fog.")


def samples(metrics: EngineMetrics, model_name: str = "default") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text: (name, sorted labels but model_name) -> value. Every
    sample must carry the served model's name, as vLLM's do."""
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            labels = dict(s.labels)
            assert labels.pop("model_name", None) == model_name, s
            found[(s.name, tuple(sorted(labels.items())))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_latency_buckets_resolve_below_a_millisecond() -> None:
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert LATENCY_BUCKETS[0] <= 0.0001 and LATENCY_BUCKETS[-1] >= 60
    metrics, other = EngineMetrics(), EngineMetrics()  # own registries: no duplicate-name error
    metrics.ttft.observe(0.0003)
    metrics.ttft.observe(0.0005)  # an edge belongs to its own bucket (le is <=)
    metrics.ttft.observe(120.0)
    found = samples(metrics)
    name = "lockstep:time_to_first_token_seconds_bucket"
    assert value(found, name, le="0.0001") == 0
    assert value(found, name, le="0.00025") == 0
    assert value(found, name, le="0.0005") == 2
    assert value(found, name, le="60.0") == 2
    assert value(found, name, le="+Inf") == 3
    assert value(samples(other), name, le="+Inf") == 0


def test_the_step_histogram_exposes_what_prometheus_clients_histogram_would() -> None:
    """StepHistogram (the inter-token latencies, a step at a time) against prometheus_client's own
    Histogram fed the same values one by one: fresh random values, values on bucket edges, one
    past the last bound and an empty step; every bucket, the count and the sum agree."""
    rng = random.Random(11)
    registry = CollectorRegistry()
    batched = StepHistogram("lockstep:gaps_seconds", "doc", LATENCY_BUCKETS, {"model_name": "m"}, registry)
    reference = Histogram("reference_seconds", "doc", ("model_name",), registry=registry,
                          buckets=LATENCY_BUCKETS).labels(model_name="m")
    steps = [[10 ** rng.uniform(-5, 2) for _ in range(rng.randrange(1, 70))] for _ in range(30)]
    steps += [list(LATENCY_BUCKETS), [], [1e3]]
    for values in steps:
        batched.observe_many(values)
        for v in values:
            reference.observe(v)
    by_name: dict[str, dict] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            base, _, suffix = sample.name.rpartition("_")
            if suffix in ("bucket", "count", "sum"):
                key = (suffix, sample.labels.get("le"), sample.labels["model_name"])
                by_name.setdefault(base, {})[key] = sample.value
    got, want = by_name["lockstep:gaps_seconds"], by_name["reference_seconds"]
    assert got.keys() == want.keys() and len(got) == len(LATENCY_BUCKETS) + 3
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert got[("count", None, "m")] == sum(map(len, steps))


def test_metrics_match_what_the_requests_had(make_engine) -> None:
    metrics = EngineMetrics("smollm2")
    served = AsyncEngine(make_engine(), observers=[metrics]).start()
    tokenizer = served.engine.tokenizer
    length_ids = tokenizer.encode("The first rule of the garden is")
    cancel_ids = tokenizer.encode("def add(a, b):")
    shared_ids = tokenizer.encode(SHARED)
    assert len(shared_ids) > 2 * served.engine.kv.block_size

    async def request(ids, sp: SamplingParams, leave_after: int | None = None):
        """Streams a request; returns its outputs, and for one left early (whose stream stops
        short of what the engine generated) also its Sequence, read once it has ended."""
        seq_id = await served.open(ids, sp)
        seq = None if leave_after is None else await served.call(lambda: served.engine.seqs[seq_id])
        seen = []
        stream = served.outputs(seq_id)
        async for out in stream:
            seen.append(out)
            if len(seen) == leave_after:
                break
        await stream.aclose()
        return seen, seq

    async def run():
        greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        first = await asyncio.gather(
            request(length_ids, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)),
            request(cancel_ids, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), leave_after=3),
            request(shared_ids, greedy),
        )
        # The same prompt again, after the first run published its blocks; stopping at the token
        # greedy decoding gives first ends it with "stop" after one token.
        stop_at = first[2][0][0].token_id
        again = await request(shared_ids, SamplingParams(temperature=0.0, max_tokens=4, stop_token_ids=[stop_at]))
        return [*first, again]

    try:
        results = asyncio.run(run())
        deadline = time.monotonic() + 10  # the cancelled request ends at the next step
        while metrics.num_tracked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metrics.num_tracked == 0, "per-request state is dropped at each terminal output"
        found = samples(metrics, "smollm2")
    finally:
        served.shutdown()

    (length, _), (_, cancelled), (shared, _), (stopped, _) = results
    tokens = [[o.token_id for o in outs if o.token_id is not None] for outs in (length, shared, stopped)]
    assert [outs[-1].finish_reason.value for outs in (length, shared, stopped)] == ["length", "length", "stop"]
    assert [len(t) for t in tokens] == [5, 4, 1]
    assert cancelled.finish_reason.value == "cancelled" and len(cancelled.output_ids) >= 3
    prompt_tokens = len(length_ids) + len(cancel_ids) + 2 * len(shared_ids)
    generated = sum(len(t) for t in tokens) + len(cancelled.output_ids)
    n = len(results)

    assert value(found, "lockstep:prompt_tokens_total") == prompt_tokens
    assert value(found, "lockstep:generation_tokens_total") == generated
    reasons = {r: value(found, "lockstep:request_success_total", finished_reason=r)
               for r in ("stop", "length", "cancelled", "error")}
    assert reasons == {"stop": 1, "length": 2, "cancelled": 1, "error": 0}

    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert value(found, f"lockstep:{name}_count") == n, name
    assert value(found, "lockstep:inter_token_latency_seconds_count") == generated - n
    assert value(found, "lockstep:e2e_request_latency_seconds_sum") >= value(
        found, "lockstep:time_to_first_token_seconds_sum")
    assert ("lockstep:inter_token_latency_seconds_bucket", (("le", "0.0005"),)) in found

    programs = {dict(labels)["program"]: v for (name, labels), v in found.items()
                if name == "lockstep:step_duration_seconds_count"}
    assert any(p.startswith("decode[") for p in programs) and any(p.startswith("prefill[") for p in programs)
    assert all(v > 0 for v in programs.values())

    assert value(found, "lockstep:num_requests_running") == 0
    assert value(found, "lockstep:num_requests_waiting") == 0
    assert value(found, "lockstep:kv_cache_usage_perc") == 0
    assert value(found, "lockstep:cost_model_correction") == served.engine.cost_model.factor
    hits = value(found, "lockstep:prefix_cache_hits_total")
    assert hits >= served.engine.kv.block_size, "the repeated prompt reused at least one block"
    assert value(found, "lockstep:prefix_cache_queries_total") >= hits


def test_forks_are_timed_from_their_requests_arrival(make_engine) -> None:
    """n answers of one prompt (what HTTP n=3 does): the prompt counts once, its queue time once,
    and each fork gets a TTFT and an e2e latency from the request's arrival."""
    metrics = EngineMetrics()
    served = AsyncEngine(make_engine(), observers=[metrics]).start()
    ids = served.engine.tokenizer.encode("Three colours of the sea:")
    sp = SamplingParams(temperature=0.8, seed=5, max_tokens=3, ignore_eos=True)

    async def run():
        parent = await served.open_sequence(ids, sp, generate=False)
        children = await served.fork_and_commit(parent.seq_id, 2)

        async def collect(seq_id):
            return [o async for o in served.outputs(seq_id)]
        return await asyncio.gather(*(collect(s.seq_id) for s in [parent, *children]))

    try:
        answers = asyncio.run(run())
        found = samples(metrics)
    finally:
        served.shutdown()
    assert [sum(o.token_id is not None for o in outs) for outs in answers] == [3, 3, 3]
    assert value(found, "lockstep:prompt_tokens_total") == len(ids)
    assert value(found, "lockstep:request_queue_time_seconds_count") == 1
    assert value(found, "lockstep:time_to_first_token_seconds_count") == 3
    assert value(found, "lockstep:e2e_request_latency_seconds_count") == 3
    assert value(found, "lockstep:inter_token_latency_seconds_count") == 6
    assert value(found, "lockstep:request_success_total", finished_reason="length") == 3
