"""`lockstep bench serve` against a real lockstep server (uvicorn on loopback, with an API key),
parsed by the real `lockstep` command line.

The figures are checked against counts made here, independently of the load generator: the
prompts' token counts from the engine's own tokenizer, the chunks per reply from streaming the
same prompts ourselves. No timing is asserted (a benchmark is never a timed test), only the
relations that hold at any speed.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from lockstep.bench import load
from lockstep.runtime.cli import build_parser
from lockstep.runtime.serve import build_server

KEY = "bench-key"
MODEL = "smollm2"
NUM_PROMPTS, OUTPUT_TOKENS, PROMPT_TOKENS = 4, 4, 16
POINTS = [("concurrency", 1), ("concurrency", 2), ("rate", "inf")]
VLLM_KEYS = ["completed", "failed", "total_input_tokens", "total_output_tokens", "duration", "request_throughput",
             "output_throughput", "total_token_throughput", "request_goodput"] + [
    f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p90",
                                                                                   "p99")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(make_engine):
    engine = make_engine(kv_memory_bytes=64 << 20)
    async_engine, app_server = build_server(engine, MODEL, api_key=KEY, max_waiting=64)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app_server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine}
    uv.should_exit = True
    thread.join(10)
    async_engine.shutdown()


def bench(argv: list[str]) -> tuple[int, str, str]:
    """Runs `lockstep bench serve ARGV` through the real parser; (exit code, stdout, stderr)."""
    args = build_parser().parse_args(["bench", "serve", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.bench_run(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    rc, stdout, stderr = bench(["--url", server["url"], "--api-key", KEY, "--out", str(out), "--no-progress",
                                "--num-prompts", str(NUM_PROMPTS), "--output-tokens", str(OUTPUT_TOKENS),
                                "--prompt-tokens", str(PROMPT_TOKENS), "--concurrency", "1", "2",
                                "--request-rate", "inf", "--seed", "3", "--slo-ttft-ms", "60000",
                                "--slo-tpot-ms", "60000"])
    assert rc == 0, stderr
    record = json.loads((out / "serve.json").read_text())
    return {"out": out, "stdout": stdout, "stderr": stderr, "record": record, "points": record["results"]["points"]}


def test_report_has_environment_and_vllm_keys(sweep) -> None:
    record = sweep["record"]
    assert record["schema_version"] >= 1 and record["mode"] == "serve"
    env = record["environment"]
    assert env["git_commit"] and env["date"] and env["versions"]["python"]
    results = record["results"]
    assert results["model"] == MODEL and results["endpoint"] == "completions"  # the model came from /v1/models
    assert [(p["kind"], p["value"]) for p in sweep["points"]] == POINTS
    for point in sweep["points"]:
        missing = [k for k in VLLM_KEYS if k not in point]
        assert not missing, (point["kind"], point["value"], missing)
        assert all(point[k] is not None for k in VLLM_KEYS)
        # Raw samples stay out of the JSON.
        assert not any(isinstance(v, list) and len(v) > 5 for v in point.values())


def test_token_totals_match_independent_counts(sweep, server) -> None:
    """Every request completes with exactly OUTPUT_TOKENS tokens, and the input totals are the
    prompts' lengths under the server's tokenizer (each point sends its own fresh prompts)."""
    prompts = load.build_prompts(NUM_PROMPTS * len(POINTS), PROMPT_TOKENS, seed=3)
    assert len(set(prompts)) == len(prompts)
    tokenizer = server["engine"].tokenizer
    for k, point in enumerate(sweep["points"]):
        assert point["completed"] == NUM_PROMPTS and point["failed"] == 0, point["errors"]
        assert point["total_output_tokens"] == NUM_PROMPTS * OUTPUT_TOKENS
        want_in = sum(len(tokenizer.encode(p)) for p in prompts[k * NUM_PROMPTS:(k + 1) * NUM_PROMPTS])
        assert point["total_input_tokens"] == want_in
        assert point["short_outputs"] == 0 and point["missing_usage"] == 0
        # Every request met the (generous) SLOs: goodput is the request throughput.
        assert point["request_goodput"] == pytest.approx(point["request_throughput"])
        duration = point["duration"]
        assert point["output_throughput"] == pytest.approx(point["total_output_tokens"] / duration)
        assert point["total_token_throughput"] == pytest.approx((want_in + NUM_PROMPTS * OUTPUT_TOKENS) / duration)
    # About PROMPT_TOKENS tokens per prompt (one word ~ one token; a final period, maybe a BOS).
    mean_in = sweep["points"][0]["total_input_tokens"] / NUM_PROMPTS
    assert PROMPT_TOKENS <= mean_in <= 1.5 * PROMPT_TOKENS + 2


def test_itl_samples_are_one_per_token_and_tpot_lies_in_their_range(sweep, server) -> None:
    """lockstep streams one chunk per token (checked here with return_token_ids on the same
    prompts), so each request gives OUTPUT_TOKENS - 1 ITL samples; a request's TPOT is the mean
    of its gaps (plus the last chunk's short way to the end of the stream)."""
    prompts = load.build_prompts(NUM_PROMPTS * len(POINTS), PROMPT_TOKENS, seed=3)

    async def chunks(client: httpx.AsyncClient, prompt: str) -> tuple[list[int], int]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "min_tokens": OUTPUT_TOKENS,
                "ignore_eos": True, "temperature": 0, "stream": True, "return_token_ids": True}
        ids_per_chunk, text_chunks = [], 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    if choice.get("token_ids"):
                        ids_per_chunk.append(len(choice["token_ids"]))
                    text_chunks += bool(choice["text"])
        return ids_per_chunk, text_chunks

    async def all_prompts():
        async with httpx.AsyncClient(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as client:
            return await asyncio.gather(*(chunks(client, p) for p in prompts))

    streamed = asyncio.run(all_prompts())
    for ids_per_chunk, text_chunks in streamed:
        assert ids_per_chunk == [1] * OUTPUT_TOKENS  # one token per chunk
        assert text_chunks == OUTPUT_TOKENS  # and no token's text held back on these prompts
    for point in sweep["points"]:
        assert point["num_itl_samples"] == point["completed"] * (OUTPUT_TOKENS - 1)
        assert point["min_itl_ms"] <= point["median_itl_ms"] <= point["p99_itl_ms"] <= point["max_itl_ms"]
        assert point["min_itl_ms"] <= point["median_tpot_ms"] <= 1.05 * point["max_itl_ms"] + 5
        assert point["median_ttft_ms"] <= point["median_e2el_ms"]


def test_markdown_plots_and_output(sweep) -> None:
    out = sweep["out"]
    for name in ("serve_ttft_cdf.png", "serve_itl_cdf.png", "serve_throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"wrote {out / name}" in sweep["stderr"]
    markdown = (out / "serve.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith(("| concurrency", "| rate"))]
    assert [row.split("|")[1:3] for row in rows] == [[" concurrency ", " 1 "], [" concurrency ", " 2 "],
                                                      [" rate ", " inf "]]
    assert all(f"| {NUM_PROMPTS}/0 |" in row for row in rows)
    assert rows[0] in sweep["stdout"] and "warning" not in markdown
    assert "Traceback" not in sweep["stderr"]


def test_chat_endpoint_and_a_v1_url(server, tmp_path) -> None:
    """The chat endpoint: the opening role-only chunk is not the first token, and the prompt
    totals are the chat template's lengths."""
    rc, _, stderr = bench(["--url", server["url"] + "/v1/", "--api-key", KEY, "--model", MODEL, "--endpoint", "chat",
                           "--out", str(tmp_path), "--no-progress", "--num-prompts", "2", "--output-tokens", "3",
                           "--prompt-tokens", "8", "--concurrency", "2", "--seed", "5"])
    assert rc == 0, stderr
    (point,) = json.loads((tmp_path / "serve.json").read_text())["results"]["points"]
    engine = server["engine"]
    want_in = sum(len(engine.encode_chat([{"role": "user", "content": p}])) for p in load.build_prompts(2, 8, 5))
    assert (point["completed"], point["failed"], point["total_output_tokens"]) == (2, 0, 6)
    assert point["total_input_tokens"] == want_in
    assert point["num_itl_samples"] == 2 * (3 - 1)


def test_unreachable_server_is_one_clear_line(tmp_path) -> None:
    port = free_port()  # nothing listens there
    rc, _, stderr = bench(["--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert f"cannot reach http://127.0.0.1:{port}" in stderr and "lockstep serve" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_wrong_key_and_unknown_model_are_clear_errors(server, tmp_path) -> None:
    common = ["--url", server["url"], "--out", str(tmp_path), "--no-progress", "--num-prompts", "1"]
    rc, _, stderr = bench([*common, "--api-key", "wrong"])
    assert rc == 2 and "--api-key" in stderr and "401" in stderr and "Traceback" not in stderr
    rc, _, stderr = bench([*common, "--api-key", KEY, "--model", "gpt-9"])
    assert rc == 2 and "gpt-9" in stderr and "404" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "serve.json").exists()


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--request-rate", "-1"], ["--num-prompts", "x"],
                                  ["--endpoint", "embeddings"], ["--timeout", "0"]])
def test_bad_option_values_are_argparse_errors(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench", "serve", *argv])
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_bad_url_is_one_clear_line(tmp_path, capsys) -> None:
    args = build_parser().parse_args(["bench", "serve", "--url", "localhost:8000", "--out", str(tmp_path)])
    assert args.bench_run(args) == 2
    err = capsys.readouterr().err
    assert "http://" in err and "Traceback" not in err


def test_poisson_gaps_have_the_rate_and_repeat_by_seed() -> None:
    gaps = load.poisson_gaps(2000, 5.0, random.Random(0))
    assert sum(gaps) / len(gaps) == pytest.approx(0.2, rel=0.1)
    assert min(gaps) >= 0 and len(set(gaps)) == len(gaps)
    assert gaps == load.poisson_gaps(2000, 5.0, random.Random(0))
    assert load.poisson_gaps(3, float("inf"), random.Random(0)) == [0.0, 0.0, 0.0]
    # An exponential's std equals its mean: a check that the gaps are not merely evenly spaced.
    mean = sum(gaps) / len(gaps)
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std == pytest.approx(0.2, rel=0.15)


def test_prompts_repeat_by_seed_and_extend_as_a_prefix() -> None:
    assert load.build_prompts(3, 10, seed=1) == load.build_prompts(6, 10, seed=1)[:3]
    assert load.build_prompts(3, 10, seed=1) != load.build_prompts(3, 10, seed=2)
    assert all(len(p.split()) == 10 for p in load.build_prompts(5, 10, seed=0))


def test_a_failed_request_is_counted_not_fatal(server, tmp_path, monkeypatch) -> None:
    """A request that fails mid-sweep (here: the connection drops) is counted and reported; the
    run goes on and the others complete."""
    doomed = load.build_prompts(3, 8, seed=9)[1]
    stream = load.Client._stream

    async def flaky(self, body, result):
        if body.get("prompt") == doomed:
            result.send = time.perf_counter()
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        return await stream(self, body, result)

    monkeypatch.setattr(load.Client, "_stream", flaky)
    rc, stdout, stderr = bench(["--url", server["url"], "--api-key", KEY, "--out", str(tmp_path), "--no-progress",
                                "--num-prompts", "3", "--output-tokens", "2", "--prompt-tokens", "8",
                                "--concurrency", "2", "--seed", "9"])
    assert rc == 0, stderr
    (point,) = json.loads((tmp_path / "serve.json").read_text())["results"]["points"]
    assert (point["completed"], point["failed"], point["total_output_tokens"]) == (2, 1, 4)
    assert list(point["errors"].values()) == [1] and "RemoteProtocolError" in next(iter(point["errors"]))
    assert "1 of 3 requests failed" in stderr and "1 of 3 requests failed" in stdout
