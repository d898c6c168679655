"""`lockstep bench serve`: a load generator for any OpenAI-compatible server (lockstep, vLLM,
SGLang, llama.cpp's server, ...), reporting what `vllm bench serve` reports under the same names.

Method
------
Synthetic prompts are drawn from a fixed English word list by a RNG seeded with --seed, about
--prompt-tokens words each (one word is about one token in BPE vocabularies; the server's own
count, from the `usage` of each reply, is what the report uses). Every sweep point gets fresh
prompts, so a server with a prefix cache (vLLM's default) cannot answer a later point from the
cache of an earlier one. Each request asks for exactly --output-tokens tokens: `max_tokens`
plus the common extensions `ignore_eos: true` and `min_tokens`, so every server and every point
does the same work whatever the model would have said; a server that stops early is reported.

Each request streams (SSE, `stream: true`, `stream_options.include_usage`), and the client
stamps, on a monotonic clock:
  - send: just before the request is written;
  - TTFT: the first chunk that carries generated text (a chat reply's opening role-only chunk
    does not count);
  - ITL: the gaps between consecutive content chunks after the first (one sample per chunk,
    as vLLM counts them: a server that packs several tokens in one chunk shows fewer, longer gaps);
  - E2EL: send to the end of the stream;
  - TPOT = (E2EL - TTFT) / (output tokens - 1), output tokens from the final usage chunk (the
    number of content chunks when a server sends no usage).

Two kinds of sweep point:
  - concurrency N (closed loop): N requests in flight; the moment one finishes the next one is
    sent, so the server always holds N. This measures a server at a fixed batch pressure.
  - request rate R (open loop): requests arrive as a Poisson process of R per second, i.e.
    exponential gaps drawn from the seeded RNG, whether or not earlier ones have finished
    (`inf` sends them all at once). This is how independent users load a public endpoint,
    and queueing shows up in TTFT.

Per point: completed and failed requests (an HTTP error, a 429, a 5xx or a timeout fails the
request, never the run), token totals, duration (first send to last finish), request, output
and total token throughput, goodput (requests per second that met every SLO given with
--slo-ttft-ms / --slo-tpot-ms, as vLLM's request_goodput), and mean / median / std / p90 / p99
of TTFT, TPOT, ITL and E2EL in ms (bench/stats.py, vLLM's names).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import vllm_names

HELP = "Load-test any OpenAI-compatible server: TTFT, TPOT, ITL and throughput by concurrency and request rate."

EXAMPLES = """examples:
  lockstep bench serve                                   # lockstep serve on :8000, concurrency 1 4 16
  lockstep bench serve --concurrency 1 8 32 --num-prompts 256 --output-tokens 256
  lockstep bench serve --request-rate 1 2 4 inf --slo-ttft-ms 500 --slo-tpot-ms 50
  lockstep bench serve --url http://gpu-box:8000 --endpoint chat --api-key $KEY --out results/vllm
