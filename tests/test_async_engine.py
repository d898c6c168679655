"""The engine behind a server (runtime/async_engine.py): concurrent asyncio streams, disconnects,
overload and bad requests, on the default model.

Expectations are other runs of lockstep: a stream served beside others must equal the same
request run alone on a plain Engine (batch invariance through the thread boundary).
"""
from __future__ import annotations

import asyncio
import time

import pytest

from lockstep.runtime.async_engine import AsyncEngine, OverloadedError
from lockstep.runtime.errors import ContextLengthError
from lockstep.runtime.sampling_params import SamplingParams
from lockstep.runtime.sequence import FinishReason

PROMPTS = ["The first rule of the garden is", "def add(a, b):", "Three colours of the sea:",
           "Once, in a small town by the river,", "The moon is", "Dear diary, today I", "1, 1, 2, 3, 5,",
           "A recipe for pancakes:"]


def params(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=6 + i, ignore_eos=True, logprobs=0)


async def collect(engine: AsyncEngine, prompt, sp: SamplingParams):
    outs = [out async for out in engine.generate(prompt, sp)]
    return outs


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_concurrent_streams_equal_each_request_alone(make_engine, overlap: str) -> None:
    """With overlap on, the streams get each step's outputs while the next step runs (through
    Engine.step's during_device): the same outputs, one step later."""
    alone = make_engine(overlap="off")
    expected = [alone.generate([p], params(i))[0] for i, p in enumerate(PROMPTS)]
    served = AsyncEngine(make_engine(overlap=overlap)).start()
    try:
        async def run_all():
            return await asyncio.gather(*(collect(served, p, params(i)) for i, p in enumerate(PROMPTS)))
        results = asyncio.run(run_all())
    finally:
        served.shutdown()
    for outs, want in zip(results, expected):
        assert sum(o.finished for o in outs) == 1 and outs[-1].finished, "exactly one terminal output, last"
        assert [o.token_id for o in outs if o.token_id is not None] == want.output_ids
        assert [o.logprob for o in outs if o.token_id is not None] == want.logprobs
        assert "".join(o.text for o in outs) == want.text
    assert served.engine.kv.allocator.num_sequences() == 0


def test_a_caller_that_leaves_cancels_its_request_and_frees_its_blocks(make_engine) -> None:
    served = AsyncEngine(make_engine()).start()
    try:
        async def leave_early():
            stream = served.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
            got = 0
            async for out in stream:
                got += out.token_id is not None
                if got == 3:
                    break
            await stream.aclose()
            return got
        assert asyncio.run(leave_early()) == 3
        deadline = time.monotonic() + 5
        while served.engine.kv.allocator.num_sequences() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.engine.kv.allocator.num_sequences() == 0
        assert not served.engine.seqs and served.engine.kv.usage() == 0.0
    finally:
        served.shutdown()


def test_overload_and_bad_requests_are_refused_and_the_engine_keeps_serving(make_engine) -> None:
    served = AsyncEngine(make_engine(), max_waiting=2)  # not started: all five adds meet one queue

    async def submit_five():
        tasks = [asyncio.ensure_future(collect(served, p, params(1))) for p in PROMPTS[:5]]
        await asyncio.sleep(0)  # every add is queued before the engine thread reads any
        served.start()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(submit_five())
        assert [isinstance(r, OverloadedError) for r in results] == [False, False, True, True, True]
        assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results[:2])

        async def too_long():
            return await collect(served, list(range(100, 100 + served.engine.max_model_len)), params(1))
        with pytest.raises(ContextLengthError):
            asyncio.run(too_long())
        again = asyncio.run(collect(served, PROMPTS[0], params(1)))
        assert again[-1].finish_reason is FinishReason.LENGTH
    finally:
        served.shutdown()


