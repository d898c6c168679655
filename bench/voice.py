"""`lockstep bench voice`: full-duplex voice latency through the real gRPC Session.

By default a server runs in-process (AsyncEngine + serve_grpc on a free loopback port, over the
model from the model options); with `--target host:port` the client talks to a running
`lockstep serve` instead (`--api-key` if it has one). The client is a grpc.aio client, as any
voice front end would be.

One session, `--turns` turns. In each turn:
  1. the user speaks: the turn's sentence (a fixed list, so runs compare) is appended word by
     word, one piece every `--piece-ms`; the server prefills each piece as it arrives;
  2. end of input: `commit` is sent --piece-ms after the last piece. End-of-input -> first token
     is the time from sending commit to receiving the first Token of that response_id;
  3. the reply runs `--reply-tokens` tokens (greedy, EOS ignored), or on a barge-in turn (every
     `--barge-in-every`-th turn) the client sends `cancel` after `--barge-in-after` tokens (the
     reply may run far longer, so only the cancel can stop it). Cancel -> last token is the
     time from sending cancel to the ReplyFinished of that response; tokens of that response
     received after the cancel was sent are counted.
The baseline, in the same run: a second session with the same turns (and the same barge-ins),
each turn's text appended whole and committed at once, so its prefill happens after commit. The
ratio of the two first-token latencies is what incremental prefill buys. The two sessions start
with different system prompts, so neither reuses the other's cached prefix.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field

HELP = "End-of-input -> first-token and cancel latency of full-duplex voice sessions over gRPC."
EXAMPLES = """examples:
  lockstep bench voice                                     # in-process server, default model, 20 turns
  lockstep bench voice --turns 40 --piece-ms 100 --reply-tokens 32
  lockstep bench voice --target 127.0.0.1:50051 --api-key s3cret   # a running `lockstep serve`
  lockstep bench voice --barge-in-every 1 --barge-in-after 4 --out results/voice
"""

SENTENCES = (
    "Hey, can you tell me what the weather looks like for tomorrow morning in the city?",
    "I was thinking about going for a run before work, is that a good idea?",
    "Remind me to call my sister after lunch, she wanted to talk about the trip.",
    "What is a quick recipe for dinner that uses rice, beans and some spinach?",
    "Okay, and how long should I let the rice cook before I add the beans?",
    "Could you read me the first three items on my shopping list again, please?",
    "Actually wait, add olive oil and a loaf of bread to that list as well.",
    "How far is it from here to the train station if I walk at a normal pace?",
    "Set a timer for twelve minutes and tell me when it is halfway done.",
    "What was the name of that song we listened to yesterday in the car?",
    "Tell me a short story about a fox who learns to play the violin.",
    "That is lovely, but can you make the ending a little bit happier?",
    "Explain in simple words why the sky looks orange when the sun goes down.",
    "I need to send an email to my manager saying I will be ten minutes late.",
    "Make it sound a bit more polite and mention that the train was delayed.",
    "Which planets can I see in the night sky this week without a telescope?",
    "What is the difference between a violin and a viola, in a sentence or two?",
    "Can you help me plan a small birthday party for eight people on Saturday?",
    "Good idea. What kind of cake would most children like at a party like that?",
    "Thanks, that is all for now. Please summarise what we planned today.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lockstep.runtime.cli import add_model_args

    parser.add_argument("--turns", type=int, default=20, help="turns of the session (default: 20)")
    parser.add_argument("--piece-ms", type=float, default=150.0,
                        help="time between the word pieces the user speaks, and from the last one to commit "
                             "(default: 150)")
    parser.add_argument("--reply-tokens", type=int, default=24,
                        help="tokens of a reply that is not interrupted (default: 24)")
    parser.add_argument("--barge-in-every", type=int, default=2, metavar="K",
                        help="every K-th turn is a barge-in, the 2nd, 4th, ... for K=2; 0: none (default: 2)")
    parser.add_argument("--barge-in-after", type=int, default=None, metavar="N",
                        help="tokens of a reply heard before the barge-in cancel (default: half of --reply-tokens)")
    parser.add_argument("--target", default=None, metavar="HOST:PORT",
                        help="the gRPC address of a running `lockstep serve` (default: a server in this process)")
    parser.add_argument("--api-key", default=os.environ.get("LOCKSTEP_API_KEY") or None,
                        help="the --target server's API key (default: $LOCKSTEP_API_KEY, else none)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for any one event before giving up (default: 60)")
    add_model_args(parser)


class BenchError(Exception):
    """Something the user can act on: printed as one line, exit code 2."""


@dataclass
class Turn:
    text: str
    barge_in: bool


@dataclass
class SessionFigures:
    first_token_s: list[float] = field(default_factory=list)
    cancel_to_finished_s: list[float] = field(default_factory=list)
    cancel_to_ack_s: list[float] = field(default_factory=list)
    tokens_after_cancel: list[int] = field(default_factory=list)
    reply_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)


class StepTimes:
    """An AsyncEngine observer that keeps the engine's step times (in-process server only)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_added(self, seq, now) -> None:
        pass

    def on_forked(self, parent, children, now) -> None:
        pass

    def on_step(self, engine, seconds) -> None:
        self.seconds.append(seconds)

    def on_outputs(self, outputs, now) -> None:
        pass


