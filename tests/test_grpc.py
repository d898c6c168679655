"""The gRPC service (runtime/grpc_service.py): a real server on loopback, a real grpcio client, the
default model.

Expectations are other runs of lockstep: a streamed Generate equals Engine.generate alone, and a
session's second reply equals a plain request over the conversation the session says it holds.
"""
from __future__ import annotations

import asyncio
import time
from importlib import resources

import grpc
import pytest

from lockstep.runtime.async_engine import AsyncEngine
from lockstep.runtime.grpc_codegen import pb2, pb2_grpc
from lockstep.runtime.grpc_service import serve_grpc
from lockstep.runtime.sampling_params import SamplingParams

PROMPT = "The first rule of the garden is"


class CountingObserver:
    """Counts the requests the engine accepted (to prove a refused call never reached it)."""

    def __init__(self) -> None:
        self.added = 0

    def on_added(self, seq, now) -> None:
        self.added += 1

    def on_forked(self, parent, children, now) -> None:
        pass

    def on_step(self, engine, seconds) -> None:
        pass

    def on_outputs(self, outputs, now) -> None:
        pass


def run_with_server(make_engine, body, api_key: str | None = None, max_waiting: int = 256):
    """Runs `body(stub, async_engine, observer)` against a served engine; always stops both."""
    observer = CountingObserver()
    ae = AsyncEngine(make_engine(), max_waiting=max_waiting, observers=[observer]).start()

    async def main():
        server = None
        try:
            server = await serve_grpc(ae, port=0, api_key=api_key)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
                return await body(pb2_grpc.LockstepStub(channel), ae, observer)
        finally:
            if server is not None:
                await server.stop(None)
    try:
        return asyncio.run(main())
    finally:
        ae.shutdown()


async def num_sequences(ae: AsyncEngine) -> int:
    return await ae.call(lambda: ae.engine.kv.allocator.num_sequences())