def test_shutdown_ends_live_streams_once(make_engine) -> None:
    served = AsyncEngine(make_engine()).start()

    async def run():
        stream = served.generate(PROMPTS[1], SamplingParams(max_tokens=500, ignore_eos=True))
        outs = [await stream.__anext__()]
        served.shutdown()
        outs += [o async for o in stream]
        return outs
    outs = asyncio.run(run())
    assert sum(o.finished for o in outs) == 1 and outs[-1].finish_reason is FinishReason.CANCELLED


def test_a_stopped_engine_refuses_at_once_instead_of_hanging(make_engine) -> None:
    """After shutdown every call fails with EngineStoppedError (HTTP 503 / UNAVAILABLE); before
    the fix a command queued to a dead thread waited forever."""
    from lockstep.runtime.async_engine import EngineStoppedError

    served = AsyncEngine(make_engine()).start()
    assert served.is_running
    served.shutdown()
    assert not served.is_running

    async def run():
        for attempt in (served.call(lambda: 1), served.open(PROMPTS[0], SamplingParams(max_tokens=2))):
            with pytest.raises(EngineStoppedError, match="not running"):
                await asyncio.wait_for(attempt, 5)
    asyncio.run(run())


def test_a_request_that_finishes_before_it_is_read_still_streams(make_engine) -> None:
    """A short request can end before its caller starts reading (a fast GPU, one token): its
    outputs must wait for the reader. This hung an SSE stream forever (found by bench/gpu.sh's dry
    run on a tiny model): the finished stream was dropped before outputs() looked it up."""
    served = AsyncEngine(make_engine()).start()

    async def run():
        seq_id = await served.open(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        while await served.call(lambda: seq_id in served.engine.seqs):
            await asyncio.sleep(0.01)  # until the engine has finished it, unread
        outs = [o async for o in served.outputs(seq_id)]
        with pytest.raises(KeyError, match="already read"):
            [o async for o in served.outputs(seq_id)]
        return outs
    try:
        outs = asyncio.run(run())
    finally:
        served.shutdown()
    assert [o.token_id is not None for o in outs] == [True, True] and outs[-1].finished


class _StepCounter:
    """An observer that counts the engine's steps (on the engine thread)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_added(self, seq, now) -> None: ...

    def on_forked(self, parent, children, now) -> None: ...

    def on_step(self, engine, seconds) -> None:
        self.steps += 1

    def on_outputs(self, outputs, now) -> None: ...


def test_a_step_wakes_the_callers_loop_once_whatever_the_number_of_streams(make_engine) -> None:
    """Outputs cross to the event loop in one callback per step, not one per output (each is a
    write to the loop's self-pipe), and every stream still gets all of its outputs in order."""
    counter = _StepCounter()
    served = AsyncEngine(make_engine(), observers=[counter]).start()
    wakeups = []
    try:
        async def run_all():
            loop = asyncio.get_running_loop()
            threadsafe = loop.call_soon_threadsafe

            def counted(callback, *args):
                wakeups.append(callback)
                return threadsafe(callback, *args)

            loop.call_soon_threadsafe = counted
            return await asyncio.gather(*(collect(served, p, params(i)) for i, p in enumerate(PROMPTS)))
        results = asyncio.run(run_all())
    finally:
        served.shutdown()
    delivered = sum(len(outs) for outs in results)
    assert all(outs[-1].finished and sum(o.finished for o in outs) == 1 for outs in results)
    engine_wakeups = [w for w in wakeups if getattr(w, "__name__", "") == "_deliver"]
    assert len(engine_wakeups) <= counter.steps < delivered, (len(engine_wakeups), counter.steps, delivered)


def test_a_step_that_raises_outside_the_forward_still_ends_each_request_once(make_engine) -> None:
    """A cancel applied in a step that then raises (here: the scheduler) has already left the
    engine's live sequences; fail_step still hands out its terminal output, then ends the rest
    with an error. Through the AsyncEngine, each stream gets exactly one terminal output."""
    engine = make_engine()
    cancelled = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    running = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.cancel(cancelled.seq_id)

    def broken():
        raise RuntimeError("scheduler bug")
    engine.scheduler.schedule = broken
    with pytest.raises(RuntimeError, match="scheduler bug"):
        engine.step()
    ends = {o.seq_id: o.finish_reason for o in engine.fail_step("RuntimeError: scheduler bug") if o.finished}
    assert ends == {cancelled.seq_id: FinishReason.CANCELLED, running.seq_id: FinishReason.ERROR}
    assert not engine.seqs and engine.kv.allocator.num_sequences() == 0
    assert engine.fail_step("again") == [], "a step's outputs are handed out once"

    served = AsyncEngine(make_engine()).start()
    calls = 0

    def breaks_on_the_third_step(schedule=served.engine.scheduler.schedule):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("scheduler bug")
        return schedule()
    served.engine.scheduler.schedule = breaks_on_the_third_step
    try:
        async def both():
            return await asyncio.gather(*(collect(served, p, SamplingParams(max_tokens=50, ignore_eos=True))
                                          for p in PROMPTS[:2]))
        results = asyncio.run(asyncio.wait_for(both(), 30))
        assert all(sum(o.finished for o in outs) == 1 and outs[-1].finish_reason is FinishReason.ERROR
                   for outs in results)
        assert asyncio.run(collect(served, PROMPTS[2], SamplingParams(max_tokens=3)))[-1].finished, \
            "the engine serves on"
    finally:
        served.shutdown()


def test_an_observer_that_raises_stops_nothing(make_engine) -> None:
    """A bug in metrics (or the request log) is logged; streams still get every output."""
    class Broken:
        def on_added(self, *event) -> None:
            raise ValueError("observer bug")

        on_forked = on_step = on_outputs = on_added

    alone = make_engine().generate([PROMPTS[3]], params(3))[0]
    served = AsyncEngine(make_engine(), observers=[Broken()]).start()
    try:
        outs = asyncio.run(asyncio.wait_for(collect(served, PROMPTS[3], params(3)), 30))
    finally:
        served.shutdown()
    assert [o.token_id for o in outs if o.token_id is not None] == alone.output_ids
    assert sum(o.finished for o in outs) == 1 and outs[-1].finished


def test_forks_are_bounded_too(make_engine) -> None:
    """Forks skip the waiting queue, so they have a bound of their own: max_num_seqs + max_waiting
    live sequences; past it a fork is refused with OverloadedError and nothing is left behind."""
    served = AsyncEngine(make_engine(max_num_seqs=2), max_waiting=1).start()
    try:
        async def run():
            parent = await served.open(PROMPTS[0], SamplingParams(max_tokens=4), generate=False)
            await served.fork(parent, 2)  # 3 live: the bound
            with pytest.raises(OverloadedError, match="retry"):
                await served.fork(parent, 1)
            return await served.call(lambda: len(served.engine.seqs))
        assert asyncio.run(run()) == 3
    finally:
        served.shutdown()


def test_a_caller_that_leaves_during_a_fork_releases_the_forks(make_engine) -> None:
    """The client left while the engine thread was inside fork(): the forks it will never read
    are cancelled once the fork returns, instead of running (or holding KV) unread."""
    served = AsyncEngine(make_engine()).start()
    engine = served.engine
    real_fork = engine.fork

    def slow_fork(*args, **kwargs):
        time.sleep(0.3)  # the caller gives up meanwhile
        return real_fork(*args, **kwargs)
    engine.fork = slow_fork
    try:
        async def run():
            parent = await served.open(PROMPTS[0], SamplingParams(max_tokens=4), generate=False)
            task = asyncio.ensure_future(served.fork(parent, 2))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 10
            while (live := await served.call(lambda: sorted(engine.seqs))) != [parent]:
                assert time.monotonic() < deadline, f"forks still live: {live}"
                await asyncio.sleep(0.01)
            assert not [s for s in served._unclaimed if s != parent], "no stream is left for nobody"
        asyncio.run(asyncio.wait_for(run(), 30))
    finally:
        served.shutdown()