"""

# Common, short English words: with a leading space almost every one is a single token in the
# BPE vocabularies of Llama, Qwen, SmolLM, Mistral and GPT, so N words make about N tokens.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this had not are but have "
    "one which were all she when there can an their more if no out so said what up its about into "
    "than them only other new some could time these two may first then do any like my now over such "
    "our man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know "
    "while last might us great old year off come since against go came right used take three small "
    "house water light place city river green story music table window garden road morning evening "
    "summer winter paper letter friend school market doctor engine number answer question family"
).split()

DEFAULT_CONCURRENCY = [1, 4, 16]


class BenchError(Exception):
    """A problem the user must fix (no server, wrong key, unknown model): one line, exit 2."""


# --- options -------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"latency_class\": \"batch\"}'")
    return value


def _rate(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    return _positive_float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the server's base URL, with or without /v1 (default: http://127.0.0.1:8000)")
    server.add_argument("--model", default=None,
                        help="model name to send (default: the first id that GET /v1/models lists)")
    server.add_argument("--api-key", default=None,
                        help="sent as 'Authorization: Bearer KEY' (default: $LOCKSTEP_API_KEY or $OPENAI_API_KEY)")
    server.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="/v1/completions or /v1/chat/completions (default: completions)")
    server.add_argument("--timeout", type=_positive_float, default=300.0,
                        help="seconds a request may take before it counts as failed (default: 300)")

    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=_positive_int, default=64,
                      help="requests per sweep point (default: 64)")
    load.add_argument("--prompt-tokens", type=_positive_int, default=128,
                      help="about this many tokens per synthetic prompt; the report uses the server's count "
                           "(default: 128)")
    load.add_argument("--output-tokens", type=_positive_int, default=128,
                      help="tokens every request generates (max_tokens, min_tokens and ignore_eos) (default: 128)")
    load.add_argument("--concurrency", type=_positive_int, nargs="+", default=None, metavar="N",
                      help="closed loop: N requests in flight, a finished one replaced at once "
                           "(default: 1 4 16, or none when --request-rate is given)")
    load.add_argument("--request-rate", type=_rate, nargs="+", default=None, metavar="R",
                      help="open loop: Poisson arrivals at R requests/s; inf sends all at once (default: none)")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    load.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                      help="fields added to every request body, e.g. '{\"latency_class\": \"batch\"}' for "
                           "lockstep's throughput class (default: none)")
    load.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival gaps (default: 0)")

    slo = parser.add_argument_group("goodput (requests/s that meet every SLO given)")
    slo.add_argument("--slo-ttft-ms", type=_positive_float, default=None, help="time-to-first-token SLO in ms")
    slo.add_argument("--slo-tpot-ms", type=_positive_float, default=None, help="time-per-output-token SLO in ms")


# --- workload ------------------------------------------------------------------------------------

def build_prompts(count: int, prompt_tokens: int, seed: int) -> list[str]:
    """`count` prompts of `prompt_tokens` words each, the same for the same seed. One RNG draws
    them in order, so the first k of a longer list are the k of a shorter one."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(prompt_tokens)).capitalize() + "."
            for _ in range(count)]


def poisson_gaps(count: int, rate: float, rng: random.Random) -> list[float]:
    """Gaps in seconds between `count` Poisson arrivals at `rate` per second: exponential with
    mean 1/rate (all zero for an infinite rate: everything at once)."""
    if rate == math.inf:
        return [0.0] * count
    return [rng.expovariate(rate) for _ in range(count)]


def point_seed(seed: int, index: int) -> int:
    """The arrival RNG's seed for the index-th sweep point: distinct from the prompts' stream."""
    return seed * 1_000_003 + 7919 * (index + 1)


# --- one request ---------------------------------------------------------------------------------