def make_turns(n: int, every: int) -> list[Turn]:
    return [Turn(SENTENCES[i % len(SENTENCES)], every > 0 and (i + 1) % every == 0) for i in range(n)]


class _Events:
    """Reads a Session's events into a queue, each stamped with the time it arrived."""

    def __init__(self, call, timeout: float) -> None:
        self.call = call
        self.timeout = timeout
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import grpc

        try:
            while True:
                event = await self.call.read()
                now = time.perf_counter()
                if event is grpc.aio.EOF:
                    self.queue.put_nowait((now, None))
                    return
                self.queue.put_nowait((now, event))
        except grpc.aio.AioRpcError as exc:
            self.queue.put_nowait((time.perf_counter(), exc))

    async def next(self):
        """(arrival time, event); raises BenchError for an error event, a failed call or the end."""
        try:
            when, event = await asyncio.wait_for(self.queue.get(), self.timeout)
        except asyncio.TimeoutError:
            raise BenchError(f"no session event for {self.timeout:.0f} s (raise --timeout on a slow machine)") from None
        if event is None:
            raise BenchError("the server ended the session early")
        if isinstance(event, Exception):
            raise BenchError(f"the session failed: {event.code().name}: {event.details()}")
        if event.WhichOneof("event") == "error":
            raise BenchError(f"the server refused a request: {event.error.code}: {event.error.message}")
        return when, event


async def run_session(stub, metadata, turns: list[Turn], incremental: bool, args, tag: str, progress) -> SessionFigures:
    """One session over all turns; incremental: word pieces every --piece-ms, else whole at commit."""
    from lockstep.runtime.grpc_codegen import pb2

    figures = SessionFigures()
    call = stub.Session(metadata=metadata)
    events = _Events(call, args.timeout)
    piece_s = args.piece_ms / 1000
    greedy = pb2.SamplingOptions(temperature=0.0, max_tokens=args.reply_tokens, ignore_eos=True)
    try:
        system = f"[{tag}] You are a friendly voice assistant. Answer briefly and clearly."
        await call.write(pb2.SessionRequest(start=pb2.SessionStart(sampling=greedy, system_prompt=system)))
        for turn in turns:
            words = turn.text.split()
            if incremental:
                for word in words:
                    await call.write(pb2.SessionRequest(append=pb2.Append(text=" " + word)))
                    await asyncio.sleep(piece_s)
            else:
                await call.write(pb2.SessionRequest(append=pb2.Append(text=" " + " ".join(words))))
            # A barge-in reply could run far past the cancel: only the cancel stops it.
            max_tokens = args.barge_in_after + 64 + args.reply_tokens if turn.barge_in else args.reply_tokens
            sampling = pb2.SamplingOptions(max_tokens=max_tokens)
            committed = time.perf_counter()
            await call.write(pb2.SessionRequest(commit=pb2.Commit(sampling=sampling)))
            response_id = None
            tokens, cancelled_at, after_cancel = 0, None, 0
            while True:
                when, event = await events.next()
                kind = event.WhichOneof("event")
                if kind == "reply_started":
                    response_id = event.reply_started.response_id
                elif kind == "token" and response_id is not None and event.token.response_id == response_id:
                    tokens += 1
                    if tokens == 1:
                        figures.first_token_s.append(when - committed)
                    if cancelled_at is not None and when > cancelled_at:
                        after_cancel += 1
                    if turn.barge_in and cancelled_at is None and tokens >= args.barge_in_after:
                        cancelled_at = time.perf_counter()
                        await call.write(pb2.SessionRequest(cancel=pb2.Cancel(keep_partial=False)))
                elif kind == "reply_finished" and event.reply_finished.response_id == response_id:
                    figures.reply_tokens.append(tokens)
                    figures.finish_reasons.append(event.reply_finished.finished.finish_reason)
                    if cancelled_at is None:
                        break
                    figures.cancel_to_finished_s.append(when - cancelled_at)
                    figures.tokens_after_cancel.append(after_cancel)
                elif kind == "cancelled":
                    figures.cancel_to_ack_s.append(when - cancelled_at)
                    break
            progress.update(1)
        await call.done_writing()
        while True:
            _, event = await events.next()
            if event.WhichOneof("event") == "end":
                break
    finally:
        if not events.task.done():
            events.task.cancel()
        call.cancel()
    return figures


