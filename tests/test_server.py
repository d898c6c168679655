"""`lockstep serve`'s HTTP API against real clients: the official `openai` package and raw httpx,
on a real uvicorn server on loopback, default model.

Expected outputs are the engine's own results for the same request run alone (the numbers are
checked against HF transformers elsewhere); bad inputs must each get OpenAI's error shape with
the right status, and the server must keep serving after every one.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.serve import build_server

KEY = "test-key"
MODEL = "smollm2"


@pytest.fixture(scope="module")
def server(make_engine):
    engine = make_engine(kv_memory_bytes=128 << 20)
    async_engine, app_server = build_server(engine, MODEL, api_key=KEY, max_waiting=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app_server.app, host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "async_engine": async_engine}
    uv.should_exit = True
    thread.join(10)
    async_engine.shutdown()


@pytest.fixture(scope="module")
def reference(make_engine):
    return make_engine(kv_memory_bytes=128 << 20)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def wait_idle(engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (engine.kv.allocator.num_sequences() or engine.seqs) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_models_and_health(client, server) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}


def test_completion_equals_the_engine_alone(client, reference) -> None:
    prompt = "The three primary colours are"
    want = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2))[0]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text
    assert got.choices[0].logprobs.token_logprobs == want.logprobs
    assert got.usage.completion_tokens == 12 and got.usage.prompt_tokens == len(want.prompt_ids)


def test_chat_stream_and_usage(client, reference) -> None:
    messages = [{"role": "user", "content": "Name a fruit."}]
    want = reference.generate([reference.encode_chat(messages)], SamplingParams(temperature=0.0, max_tokens=16))[0]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop" if
            want.finish_reason.value == "stop" else "length"]
    assert chunks[-1].usage.completion_tokens == len(want.output_ids)


def test_n3_forks_and_seeded_reproducibility(client, server) -> None:
    def ask():
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a joke."}],
                                              max_tokens=10, temperature=1.0, seed=7, n=3)
    first, second = ask(), ask()
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices], "same seed, same answers"
    assert len(set(texts)) > 1, "each fork samples its own branch"
    wait_idle(server["engine"])
    assert server["engine"].kv.allocator.num_sequences() == 0


def test_token_id_prompt_stop_and_every_sampling_field(client, reference) -> None:
    """A prompt of token ids, sampled with top_k, top_p, min_p and a seed, cut by a stop string:
    the engine's own answer to the same request. The stop string is taken from the answer without
    it, so it must cut there."""
    ids = reference.tokenizer.encode("Once upon a time, in a small village,")
    sp = dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05, seed=11, max_tokens=24, ignore_eos=True)
    whole = reference.generate([ids], SamplingParams(**sp))[0]
    stop = whole.text.split()[3]
    want = reference.generate([ids], SamplingParams(**sp, stop=[stop]))[0]
    assert want.finish_reason.value == "stop" and len(want.text) < len(whole.text)
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0.9, top_p=0.9, seed=11,
                                    stop=[stop], extra_body={"top_k": 5, "min_p": 0.05, "ignore_eos": True})
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    unsorted = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0.9, top_p=0.9, seed=11,
                                         extra_body={"min_p": 0.05, "ignore_eos": True})
    assert unsorted.choices[0].text != whole.text, "top_k reached the sampler (without it the answer differs)"


def test_streamed_completion_equals_the_whole_one(client, reference) -> None:
    prompt = "A list of three animals:"
    want = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_logprobs(client, reference) -> None:
    messages = [{"role": "user", "content": "What is two plus two?"}]
    want = reference.generate([reference.encode_chat(messages)],
                              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2))[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    content = got.choices[0].logprobs.content
    assert [c.logprob for c in content] == want.logprobs
    tokenizer = reference.tokenizer
    assert [c.token for c in content] == [tokenizer.token_text(t) for t in want.output_ids]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [[lp for _, lp in top] for top in want.top_logprobs]


class ClassRecorder:
    """An AsyncEngine observer that keeps the latency class each accepted request reached the engine with."""

    def __init__(self) -> None:
        self.classes: list[str] = []

    def on_added(self, seq, now) -> None:
        self.classes.append(seq.params.latency_class)

    def on_forked(self, parent, children, now) -> None: ...

    def on_step(self, engine, seconds) -> None: ...

    def on_outputs(self, outputs, now) -> None: ...


def test_latency_class_and_priority_reach_the_scheduler(server) -> None:
    recorder = ClassRecorder()
    server["async_engine"].observers.append(recorder)
    try:
        sent = [({}, "interactive"), ({"latency_class": "batch"}, "batch"), ({"priority": "batch"}, "batch"),
                ({"priority": 5}, "batch"), ({"priority": 0}, "interactive"), ({"priority": -1}, "interactive"),
                ({"latency_class": "interactive", "priority": 3}, "interactive")]
        for extra, _ in sent:
            r = httpx.post(server["url"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 1, **extra},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert r.status_code == 200, (extra, r.text)
    finally:
        server["async_engine"].observers.remove(recorder)
    assert recorder.classes == [want for _, want in sent]


def test_min_tokens_holds_off_the_end(client) -> None:
    """min_tokens alone (no ignore_eos): a reply that greedy decoding ends early goes on to it."""
    messages = [{"role": "user", "content": "Say hi."}]
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 54
    at_least = short.usage.completion_tokens + 10
    longer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, temperature=0,
                                            extra_body={"min_tokens": at_least})
    assert longer.usage.completion_tokens >= at_least
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)


def test_odd_histories_are_accepted(client) -> None:
    for messages in ([{"role": "assistant", "content": "Hello, how can I help?"}],
                     [{"role": "system", "content": "Be brief."}],
                     [{"role": "user", "content": "Hi"}, {"role": "user", "content": "are you there?"}]):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_echo_with_prompt_logprobs_and_max_tokens_zero(client) -> None:
    got = client.completions.create(model=MODEL, prompt="Hello world, this is", max_tokens=0, echo=True, logprobs=0)
    lp = got.choices[0].logprobs
    assert got.choices[0].text == "Hello world, this is"
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == got.usage.prompt_tokens


def metric(server, name: str) -> float:
    """One unlabelled-or-model-labelled sample of /metrics, as a scraper reads it."""
    for line in httpx.get(server["url"] + "/metrics").text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def seconds_until_back(server, kv_baseline: float, timeout: float = 10.0) -> float:
    """How long until /metrics shows no running request and the KV usage it had before."""
    t0 = time.monotonic()
    while (metric(server, "lockstep:num_requests_running") != 0
           or metric(server, "lockstep:kv_cache_usage_perc") != kv_baseline):
        assert time.monotonic() - t0 < timeout, "the request kept running after its client left"
        time.sleep(0.01)
    return time.monotonic() - t0


LONG = {"model": MODEL, "prompt": "Write a very long story about the sea.", "max_tokens": 2000, "ignore_eos": True}


def test_disconnect_cancels_and_frees_blocks(server) -> None:
    """A dropped SSE stream: within about a second /metrics shows nothing running and the KV usage
    back at its baseline, and the engine holds no sequence."""
    engine = server["engine"]
    wait_idle(engine)
    baseline = metric(server, "lockstep:kv_cache_usage_perc")
    with httpx.stream("POST", server["url"] + "/v1/completions", json={**LONG, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        lines = response.iter_lines()  # kept: dropping the iterator closes the stream
        for _ in range(3):
            while not next(lines).startswith("data: "):
                pass
        assert metric(server, "lockstep:num_requests_running") == 1
        assert metric(server, "lockstep:kv_cache_usage_perc") > baseline
    assert seconds_until_back(server, baseline) < 1.0
    assert engine.kv.allocator.num_sequences() == 0 and not engine.seqs


def test_disconnect_from_a_whole_answer_cancels_it_too(server) -> None:
    """A client that gives up on a non-streamed answer (here: its read timeout) cancels it."""
    engine = server["engine"]
    wait_idle(engine)
    baseline = metric(server, "lockstep:kv_cache_usage_perc")
    for body in (LONG, {**LONG, "n": 2}):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server["url"] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=httpx.Timeout(30, read=0.5))
        assert seconds_until_back(server, baseline) < 1.0, body
        assert engine.kv.allocator.num_sequences() == 0 and not engine.seqs


def test_a_refused_n_request_leaves_nothing_behind(server) -> None:
    """n > 1 prefills the prompt before forking; a request refused at the forks' commit (the
    prompt plus max_tokens over the context) must not leave the prefilled parent holding KV."""
    engine = server["engine"]
    wait_idle(engine)
    body = {"messages": [{"role": "user", "content": "Hi there"}], "n": 2, "max_tokens": engine.max_model_len - 4}
    for _ in range(3):
        r = httpx.post(server["url"] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=30)
        assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
    wait_idle(engine)
    assert engine.kv.allocator.num_sequences() == 0 and not engine.seqs
    assert not server["async_engine"]._unclaimed, "no stream is left waiting for a reader"


BAD = [
    ("invalid JSON", b"{not json", 400),
    ("wrong type", {"prompt": "hi", "max_tokens": "ten"}, 400),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, 400),
    ("huge max_tokens", {"prompt": "hi", "max_tokens": 10**9}, 400),
    ("huge n", {"prompt": "hi", "n": 1000}, 400),
    ("unknown model", {"prompt": "hi", "model": "gpt-9"}, 404),
    ("empty prompt", {"prompt": ""}, 400),
    ("bad temperature", {"prompt": "hi", "temperature": -3}, 400),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400),
    ("body too large", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413),
    ("negative token id", {"prompt": [1, -5, 3]}, 400),
    ("token id past the vocabulary", {"prompt": [2**63]}, 400),
    ("unpaired surrogate", b'{"prompt": "abc \\ud800"}', 400),
    ("stop not text", {"prompt": "hi", "stop": [3]}, 400),
    ("bad latency class", {"prompt": "hi", "latency_class": "urgent"}, 400),
]
BAD_CHAT = [
    ("same-role messages, content not text", {"messages": [{"role": "user", "content": "a"},
                                                           {"role": "user", "content": 5}]}, 400),
    ("message without a role", {"messages": [{"content": "hello"}]}, 400),
    ("message not an object", {"messages": ["hello"]}, 400),
    ("unpaired surrogate in content", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ("unpaired surrogate in a role", b'{"messages": [{"role": "us\\ud800er", "content": "hi"}]}', 400),
    ("text part not text", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400),
]


def post_raw(server, path: str, body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = body if isinstance(body, bytes) else None
    return httpx.post(server["url"] + path, content=raw, json=None if raw else body, headers=headers, timeout=30)


def assert_openai_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status and "Traceback" not in r.text


def assert_still_serving(server) -> None:
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": "still", "max_tokens": 1},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(server, name, body, status) -> None:
    assert_openai_error(post_raw(server, "/v1/completions", body), status)
    assert_still_serving(server)


@pytest.mark.parametrize("name,body,status", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_requests_get_openai_errors(server, name, body, status) -> None:
    assert_openai_error(post_raw(server, "/v1/chat/completions", body), status)
    assert_still_serving(server)


def test_unknown_routes_and_methods_and_unannounced_large_bodies(server) -> None:
    """404 and 405 in OpenAI's error shape too; a body sent in chunks (no Content-Length) is cut
    off at the limit with a 413 instead of being read whole."""
    headers = {"Authorization": f"Bearer {KEY}"}
    assert_openai_error(httpx.get(server["url"] + "/v1/no-such-endpoint", headers=headers), 404)
    r = httpx.get(server["url"] + "/v1/completions", headers=headers)
    assert_openai_error(r, 405)
    assert "POST" in r.headers["allow"], "a 405 names the method that works"
    # Raw HTTP/1.1: 5 MiB of chunks and no end; the 413 must come without the rest of the body.
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"a" * (1 << 20)
        for _ in range(5):
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while not answer.endswith(b"}") and (piece := conn.recv(4096)):
            answer += piece
    head, _, body = answer.decode(errors="replace").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == 413
    assert_still_serving(server)


def test_chat_errors_and_prompt_over_the_context(server, client) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"messages": []}, headers=headers)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    long = "word " * (server["engine"].max_model_len + 10)
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": long}, headers=headers)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=2).choices


def test_api_key_is_required(server) -> None:
    recorder = ClassRecorder()
    server["async_engine"].observers.append(recorder)
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(server["url"] + "/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    finally:
        server["async_engine"].observers.remove(recorder)
    assert recorder.classes == [], "an unauthorized request never reached the engine"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="nope", max_retries=0).models.list()


def test_metrics_are_exposed(server, client) -> None:
    client.completions.create(model=MODEL, prompt="count", max_tokens=3, temperature=0)
    text = httpx.get(server["url"] + "/metrics").text
    for name in ("lockstep:time_to_first_token_seconds", "lockstep:generation_tokens_total",
                 "lockstep:num_requests_running", "lockstep:kv_cache_usage_perc"):
        assert name in text, name


def test_lockstep_serve_command_serves_http_and_grpc(default_model_path) -> None:
    """The CLI end to end: `lockstep serve` in its own process prints a curl example that works,
    answers the openai client and gRPC, then stops cleanly on SIGINT."""
    import os
    import shlex
    import shutil
    import signal
    import subprocess
    import sys

    import grpc

    from lockstep.runtime.grpc_codegen import pb2, pb2_grpc

    ports, banner = [], []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "lockstep.runtime.cli", "serve", "--port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--kv-memory", "64MiB", "--max-num-seqs", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "LOCKSTEP_API_KEY": ""})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{ports[0]}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # Serving implies the banner is out: the curl line it printed, run as printed.
        banner = []
        for line in iter(proc.stdout.readline, ""):
            banner.append(line)
            if line.strip().startswith("curl "):
                break
        curl = banner[-1].strip()
        argv = shlex.split(curl)
        if shutil.which("curl"):
            answer = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout)
        else:  # the same request, made by httpx from the printed command's URL and body
            print("curl is not installed: sending the printed example's request with httpx")
            answer = httpx.post(argv[2], content=argv[argv.index("-d") + 1],
                                headers={"Content-Type": "application/json"}, timeout=60).json()
        assert answer.get("choices") and answer["choices"][0]["message"]["role"] == "assistant", answer
        assert answer["usage"]["completion_tokens"] > 0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[0]}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=client.models.list().data[0].id, prompt="Hello", max_tokens=3,
                                          temperature=0)
        assert reply.usage.completion_tokens == 3
        with grpc.insecure_channel(f"127.0.0.1:{ports[1]}") as channel:
            health = pb2_grpc.LockstepStub(channel).Health(pb2.HealthRequest(), timeout=10)
        assert health.status == "SERVING"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert "serving" in "".join(banner) + out and "Traceback" not in err, err[-2000:]


def test_32_concurrent_streams_each_equal_the_request_alone(server, reference) -> None:
    """32 SSE streams at once: no lost or duplicated tokens, and each stream's tokens are what the
    same request gives alone (batch invariance through the server)."""
    import asyncio

    prompts = [f"Item {i}: a short note about the number {i * 7}" for i in range(32)]
    lengths = [3 + i % 9 for i in range(32)]
    want = [reference.generate([p], SamplingParams(temperature=0.0 if i % 2 else 0.7, seed=i, max_tokens=n,
                                                   ignore_eos=True))[0].output_ids
            for i, (p, n) in enumerate(zip(prompts, lengths))]

    async def one(client: httpx.AsyncClient, i: int) -> list[int]:
        body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0.0 if i % 2 else 0.7, "seed": i,
                "ignore_eos": True, "stream": True, "return_token_ids": True}
        ids = []
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    ids += json.loads(line[6:])["choices"][0].get("token_ids", [])
        return ids

    async def all_streams():
        async with httpx.AsyncClient(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(all_streams()) == want


def test_overload_is_429_and_a_stopped_engine_is_503(make_engine) -> None:
    """A full waiting queue answers 429 (rate_limit_error); once the engine has stopped, requests
    and /health answer 503 at once (they used to wait forever); a KV arena error maps to 503."""
    from fastapi.testclient import TestClient

    from lockstep.runtime.errors import CapacityError

    async_engine, app_server = build_server(make_engine(), MODEL, max_waiting=0)  # every request over the bound
    try:
        with TestClient(app_server.app) as http:
            r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "stream": True})
            assert r.status_code == 429
            assert app_server._lockstep_error(CapacityError("KV arena exhausted")).status_code == 503
            assert http.get("/health").status_code == 200
            async_engine.shutdown()
            for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2})):
                r = http.post(path, json=body)
                assert r.status_code == 503 and "not running" in r.json()["error"]["message"], r.text
            assert http.get("/health").status_code == 503
    finally:
        async_engine.shutdown()


def test_unsupported_fields_are_refused_and_unknown_ones_refused_only_when_strict(server) -> None:
    """A field lockstep cannot honour is a 400 unless it has its neutral value; an unknown one is
    ignored, or a 400 naming it on a strict server (--strict-requests)."""
    from fastapi.testclient import TestClient

    from lockstep.runtime.server import OpenAIServer

    headers = {"Authorization": f"Bearer {KEY}"}
    base = {"model": MODEL, "prompt": "The moon is", "max_tokens": 2, "temperature": 0}
    post = lambda body: httpx.post(server["url"] + "/v1/completions", json=body, headers=headers, timeout=30)  # noqa: E731
    r = post({**base, "presence_penalty": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"
    assert "not supported" in r.json()["error"]["message"]
    want = post(base).json()["choices"][0]["text"]
    for extra in ({"presence_penalty": 0}, {"user": "someone"}, {"made_up_field": 1}):
        r = post({**base, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (extra, r.text)

    strict = OpenAIServer(server["async_engine"], MODEL, api_key=KEY, strict=True)
    with TestClient(strict.app) as http:
        r = http.post("/v1/completions", json={**base, "made_up_field": 1, "another": 2}, headers=headers)
        assert r.status_code == 400 and "'another', 'made_up_field'" in r.json()["error"]["message"]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "echo": True}
        r = http.post("/v1/chat/completions", json=chat, headers=headers)  # echo is a completions field
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        chat.pop("echo")
        r = http.post("/v1/chat/completions", json={**chat, "user": "u", "stop_token_ids": [2]}, headers=headers)
        assert r.status_code == 200, r.text


def test_prompts_and_outputs_are_logged_only_when_asked(make_engine, caplog) -> None:
    from fastapi.testclient import TestClient

    secret = "my account number is 12345"
    body = {"prompt": secret, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    caplog.set_level(logging.DEBUG, logger="lockstep")
    for log_requests in (False, True):
        caplog.clear()
        async_engine, app_server = build_server(make_engine(), MODEL, log_requests=log_requests)
        try:
            with TestClient(app_server.app) as http:
                reply = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        finally:
            async_engine.shutdown()
        logged = "\n".join(r.getMessage() for r in caplog.records)
        if not log_requests:
            assert secret not in logged and (not reply.strip() or reply not in logged)
        else:
            assert secret in logged and repr(reply) in logged and "length after 3 tokens" in logged