@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    send: float = 0.0  # perf_counter() when the request was written
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with generated text
    end: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage; None when the server sent none

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send

    @property
    def e2el(self) -> float:
        return self.end - self.send

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        # A one-token reply has no decode phase: no TPOT (vLLM leaves it out too).
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def _error_message(status: int, body: bytes) -> str:
    """OpenAI's {"error": {"message"}}, vLLM's older {"message"}, or the start of the body."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            err = data.get("error")
            message = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
            message = message or data.get("message") or data.get("detail")
            if message:
                return f"HTTP {status}: {message}"
    except json.JSONDecodeError:
        pass
    return f"HTTP {status}: {text.strip()[:200] or '(empty body)'}"


class Client:
    """Builds the request bodies for one endpoint and streams them, stamping every chunk."""

    def __init__(self, http, endpoint: str, model: str, output_tokens: int, temperature: float,
                 timeout: float, seed: int, extra_body: dict | None = None) -> None:
        self.http, self.endpoint, self.model = http, endpoint, model
        self.extra_body = dict(extra_body or {})
        self.output_tokens, self.temperature, self.timeout, self.seed = output_tokens, temperature, timeout, seed
        self.path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"

    def body(self, prompt: str, index: int, output_tokens: int | None = None) -> dict[str, Any]:
        n = self.output_tokens if output_tokens is None else output_tokens
        body: dict[str, Any] = {"model": self.model, "max_tokens": n, "min_tokens": n, "ignore_eos": True,
                                "temperature": self.temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.temperature > 0 and index >= 0:
            # Sampled runs repeat too, each request with its own stream (a non-negative 31-bit seed).
            body["seed"] = (self.seed + index) % 2**31
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body.update(self.extra_body)
        return body

    async def send(self, body: dict[str, Any]) -> RequestResult:
        result = RequestResult()
        try:
            # httpx's timeout bounds each read, not the whole request: wait_for bounds the total.
            await asyncio.wait_for(self._stream(body, result), self.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            result.ok, result.error = False, f"timed out after {self.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - any transport or protocol failure fails one request
            import httpx

            if isinstance(exc, httpx.TimeoutException):
                result.error = f"timed out ({type(exc).__name__})"
            else:
                result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            result.ok = False
        if not result.end:
            result.end = time.perf_counter()
        return result

    async def _stream(self, body: dict[str, Any], result: RequestResult) -> None:
        result.send = time.perf_counter()
        usage = None
        async with self.http.stream("POST", self.path, json=body) as response:
            if response.status_code != 200:
                result.error = _error_message(response.status_code, await response.aread())
                result.end = time.perf_counter()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and ": keep-alive" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    err = chunk["error"]
                    result.error = "error in stream: " + (err.get("message", str(err)) if isinstance(err, dict)
                                                          else str(err))
                    continue
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if any(_content(choice) for choice in chunk.get("choices") or ()):
                    result.chunk_times.append(now)
        result.end = time.perf_counter()
        if usage is not None:
            result.output_tokens = int(usage.get("completion_tokens") or 0)
            if usage.get("prompt_tokens") is not None:
                result.prompt_tokens = int(usage["prompt_tokens"])
        if not result.output_tokens:
            result.output_tokens = len(result.chunk_times)  # no usage: one token per chunk is the best guess
        if not result.error and not result.chunk_times:
            result.error = "the stream carried no generated text"
        result.ok = not result.error


def _content(choice: dict) -> bool:
    """Whether one choice of a chunk carries generated output (text, or token ids)."""
    if choice.get("text") or choice.get("token_ids"):
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content"))


# --- sweep points --------------------------------------------------------------------------------

async def run_concurrency(client: Client, prompts: list[str], first_index: int, n: int, bar) -> tuple[
        list[RequestResult], float]:
    """Closed loop: n workers, each sending the next prompt as soon as its last one finished."""
    pending = iter(range(len(prompts)))
    results: list[RequestResult | None] = [None] * len(prompts)

    async def worker() -> None:
        for i in pending:  # a shared iterator: each index is taken by exactly one worker
            results[i] = await client.send(client.body(prompts[i], first_index + i))
            bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(n, len(prompts)))))
    return results, time.perf_counter() - start  # type: ignore[return-value]


async def run_rate(client: Client, prompts: list[str], first_index: int, rate: float, rng: random.Random,
                   bar) -> tuple[list[RequestResult], float]:
    """Open loop: requests leave at Poisson arrival times, whether or not earlier ones finished."""
    gaps = poisson_gaps(len(prompts), rate, rng)

    async def one(i: int) -> RequestResult:
        result = await client.send(client.body(prompts[i], first_index + i))
        bar.update(1)
        return result

    tasks = []
    start = time.perf_counter()
    due = start
    for i, gap in enumerate(gaps):
        # Arrival times are absolute (start + sum of gaps), so a late wake-up does not delay
        # every arrival after it.
        due += gap
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def point_metrics(results: list[RequestResult], duration: float, output_tokens: int,
                  slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> tuple[dict[str, Any], dict[str, list]]:
    """vLLM's figures for one sweep point, and the raw samples the plots need (not saved)."""
    done = [r for r in results if r.ok]
    ttfts = [r.ttft for r in done]
    tpots = [r.tpot for r in done if r.tpot is not None]
    itls = [gap for r in done for gap in r.itls]
    total_in = sum(r.prompt_tokens or 0 for r in done)
    total_out = sum(r.output_tokens for r in done)
    metrics: dict[str, Any] = {
        "completed": len(done), "failed": len(results) - len(done),
        "total_input_tokens": total_in, "total_output_tokens": total_out, "duration": duration,
        "request_throughput": len(done) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        def good(r: RequestResult) -> bool:
            if slo_ttft_ms is not None and r.ttft * 1000 > slo_ttft_ms:
                return False
            return slo_tpot_ms is None or r.tpot is None or r.tpot * 1000 <= slo_tpot_ms
        metrics["request_goodput"] = sum(map(good, done)) / duration
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", [r.e2el for r in done])):
        metrics.update(vllm_names(name, values))
    # Counts and the ITL range, not the samples themselves: they check the run without bloating the JSON.
    metrics["num_itl_samples"] = len(itls)
    metrics["min_itl_ms"] = 1000 * min(itls) if itls else None
    metrics["max_itl_ms"] = 1000 * max(itls) if itls else None
    metrics["missing_usage"] = sum(r.prompt_tokens is None for r in done)
    metrics["short_outputs"] = sum(r.output_tokens < output_tokens for r in done)
    metrics["errors"] = dict(Counter(r.error for r in results if not r.ok).most_common(5))
    return metrics, {"ttft_ms": [1000 * t for t in ttfts], "itl_ms": [1000 * t for t in itls]}


# --- the run -------------------------------------------------------------------------------------

def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    return url.removesuffix("/v1")


async def _model(http, url: str, wanted: str | None) -> str:
    """Checks that the server answers and the key is accepted; the model to send."""
    import httpx

    try:
        response = await http.get("/v1/models")
    except httpx.TransportError as exc:
        raise BenchError(f"cannot reach {url}: {exc or type(exc).__name__}; is a server running? "
                         "start one with `lockstep serve`") from None
    if response.status_code == 401:
        raise BenchError(f"{url} refused the API key ({_error_message(401, response.content)}); pass the "
                         "server's key with --api-key KEY (or set LOCKSTEP_API_KEY)")
    if response.status_code != 200:
        if wanted:
            return wanted  # some servers have no /v1/models; the warm-up request checks the name
        raise BenchError(f"GET {url}/v1/models failed ({_error_message(response.status_code, response.content)}); "
                         "pass --model NAME")
    try:
        ids = [m["id"] for m in response.json().get("data", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        ids = []
    if wanted:
        return wanted
    if not ids:
        raise BenchError(f"GET {url}/v1/models lists no models; pass --model NAME")
    return ids[0]


async def _warm_up(client: Client, url: str) -> None:
    """One short request, not counted: connections, the server's first-request costs, and a
    clear error before the sweep when the model name or a request field is refused."""
    result = await client.send(client.body("Hello, this is a short warm-up request.", -1, output_tokens=2))
    if result.ok:
        return
    if result.error.startswith("HTTP 404"):
        raise BenchError(f"unknown model {client.model!r} at {url}: {result.error}")
    if result.error.startswith("HTTP 401"):
        raise BenchError(f"{url} refused the API key ({result.error}); pass the server's key with --api-key KEY")
    raise BenchError(f"the warm-up request to {url}{client.path} failed: {result.error}")


def _label(kind: str, value: float) -> str:
    return f"concurrency {value}" if kind == "concurrency" else f"rate {value:g}/s"


async def _sweep(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, list]]]:
    import httpx
    from tqdm import tqdm

    url = _base_url(args.url)
    concurrency = args.concurrency if args.concurrency is not None else (
        [] if args.request_rate else DEFAULT_CONCURRENCY)
    rates = args.request_rate or []
    points = [("concurrency", n) for n in concurrency] + [("rate", r) for r in rates]
    key = args.api_key if args.api_key is not None else (
        os.environ.get("LOCKSTEP_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # No pool limit: httpx's default of 100 connections would queue requests inside the client
    # and count that wait as the server's TTFT. Environment proxies are ignored: a load test
    # measures the server, not a proxy in between.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(args.timeout, connect=10.0),
                                 limits=limits, trust_env=False) as http:
        model = await _model(http, url, args.model)
        client = Client(http, args.endpoint, model, args.output_tokens, args.temperature, args.timeout, args.seed,
                        args.extra_body)
        await _warm_up(client, url)
        # Fresh prompts for every point (see the module docstring): point k sends prompts[k*n:(k+1)*n].
        n = args.num_prompts
        prompts = build_prompts(n * len(points), args.prompt_tokens, args.seed)
        results: dict[str, Any] = {
            "url": url, "model": model, "endpoint": args.endpoint,
            "settings": {"num_prompts": n, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                         "concurrency": concurrency, "request_rate": list(rates),
                         "temperature": args.temperature, "seed": args.seed, "timeout_s": args.timeout,
                         "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                         "extra_body": args.extra_body},
            "points": []}
        samples: dict[str, dict[str, list]] = {}
        for k, (kind, value) in enumerate(points):
            chunk = prompts[k * n:(k + 1) * n]
            with tqdm(total=n, desc=_label(kind, value), unit="req", file=sys.stderr,
                      disable=args.no_progress, leave=False) as bar:
                if kind == "concurrency":
                    done, duration = await run_concurrency(client, chunk, k * n, value, bar)
                else:
                    done, duration = await run_rate(client, chunk, k * n, value,
                                                    random.Random(point_seed(args.seed, k)), bar)
            metrics, raw = point_metrics(done, duration, args.output_tokens, args.slo_ttft_ms, args.slo_tpot_ms)
            # An infinite rate stays math.inf here; write_report spells it "inf" (strict_json).
            results["points"].append({"kind": kind, "value": value, **metrics})
            samples[_label(kind, value)] = raw
    return results, samples


def _warnings(results: dict[str, Any]) -> list[str]:
    want = results["settings"]["output_tokens"]
    lines = []
    for p in results["points"]:
        label = _label(p["kind"], p["value"])
        if p["failed"]:
            errors = "; ".join(f"{count}x {msg}" for msg, count in p["errors"].items())
            lines.append(f"{label}: {p['failed']} of {p['failed'] + p['completed']} requests failed ({errors})")
        if p["short_outputs"]:
            lines.append(f"{label}: {p['short_outputs']} requests returned fewer than {want} tokens (does the server "
                         "honour ignore_eos and min_tokens?); throughput and TPOT are not comparable")
        if p["missing_usage"]:
            lines.append(f"{label}: {p['missing_usage']} replies had no usage chunk; input token totals are low")
    return lines


def _markdown(results: dict[str, Any], warnings: list[str]) -> str:
    from .report import markdown_table

    s = results["settings"]
    points = results["points"]
    completed = sum(p["completed"] for p in points)
    mean_in = sum(p["total_input_tokens"] for p in points) / completed if completed else None
    path = "/v1/chat/completions" if results["endpoint"] == "chat" else "/v1/completions"
    counted = f" (the server counted {mean_in:.1f} on average)" if mean_in is not None else ""
    intro = (f"{results['model']} at {results['url']}{path}, streaming. {s['num_prompts']} requests per point; "
             f"prompts of about {s['prompt_tokens']} tokens{counted}, {s['output_tokens']} output tokens each, "
             f"temperature {s['temperature']:g}, seed {s['seed']}.\n\n")
    headers = ["kind", "value", "completed/failed", "req/s", "output tok/s", "goodput req/s",
               "TTFT median ms", "TTFT p99 ms", "TPOT median ms", "TPOT p99 ms", "ITL median ms", "ITL p99 ms"]
    rows = [[p["kind"], p["value"], f"{p['completed']}/{p['failed']}", p["request_throughput"],
             p["output_throughput"], p.get("request_goodput"), p["median_ttft_ms"], p["p99_ttft_ms"],
             p["median_tpot_ms"], p["p99_tpot_ms"], p["median_itl_ms"], p["p99_itl_ms"]] for p in points]
    text = intro + markdown_table(headers, rows)
    if warnings:
        text += "\n" + "".join(f"- warning: {w}\n" for w in warnings)
    return text


def _plots(out: Path, results: dict[str, Any], samples: dict[str, dict[str, list]]) -> list[Path]:
    from . import plots

    paths = [plots.latency_cdf(out / "serve_ttft_cdf.png", {k: v["ttft_ms"] for k, v in samples.items()},
                               f"Time to first token, {results['model']}", "TTFT (ms)"),
             plots.latency_cdf(out / "serve_itl_cdf.png", {k: v["itl_ms"] for k, v in samples.items()},
                               f"Inter-token latency, {results['model']}", "ITL (ms)")]
    series = {}
    for kind, name in (("concurrency", "closed loop: concurrency"), ("rate", "open loop: request rate (req/s)")):
        # An infinite rate has no place on the axis; its figures are in the table.
        pts = [(p["value"], p["output_throughput"]) for p in results["points"]
               if p["kind"] == kind and math.isfinite(p["value"])]
        if pts:
            series[name] = ([x for x, _ in pts], [y for _, y in pts])
    xlabel = " / ".join(label.split(": ")[1] for label in series) or "concurrency"
    paths.append(plots.rate_plot(out / "serve_throughput.png", series, f"Output throughput, {results['model']}",
                                 xlabel, "output tokens/s"))
    return paths


def run(args: argparse.Namespace) -> int:
    try:
        results, samples = asyncio.run(_sweep(args))
    except (BenchError, ValueError) as exc:
        print(f"lockstep bench serve: error: {exc}", file=sys.stderr)
        return 2
    from .report import write_report

    warnings = _warnings(results)
    for line in warnings:
        print(f"lockstep bench serve: warning: {line}", file=sys.stderr)
    markdown = _markdown(results, warnings)
    paths = list(write_report(args.out, "serve", results, markdown).values())
    paths += _plots(args.out, results, samples)
    print(markdown, end="")
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0