async def wait_for_no_sequences(ae: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (n := await num_sequences(ae)) != 0:
        assert time.monotonic() < deadline, f"{n} sequences still hold KV blocks"
        await asyncio.sleep(0.02)


def test_the_proto_ships_in_the_package() -> None:
    assert (resources.files("lockstep.runtime") / "lockstep.proto").is_file()


def test_generate_streams_what_the_engine_generates_alone(make_engine) -> None:
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    want = make_engine().generate([PROMPT], sp)[0]

    async def body(stub, ae, observer):
        sampling = pb2.SamplingOptions(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
        return [r async for r in stub.Generate(pb2.GenerateRequest(text=PROMPT, sampling=sampling))]
    responses = run_with_server(make_engine, body)
    tokens = [r.token for r in responses if r.WhichOneof("event") == "token"]
    assert [r.WhichOneof("event") for r in responses] == ["token"] * 8 + ["finished"]
    assert [t.token_id for t in tokens] == want.output_ids
    assert [t.logprob for t in tokens] == pytest.approx(want.logprobs, abs=0, rel=0)
    finished = responses[-1].finished
    assert "".join(t.text for t in tokens) + finished.text == want.text
    assert finished.finish_reason == "length"
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (len(want.prompt_ids), 8)


async def next_event(call, kind: str | None = None):
    """The next event (skipping tokens when waiting for another kind)."""
    while True:
        event = await asyncio.wait_for(call.read(), 30)
        assert event is not grpc.aio.EOF, "the session ended early"
        if kind is None or event.WhichOneof("event") == kind:
            return event
        assert event.WhichOneof("event") == "token", f"expected {kind}, got {event}"


def test_session_append_commit_cancel_truncate_and_reply_again(make_engine) -> None:
    tokenizer = make_engine().tokenizer
    pieces = ["The first rule", " of the garden", " is"]

    async def body(stub, ae, observer):
        call = stub.Session()
        greedy = pb2.SamplingOptions(temperature=0.0, max_tokens=200, ignore_eos=True)
        await call.write(pb2.SessionRequest(start=pb2.SessionStart(sampling=greedy)))
        counts = []
        for piece in pieces:
            await call.write(pb2.SessionRequest(append=pb2.Append(text=piece)))
            counts.append((await next_event(call, "appended")).appended.num_tokens)
        prompt_ids = tokenizer.encode(pieces[0]) + [t for p in pieces[1:] for t in tokenizer.encode(p, add_bos=False)]
        assert counts[-1] == len(prompt_ids) and counts == sorted(counts)
        # Prefilled as it arrived: before any commit the engine has computed the whole input.
        deadline = time.monotonic() + 10
        while (computed := await ae.call(lambda: [s.num_computed for s in ae.engine.seqs.values()])) \
                != [len(prompt_ids)]:
            assert time.monotonic() < deadline, f"the input was not prefilled before commit: {computed}"
            await asyncio.sleep(0.01)

        # Reply 1, cancelled (barge-in) after three tokens, the partial reply kept.
        await call.write(pb2.SessionRequest(commit=pb2.Commit()))
        started = (await next_event(call, "reply_started")).reply_started
        first = []
        while len(first) < 3:
            event = await next_event(call)
            assert event.WhichOneof("event") == "token"
            first.append(event.token)
        await call.write(pb2.SessionRequest(cancel=pb2.Cancel(keep_partial=True)))
        events = []
        while (event := await next_event(call)).WhichOneof("event") != "cancelled":
            events.append(event)
        cancelled = event.cancelled
        assert cancelled.response_id == started.response_id
        assert events[-1].WhichOneof("event") == "reply_finished", "the reply's end comes before the ack"
        finished = events[-1].reply_finished
        assert finished.finished.finish_reason == "cancelled"
        first += [e.token for e in events[:-1]]
        assert all(t.response_id == started.response_id for t in first)
        assert [t.position for t in first] == list(range(len(prompt_ids), len(prompt_ids) + len(first)))
        assert len(first) < 200, "the cancel stopped the reply"
        assert cancelled.num_tokens == len(prompt_ids) + len(first)
        assert await num_sequences(ae) == 0, "a cancelled reply frees its blocks by the ack"

        # The user heard two tokens of it: cut there, speak again, and get a second reply.
        heard = len(prompt_ids) + 2
        await call.write(pb2.SessionRequest(truncate=pb2.Truncate(num_tokens=heard)))
        event = await next_event(call)  # strictly the next event: no token of the cancelled reply
        assert event.WhichOneof("event") == "truncated" and event.truncated.num_tokens == heard
        await call.write(pb2.SessionRequest(append=pb2.Append(text=" Also,")))
        appended = (await next_event(call, "appended")).appended.num_tokens
        await call.write(pb2.SessionRequest(commit=pb2.Commit(sampling=pb2.SamplingOptions(max_tokens=4))))
        second = (await next_event(call, "reply_started")).reply_started
        assert second.response_id > started.response_id and second.num_tokens == appended
        tokens = []
        while (event := await next_event(call)).WhichOneof("event") == "token":
            tokens.append(event.token)
        assert event.reply_finished.finished.finish_reason == "length"
        assert event.reply_finished.finished.usage.completion_tokens == 4
        assert all(t.response_id == second.response_id for t in tokens)
        conversation = prompt_ids + [t.token.token_id for t in first[:2]] + tokenizer.encode(" Also,", add_bos=False)

        # Out of range: an error event, and the session goes on; then a fork, then the end.
        await call.write(pb2.SessionRequest(truncate=pb2.Truncate(num_tokens=10**6)))
        error = (await next_event(call, "error")).error
        assert error.code == "INVALID_ARGUMENT" and "truncate" in error.message
        await call.write(pb2.SessionRequest(fork=pb2.Fork()))
        forked = (await next_event(call, "forked")).forked
        assert forked.new_branch != 0 and forked.num_tokens == event.reply_finished.num_tokens
        await call.write(pb2.SessionRequest(append=pb2.Append(branch=forked.new_branch, text=" Then")))
        assert (await next_event(call, "appended")).appended.branch == forked.new_branch
        await call.done_writing()
        assert (await next_event(call, "end")).WhichOneof("event") == "end"
        assert await call.read() is grpc.aio.EOF
        await wait_for_no_sequences(ae)
        return conversation, [t.token.token_id for t in tokens]

    conversation, reply = run_with_server(make_engine, body)
    want = make_engine().generate([conversation], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert reply == want.output_ids, "the second reply continues the conversation the session reported"


def test_bad_requests_get_their_status_and_the_server_keeps_serving(make_engine) -> None:
    async def body(stub, ae, observer):
        async def status_of(request) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in stub.Generate(request)]
            assert "Traceback" not in info.value.details()
            return info.value.code(), info.value.details()

        code, details = await status_of(pb2.GenerateRequest(text=PROMPT, sampling=pb2.SamplingOptions(temperature=-1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in details
        too_long = pb2.TokenIds(ids=[1] * ae.engine.max_model_len)
        code, details = await status_of(pb2.GenerateRequest(token_ids=too_long))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in details
        code, _ = await status_of(pb2.GenerateRequest())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        ok = [r async for r in stub.Generate(pb2.GenerateRequest(text=PROMPT, sampling=pb2.SamplingOptions(max_tokens=2)))]
        assert ok[-1].WhichOneof("event") == "finished" and ok[-1].finished.finish_reason in ("length", "stop")
        health = await stub.Health(pb2.HealthRequest())
        assert health.status == "SERVING"
    run_with_server(make_engine, body)


def test_overload_is_resource_exhausted(make_engine) -> None:
    async def body(stub, ae, observer):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.Generate(pb2.GenerateRequest(text=PROMPT))]
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in info.value.details()
        call = stub.Session()
        await call.write(pb2.SessionRequest(append=pb2.Append(text=PROMPT)))
        assert (await next_event(call, "error")).error.code == "RESOURCE_EXHAUSTED"
        await call.done_writing()
        assert (await next_event(call, "end")).WhichOneof("event") == "end"
        assert (await stub.Health(pb2.HealthRequest())).status == "SERVING"
    run_with_server(make_engine, body, max_waiting=0)  # every request finds the queue full


def test_api_key_is_checked_before_the_engine_sees_anything(make_engine) -> None:
    async def body(stub, ae, observer):
        request = pb2.GenerateRequest(text=PROMPT, sampling=pb2.SamplingOptions(max_tokens=2))
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "secret"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in stub.Generate(request, metadata=metadata)]
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Health(pb2.HealthRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call = stub.Session(metadata=metadata)
            await call.write(pb2.SessionRequest(append=pb2.Append(text=PROMPT)))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert observer.added == 0, "a refused call never reached the engine"
        good = (("authorization", "Bearer secret"),)
        ok = [r async for r in stub.Generate(request, metadata=good)]
        assert ok[-1].WhichOneof("event") == "finished"
        assert (await stub.Health(pb2.HealthRequest(), metadata=good)).status == "SERVING"
        assert observer.added == 1
    run_with_server(make_engine, body, api_key="secret")


def test_a_client_that_disconnects_cancels_its_generation(make_engine) -> None:
    async def body(stub, ae, observer):
        sampling = pb2.SamplingOptions(max_tokens=500, ignore_eos=True)
        call = stub.Generate(pb2.GenerateRequest(text=PROMPT, sampling=sampling))
        got = 0
        async for response in call:
            got += response.WhichOneof("event") == "token"
            if got == 2:
                break
        call.cancel()
        await wait_for_no_sequences(ae)
        # a session that goes away mid-reply frees its sequence too
        session = stub.Session()
        await session.write(pb2.SessionRequest(append=pb2.Append(text=PROMPT)))
        await next_event(session, "appended")
        await session.write(pb2.SessionRequest(commit=pb2.Commit(sampling=sampling)))
        await next_event(session, "reply_started")
        await next_event(session, "token")
        session.cancel()
        await wait_for_no_sequences(ae)
        health = await stub.Health(pb2.HealthRequest())
        assert (health.status, health.num_running, health.num_waiting) == ("SERVING", 0, 0)
    run_with_server(make_engine, body)


def test_fork_during_a_reply_continues_on_a_branch_of_its_own(make_engine) -> None:
    """Forking a running reply (search over continuations): the new branch holds the reply so far
    and replies on under a new response id. Greedy, so both branches must go on with the tokens
    one uninterrupted reply has at those positions."""
    tokenizer = make_engine().tokenizer
    prompt_ids = tokenizer.encode(PROMPT)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = make_engine().generate([prompt_ids], greedy)[0].output_ids

    async def body(stub, ae, observer):
        call = stub.Session()
        sampling = pb2.SamplingOptions(temperature=0.0, max_tokens=40, ignore_eos=True)
        await call.write(pb2.SessionRequest(start=pb2.SessionStart(sampling=sampling)))
        await call.write(pb2.SessionRequest(append=pb2.Append(token_ids=pb2.TokenIds(ids=prompt_ids))))
        await next_event(call, "appended")
        await call.write(pb2.SessionRequest(commit=pb2.Commit()))
        parent_reply = (await next_event(call, "reply_started")).reply_started
        first = (await next_event(call, "token")).token
        await call.write(pb2.SessionRequest(fork=pb2.Fork()))
        tokens: dict[int, list] = {0: [first], 1: []}
        finished, forked, child_reply = {}, None, None
        while len(finished) < 2:
            event = await next_event(call)
            kind = event.WhichOneof("event")
            if kind == "token":
                tokens[event.token.branch].append(event.token)
            elif kind == "forked":
                forked = event.forked
            elif kind == "reply_started":
                assert forked is not None, "the fork's ReplyStarted follows its Forked"
                child_reply = event.reply_started
            elif kind == "reply_finished":
                finished[event.reply_finished.branch] = event.reply_finished
            else:
                raise AssertionError(f"unexpected {event}")
        assert forked.new_branch == 1 and child_reply.branch == 1
        assert child_reply.response_id > parent_reply.response_id
        assert child_reply.num_tokens == forked.num_tokens > len(prompt_ids), "the reply so far is its history"
        assert all(t.response_id == child_reply.response_id for t in tokens[1])
        assert [t.position for t in tokens[1]] == list(range(forked.num_tokens, forked.num_tokens + len(tokens[1])))
        await call.done_writing()
        await next_event(call, "end")
        await wait_for_no_sequences(ae)
        return forked.num_tokens, tokens, finished

    fork_at, tokens, finished = run_with_server(make_engine, body)
    parent = [t.token.token_id for t in tokens[0]]
    child = [t.token.token_id for t in tokens[1]]
    assert parent == want and finished[0].finished.finish_reason == "length"
    assert len(child) == 40 - (fork_at - len(prompt_ids)), "the fork keeps its parent's max_tokens budget"
    assert want[fork_at - len(prompt_ids):] == child
    assert finished[1].num_tokens == len(prompt_ids) + 40


def test_a_stopped_engine_answers_unavailable(make_engine) -> None:
    async def body(stub, ae, observer):
        ae.shutdown()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.Generate(pb2.GenerateRequest(text=PROMPT))]
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "not running" in info.value.details()
        assert (await stub.Health(pb2.HealthRequest())).status == "NOT_SERVING"
        call = stub.Session()
        await call.write(pb2.SessionRequest(append=pb2.Append(text=PROMPT)))
        assert (await next_event(call, "error")).error.code == "UNAVAILABLE"
        await call.done_writing()
        await next_event(call, "end")
    run_with_server(make_engine, body)


def test_a_refused_commit_announces_no_reply(make_engine) -> None:
    """A commit the engine refuses (the conversation plus max_tokens over the context) is one
    SessionError and no ReplyStarted, so no reply is left without its ReplyFinished; the session
    goes on and a commit that fits replies."""
    async def body(stub, ae, observer):
        call = stub.Session()
        await call.write(pb2.SessionRequest(append=pb2.Append(text=PROMPT)))
        await next_event(call, "appended")
        too_many = pb2.SamplingOptions(max_tokens=ae.engine.max_model_len, ignore_eos=True)
        await call.write(pb2.SessionRequest(commit=pb2.Commit(sampling=too_many)))
        event = await next_event(call)
        assert event.WhichOneof("event") == "error" and event.error.code == "INVALID_ARGUMENT", event
        assert "context" in event.error.message
        await call.write(pb2.SessionRequest(commit=pb2.Commit(sampling=pb2.SamplingOptions(max_tokens=3,
                                                                                         ignore_eos=True))))
        assert (await next_event(call)).WhichOneof("event") == "reply_started"
        finished = (await next_event(call, "reply_finished")).reply_finished
        assert finished.finished.finish_reason == "length" and finished.finished.usage.completion_tokens == 3
        await call.done_writing()
        await next_event(call, "end")
        await wait_for_no_sequences(ae)
    run_with_server(make_engine, body)


def test_requests_during_a_reply_apply_in_order(make_engine) -> None:
    """Full duplex: input that arrives while the assistant speaks waits for the reply to end (here
    a barge-in that drops it) and then joins the conversation; a truncate sent during a reply
    stops the reply first. Greedy replies are checked against plain requests over the
    conversation the session reports."""
    tokenizer = make_engine().tokenizer
    prompt_ids = tokenizer.encode(PROMPT)
    more = tokenizer.encode(" Also,", add_bos=False)
    greedy = pb2.SamplingOptions(temperature=0.0, max_tokens=300, ignore_eos=True)

    async def body(stub, ae, observer):
        call = stub.Session()
        await call.write(pb2.SessionRequest(start=pb2.SessionStart(sampling=greedy)))
        await call.write(pb2.SessionRequest(append=pb2.Append(token_ids=pb2.TokenIds(ids=prompt_ids))))
        await next_event(call, "appended")
        await call.write(pb2.SessionRequest(commit=pb2.Commit()))
        first = (await next_event(call, "reply_started")).reply_started
        await next_event(call, "token")
        # The user speaks over the reply, then the client barges in and drops what was said.
        await call.write(pb2.SessionRequest(append=pb2.Append(token_ids=pb2.TokenIds(ids=more))))
        await call.write(pb2.SessionRequest(commit=pb2.Commit(sampling=pb2.SamplingOptions(max_tokens=5))))
        await call.write(pb2.SessionRequest(cancel=pb2.Cancel(keep_partial=False)))
        kinds, events = [], []
        while len(kinds) < 5:
            event = await next_event(call)
            kind = event.WhichOneof("event")
            if kind != "token" or kinds[-1:] == ["reply_started"]:
                kinds.append(kind)
                events.append(event)
        assert kinds == ["reply_finished", "cancelled", "appended", "reply_started", "token"], kinds
        finished, cancelled = events[0].reply_finished, events[1].cancelled
        appended, second = events[2].appended, events[3].reply_started
        assert finished.response_id == first.response_id and finished.finished.finish_reason == "cancelled"
        assert finished.num_tokens == cancelled.num_tokens == len(prompt_ids), "the dropped reply left no trace"
        assert appended.num_tokens == len(prompt_ids) + len(more)
        assert second.response_id > first.response_id and second.num_tokens == appended.num_tokens
        reply = [events[4].token.token.token_id]
        while (event := await next_event(call)).WhichOneof("event") == "token":
            assert event.token.response_id == second.response_id
            reply.append(event.token.token.token_id)
        assert event.reply_finished.finished.finish_reason == "length" and len(reply) == 5
        heard = event.reply_finished.num_tokens

        # A third reply, cut by a truncate while it runs: it stops, then the cut applies.
        await call.write(pb2.SessionRequest(commit=pb2.Commit()))
        await next_event(call, "reply_started")
        await next_event(call, "token")
        await call.write(pb2.SessionRequest(truncate=pb2.Truncate(num_tokens=heard)))
        stopped = (await next_event(call, "reply_finished")).reply_finished
        assert stopped.finished.finish_reason == "cancelled" and stopped.num_tokens > heard
        event = await next_event(call)  # strictly next: no token after the reply's end
        assert event.WhichOneof("event") == "truncated" and event.truncated.num_tokens == heard
        assert await num_sequences(ae) == 0, "the stopped reply freed its blocks"
        await call.done_writing()
        await next_event(call, "end")
        await wait_for_no_sequences(ae)
        return reply

    reply = run_with_server(make_engine, body)
    want = make_engine().generate([prompt_ids + more], SamplingParams(temperature=0.0, max_tokens=5,
                                                                     ignore_eos=True))[0]
    assert reply == want.output_ids, "the reply after the barge-in answers the conversation without the dropped one"


def test_cancel_or_fork_right_after_a_commit_acts_on_the_reply_it_starts(make_engine) -> None:
    """A barge-in sent on the heels of its commit (before the reply has started) cancels that
    reply instead of finding nothing to cancel; a fork sent so gets a reply of its own."""
    async def body(stub, ae, observer):
        call = stub.Session()
        sampling = pb2.SamplingOptions(temperature=0.0, max_tokens=200, ignore_eos=True)
        await call.write(pb2.SessionRequest(start=pb2.SessionStart(sampling=sampling)))
        await call.write(pb2.SessionRequest(append=pb2.Append(text=PROMPT)))
        await next_event(call, "appended")
        await call.write(pb2.SessionRequest(commit=pb2.Commit()))
        await call.write(pb2.SessionRequest(cancel=pb2.Cancel(keep_partial=True)))
        started = (await next_event(call, "reply_started")).reply_started
        finished = (await next_event(call, "reply_finished")).reply_finished
        cancelled = (await next_event(call, "cancelled")).cancelled
        assert finished.finished.finish_reason == "cancelled" and finished.finished.usage.completion_tokens < 200
        assert cancelled.response_id == started.response_id != 0

        await call.write(pb2.SessionRequest(commit=pb2.Commit(sampling=pb2.SamplingOptions(max_tokens=6))))
        await call.write(pb2.SessionRequest(fork=pb2.Fork()))
        ends, child_started = {}, None
        while len(ends) < 2:
            event = await next_event(call)
            kind = event.WhichOneof("event")
            if kind == "reply_started" and event.reply_started.branch == 1:
                child_started = event.reply_started
            elif kind == "reply_finished":
                ends[event.reply_finished.branch] = event.reply_finished
        assert child_started is not None, "the fork's reply was announced"
        assert ends[1].response_id == child_started.response_id
        assert ends[1].finished.finish_reason == "length"
        assert ends[1].num_tokens == child_started.num_tokens + ends[1].finished.usage.completion_tokens
        await call.done_writing()
        await next_event(call, "end")
        await wait_for_no_sequences(ae)
    run_with_server(make_engine, body)
