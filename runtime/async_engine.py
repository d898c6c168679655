"""The engine behind a server: one thread steps it, any number of asyncio callers stream from it.

The engine is single-threaded by design (every sequence operation happens between steps), so
callers never touch it. They send commands (add a request, cancel, fork, ...) through a queue;
the engine thread applies every queued command between two steps, answers each through a
future, runs the step, and hands each output to its stream's asyncio queue on the caller's
event loop. A caller that stops listening (a client disconnect) cancels its sequence, which
ends at the next step boundary and frees its blocks.

Guarantees a server builds on:
- every accepted request ends with exactly one finished output (stop, length, cancelled or
  error), whatever happens to the step it was in;
- the waiting queue is bounded: beyond `max_waiting` requests, new ones are refused with
  OverloadedError (HTTP 429 / RESOURCE_EXHAUSTED) instead of queueing without limit, and so are
  forks beyond `max_num_seqs + max_waiting` live sequences;
- bad requests are refused with the engine's own LockstepError, before anything is queued.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol, Sequence as Seq, TypeVar

from .engine import Engine
from .errors import LockstepError
from .sampling_params import SamplingParams
from .sequence import FinishReason, SeqOutput, Sequence

log = logging.getLogger("lockstep")

T = TypeVar("T")
IDLE_WAIT_S = 0.5  # how long an idle engine thread sleeps between checks for shutdown


class OverloadedError(LockstepError):
    """The waiting queue is full; the client should retry later."""


class EngineStoppedError(LockstepError):
    """The engine thread is not running (shut down, or not started): HTTP 503 / UNAVAILABLE."""


class Observer(Protocol):
    """What a metrics collector or the request log hears, on the engine thread (runtime/metrics.py,
    runtime/request_log.py)."""

    def on_added(self, seq: Sequence, now: float) -> None: ...

    def on_forked(self, parent: Sequence, children: list[Sequence], now: float) -> None: ...

    def on_step(self, engine: Engine, seconds: float) -> None: ...  # engine.last_step is the step

    def on_outputs(self, outputs: list[SeqOutput], now: float) -> None: ...  # a step's, in order, once


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256, observers: Seq[Observer] = ()) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.observers = list(observers)  # metrics, the request log: each hears every event
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        # Where the engine thread sends each live sequence's outputs (dropped at its finished one)...
        self._streams: dict[int, _Stream] = {}
        # ...and the same streams until their reader claims them with outputs(): a short request
        # can finish before its caller gets round to reading, and its outputs must wait for it.
        self._unclaimed: dict[int, _Stream] = {}
        self._stop = threading.Event()
        # Held while a command is queued and while the stopping thread drains the queue, so no
        # command can slip in after the drain and wait forever for an answer.
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lockstep-engine", daemon=True)

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine thread after its current step; live streams end as cancelled."""
        self._stop.set()
        self._commands.put((lambda: None, Future()))  # wakes an idle thread
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _submit(self, fn: Callable[[], object], future: Future) -> None:
        """Queues a command for the engine thread, or fails its future if the engine is stopped."""
        with self._submit_lock:
            if not self._stop.is_set():
                self._commands.put((fn, future))
                return
        future.set_exception(EngineStoppedError("the engine is not running (the server is shutting down); "
                                                "retry against a running server"))

    # --- callers (any thread / event loop) ---------------------------------------------------------

    async def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the engine thread between two steps; its result or its error comes back."""
        future: Future = Future()
        self._submit(fn, future)
        return await asyncio.wrap_future(future)

    async def open(self, prompt: str | Seq[int], params: SamplingParams, generate: bool = True) -> int:
        """Queues a request (generate=False: prefill only, until commit) with a stream for its
        outputs; returns its sequence id. Raises what add_request raises, or OverloadedError."""
        return (await self.open_sequence(prompt, params, generate)).seq_id

    async def open_sequence(self, prompt: str | Seq[int], params: SamplingParams, generate: bool = True) -> Sequence:
        """open(), returning the Sequence itself. The engine thread owns it: read its fields
        (prompt_logprobs, token_ids) only after its finished output has arrived."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        now = time.perf_counter()

        def add() -> Sequence:
            if self.engine.scheduler.num_waiting >= self.max_waiting:
                raise OverloadedError(f"{self.max_waiting} requests are already waiting; retry later")
            seq = self.engine.add_request(prompt, params, generate=generate)
            self._streams[seq.seq_id] = self._unclaimed[seq.seq_id] = stream
            self._notify("on_added", seq, now)
            return seq

        return await self._call_or_release(add, lambda seq: [seq.seq_id])

    async def outputs(self, seq_id: int) -> AsyncIterator[SeqOutput]:
        """Yields a sequence's outputs, the finished one last (once per sequence: the first call
        claims its stream, even after the sequence has finished). Leaving early cancels it."""
        stream = self._unclaimed.pop(seq_id, None)
        if stream is None:
            raise KeyError(f"sequence {seq_id} has no stream to read (already read, or not opened here)")
        finished = False
        try:
            while not finished:
                out = await stream.outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:  # the caller went away: stop generating for it
                self.release(seq_id)

    async def generate(self, prompt: str | Seq[int], params: SamplingParams) -> AsyncIterator[SeqOutput]:
        """Queues a request and yields its outputs as they come, the finished one last.

        Raises what add_request raises (InvalidRequestError, ContextLengthError) or
        OverloadedError before the first output. Leaving the loop early cancels the request."""
        seq_id = await self.open(prompt, params)
        async for out in self.outputs(seq_id):
            yield out

    async def fork(self, seq_id: int, n: int = 1, commit: bool = False) -> list[Sequence]:
        """Forks a live sequence n times (KV shared by refcount) and gives each fork a stream, in
        one engine-thread call so no output slips between; with commit, the parent and the forks
        then all start generating, each sampling on its own branch."""
        return await self._call_or_release(self._forker(seq_id, n, commit, with_tokens=False),
                                           lambda forks: [f.seq_id for f in forks])

    async def fork_with_tokens(self, seq_id: int, n: int = 1, commit: bool = False) -> list[tuple[Sequence, list[int]]]:
        """fork(), each fork with a copy of its token ids at the fork: the tokens its stream will
        never show (a caller's view of a generating parent lags behind the engine's)."""
        return await self._call_or_release(self._forker(seq_id, n, commit, with_tokens=True),
                                           lambda forks: [f.seq_id for f, _ in forks])

    async def _call_or_release(self, fn: Callable[[], T], made: Callable[[T], list[int]]) -> T:
        """call(fn) for a command that makes sequences (`made` lists their ids from its result).
        A caller gone before the engine answered (its client left) will never read them: once
        fn has run, they are released."""
        future: Future = Future()
        self._submit(fn, future)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda done: self._release_made(done, made))
            raise

    def _release_made(self, future: Future, made: Callable[[object], list[int]]) -> None:
        if not future.cancelled() and future.exception() is None:
            for seq_id in made(future.result()):
                self.release(seq_id)

    def _forker(self, seq_id: int, n: int, commit: bool, with_tokens: bool) -> Callable[[], list]:
        """The engine-thread half of fork(); the streams are made here, on the caller's loop."""
        streams = [_Stream(asyncio.get_running_loop(), asyncio.Queue()) for _ in range(n)]

        def fork() -> list:
            parent = self.engine._live(seq_id)
            # Forks join the running set at once, past the waiting queue's bound: they get one of
            # their own, so a session cannot fork without limit.
            most = self.engine.config.max_num_seqs + self.max_waiting
            if len(self.engine.seqs) + n > most:
                raise OverloadedError(f"{len(self.engine.seqs)} sequences are live and {n} more would pass the "
                                      f"server's {most} (max_num_seqs + max_waiting); retry later")
            children = self.engine.fork(seq_id, n)
            for child, stream in zip(children, streams):
                self._streams[child.seq_id] = self._unclaimed[child.seq_id] = stream
            self._notify("on_forked", parent, children, time.perf_counter())
            if commit:
                try:
                    for seq in [parent, *children]:
                        self.engine.commit(seq.seq_id)
                except LockstepError:
                    # Nobody will read forks the caller never got: end them now (the parent is
                    # the caller's, which it releases), so no KV stays held by an error.
                    for child in children:
                        self._abandon(child.seq_id)
                    raise
            return [(child, list(child.token_ids)) for child in children] if with_tokens else children
        return fork

    async def fork_and_commit(self, seq_id: int, n: int) -> list[Sequence]:
        """Once seq's prompt is computed (it was opened with generate=False), fork(commit=True):
        the prompt is prefilled once for all n + 1 answers."""
        while not await self.call(lambda: self.engine._live(seq_id).num_uncomputed == 0):
            await asyncio.sleep(0.001)  # prefill still running; re-check between steps
        return await self.fork(seq_id, n, commit=True)

    def release(self, seq_id: int) -> None:
        """The caller will not read this sequence (its request failed or left before it did):
        cancel it at the next step and drop its stream. Returns at once; any thread."""
        self._submit(lambda: self._abandon(seq_id), Future())

    def _abandon(self, seq_id: int) -> None:
        """Nobody listens to this sequence any more (engine thread): cancel it, drop its stream."""
        self._streams.pop(seq_id, None)
        self._unclaimed.pop(seq_id, None)
        self.engine.cancel(seq_id)

    # --- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not engine.has_work())
                if self._stop.is_set():
                    break
                if not engine.has_work():
                    continue
                self.serve_step()
            self._dispatch(engine.finish_all(FinishReason.CANCELLED))
        except BaseException as exc:
            log.exception("the engine thread failed; the server cannot generate until it restarts")
            # Every stream still open gets its one terminal output, so no caller waits forever.
            try:
                self._dispatch(engine.fail_step(f"the engine thread failed: {type(exc).__name__}: {exc}"))
            except Exception:  # noqa: BLE001 - already failing; the first error is the one raised
                log.exception("could not end the live streams")
            raise
        finally:
            self._stop.set()
            with self._submit_lock:  # _submit now refuses: drain what is still queued
                pass
            while True:
                try:
                    _, future = self._commands.get_nowait()
                except queue.Empty:
                    break
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineStoppedError("the engine stopped before this command ran"))

    def serve_step(self) -> None:
        """One engine step as the engine thread runs it: the step, its observers, and its
        outputs to their streams (bench/host_overhead.py and bench/overlap.py time this)."""
        engine = self.engine
        t0 = time.perf_counter()
        try:
            # In overlap mode the streams get the previous step's outputs while this step's
            # forward runs: the device then waits only for the step's plan.
            outputs = engine.step(during_device=self._dispatch)
        except Exception as exc:  # noqa: BLE001 - a bug in a step must not hang every client
            log.exception("engine step raised outside the forward; failing every live request")
            outputs = engine.fail_step(f"{type(exc).__name__}: {exc}")
        self._notify("on_step", engine, time.perf_counter() - t0)
        self._dispatch(outputs)

    def _apply_commands(self, block: bool) -> None:
        try:
            fn, future = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - the caller gets its own error back
                    future.set_exception(exc)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list[SeqOutput]) -> None:
        """Hands a step's outputs to their streams: one wake-up of each caller's event loop per
        step, not one per output. A wake-up writes to the loop's self-pipe (a system call); one
        per output cost ~4 us each, a quarter of a millisecond a step at 64 streams, on the thread
        that runs the steps. One callback delivers the step's outputs in order, and callbacks run
        in the order they were queued, so each stream still sees its outputs in step order."""
        now = time.perf_counter()
        if outputs:
            # Once a step, not once an output: observers' per-output calls cost ~1.5 us each
            # on this thread (~95 us a step at 64 streams for the metrics and request log).
            self._notify("on_outputs", outputs, now)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, SeqOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.seq_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.seq_id]
            by_loop.setdefault(stream.loop, []).append((stream.outputs, out))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the caller's event loop is closed: nobody will read these
                for seq_id in dict.fromkeys(out.seq_id for _, out in deliveries):
                    self._abandon(seq_id)

    def _notify(self, event: str, *args) -> None:
        """Tells every observer of an event. An observer's bug is logged, never raised: metrics or
        the request log must not stop the engine thread, or a stream from getting its outputs."""
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # noqa: BLE001 - see above
                log.exception("observer %s failed on %s; serving goes on", type(observer).__name__, event)


def _deliver(deliveries: list[tuple[asyncio.Queue, SeqOutput]]) -> None:
    """On a caller's event loop: puts each output on its stream's queue, in order."""
    for outputs, out in deliveries:
        outputs.put_nowait(out)