async def _wait_for_no_sequences(ae, timeout: float = 10.0) -> int:
    alloc = ae.engine.kv.allocator
    deadline = time.monotonic() + timeout
    while (n := await ae.call(lambda: alloc.num_sequences() + len(ae.engine.seqs))) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return n


async def _check_target(stub, metadata, target: str) -> None:
    import grpc
    from lockstep.runtime.grpc_codegen import pb2

    try:
        health = await stub.Health(pb2.HealthRequest(), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise BenchError(f"{target} refused the API key ({exc.details()}); pass the server's key with --api-key "
                             "or $LOCKSTEP_API_KEY") from None
        raise BenchError(f"cannot reach a lockstep gRPC server at {target} ({exc.code().name}); is `lockstep serve` "
                         "running there, and is that its --grpc-port?") from None
    if health.status != "SERVING":
        raise BenchError(f"the server at {target} answers {health.status}: its engine is not running")


async def _measure(args, turns: list[Turn]) -> dict:
    import grpc
    from lockstep.runtime.grpc_codegen import pb2, pb2_grpc
    from tqdm import tqdm

    ae = server = None
    steps = StepTimes()
    model_name = None
    try:
        if args.target is None:
            from lockstep.runtime.async_engine import AsyncEngine
            from lockstep.runtime.cli import engine_from_args
            from lockstep.runtime.grpc_service import serve_grpc

            engine, model = engine_from_args(args)
            model_name = str(getattr(model, "source", args.model))
            ae = AsyncEngine(engine, observers=[steps]).start()
            server = await serve_grpc(ae, port=0)
            target, metadata = f"127.0.0.1:{server.bound_port}", None
        else:
            target = args.target
            metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb2_grpc.LockstepStub(channel)
            await _check_target(stub, metadata, target)
            # Warm-up: first touch of weights and workspaces, outside the figures.
            warm = pb2.GenerateRequest(text="Hello there.", sampling=pb2.SamplingOptions(
                max_tokens=2, temperature=0.0, ignore_eos=True))
            [r async for r in stub.Generate(warm, metadata=metadata, timeout=args.timeout)]
            steps.seconds.clear()
            run_tag = os.urandom(4).hex()  # no prefix of an earlier run is cached on a long-lived server
            with tqdm(total=2 * len(turns), desc="turns", disable=args.no_progress, file=sys.stderr) as progress:
                incremental = await run_session(stub, metadata, turns, True, args,
                                                f"voice bench {run_tag}, incremental input", progress)
                whole = await run_session(stub, metadata, turns, False, args,
                                          f"voice bench {run_tag}, whole at commit", progress)
            end = {}
            if ae is not None:
                end["live_sequences_at_end"] = await _wait_for_no_sequences(ae)
            health = await stub.Health(pb2.HealthRequest(), metadata=metadata, timeout=10)
            end["server_running_at_end"], end["server_waiting_at_end"] = health.num_running, health.num_waiting
        return {"target": args.target or "in-process", "model": model_name, "incremental": incremental,
                "whole": whole, "step_s": list(steps.seconds) if ae is not None else None, **end}
    finally:
        if server is not None:
            await asyncio.sleep(0.1)  # lets the closed channel's connection go first: no GOAWAY log line
            await server.stop(None)
        if ae is not None:
            ae.shutdown()


def _session_results(f: SessionFigures, summary, percentile) -> dict:
    return {"first_token_ms": summary(f.first_token_s), "cancel_to_last_token_ms": summary(f.cancel_to_finished_s),
            "cancel_to_ack_ms": summary(f.cancel_to_ack_s),
            "tokens_after_cancel": {"n": len(f.tokens_after_cancel),
                                    "max": max(f.tokens_after_cancel) if f.tokens_after_cancel else None,
                                    "p99": percentile(f.tokens_after_cancel, 99) if f.tokens_after_cancel else None,
                                    "values": f.tokens_after_cancel},
            "reply_tokens": f.reply_tokens, "finish_reasons": f.finish_reasons}


def run(args: argparse.Namespace) -> int:
    from . import plots
    from .report import markdown_table, write_report
    from .stats import percentile, summary

    if args.barge_in_after is None:
        args.barge_in_after = max(1, args.reply_tokens // 2)
    if args.turns < 1 or args.reply_tokens < 1 or args.barge_in_after < 1 or args.barge_in_every < 0 \
            or args.piece_ms < 0 or args.timeout <= 0:
        print("lockstep bench voice: --turns, --reply-tokens and --barge-in-after must be >= 1, --barge-in-every "
              ">= 0, --piece-ms >= 0, --timeout > 0", file=sys.stderr)
        return 2
    turns = make_turns(args.turns, args.barge_in_every)
    try:
        measured = asyncio.run(_measure(args, turns))
    except BenchError as exc:
        print(f"lockstep bench voice: error: {exc}", file=sys.stderr)
        return 2

    inc, whole = measured["incremental"], measured["whole"]
    r_inc, r_whole = _session_results(inc, summary, percentile), _session_results(whole, summary, percentile)
    p50_inc, p50_whole = r_inc["first_token_ms"]["p50"], r_whole["first_token_ms"]["p50"]
    results = {
        "target": measured["target"], "model": measured["model"], "turns": args.turns,
        "barge_in_turns": sum(t.barge_in for t in turns), "piece_ms": args.piece_ms,
        "reply_tokens": args.reply_tokens, "barge_in_after": args.barge_in_after,
        "method": "end-of-input -> first token: commit sent -> first Token of its response_id; cancel -> last "
                  "token: cancel sent -> ReplyFinished of that response; tokens after cancel: that response's "
                  "tokens received after the cancel was sent. incremental: word pieces appended every piece_ms "
                  "(prefilled as they arrive), commit piece_ms after the last; whole_at_commit: the same text in "
                  "one append followed at once by commit.",
        "incremental": r_inc, "whole_at_commit": r_whole,
        "first_token_p50_ratio": p50_whole / p50_inc if p50_inc and p50_whole else None,
        "engine_step_ms": summary(measured["step_s"]) if measured["step_s"] is not None else None,
        **{k: v for k, v in measured.items() if k.endswith("_at_end")},
    }
    rows = [["end of input → first token, incremental", *_cells(r_inc["first_token_ms"])],
            ["end of input → first token, whole at commit", *_cells(r_whole["first_token_ms"])],
            ["cancel → last token (ReplyFinished)", *_cells(r_inc["cancel_to_last_token_ms"])],
            ["cancel → Cancelled ack", *_cells(r_inc["cancel_to_ack_ms"])]]
    if results["engine_step_ms"] is not None:
        rows.append(["engine step (for reference)", *_cells(results["engine_step_ms"])])
    table = markdown_table(["latency (ms)", "n", "p50", "p90", "p99", "max"], rows)
    after = r_inc["tokens_after_cancel"]
    after_p99 = "-" if after["p99"] is None else f"{after['p99']:.1f}"
    ratio = results["first_token_p50_ratio"]
    note = (f"\n{args.turns} turns ({results['barge_in_turns']} barge-ins after {args.barge_in_after} tokens), a word "
            f"piece every {args.piece_ms:g} ms, {args.reply_tokens}-token replies, greedy; server: "
            f"{measured['target']}{', ' + measured['model'] if measured['model'] else ''}. "
            f"Incremental prefill: first token {f'{ratio:.2f}x' if ratio else '-'} sooner at p50 than sending the "
            f"turn whole at commit. Tokens received after a cancel was sent: max {after['max']}, "
            f"p99 {after_p99}.\n")
    paths = write_report(args.out, "voice", results, table + note)
    _plot(plots, args.out, inc, whole)
    print(table + note)
    print(f"wrote {paths['json']}, {paths['markdown']} and plots in {args.out}", file=sys.stderr)
    return 0


def _plot(plots, out, inc: SessionFigures, whole: SessionFigures) -> None:
    plots.latency_cdf(out / "voice_first_token_cdf.png",
                      {"incremental prefill": [1000 * t for t in inc.first_token_s],
                       "whole at commit": [1000 * t for t in whole.first_token_s]},
                      "end of input → first token")
    plots.latency_cdf(out / "voice_cancel_cdf.png",
                      {"cancel → last token": [1000 * t for t in inc.cancel_to_finished_s],
                       "cancel → ack": [1000 * t for t in inc.cancel_to_ack_s]},
                      "barge-in: cancel → end of the reply")


def _cells(s: dict) -> list:
    return [s["n"], s["p50"], s["p90"], s["p99"], s["max"]]
