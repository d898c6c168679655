"""lockstep's gRPC service (runtime/lockstep.proto) over an AsyncEngine, on grpc.aio.

Generate: the prompt (text, token ids or chat messages) becomes one engine request; each output
is streamed as a Token, then one Finished with the finish reason and usage.

Session lifecycle, per branch (branch 0 exists from the start; `fork` adds more):
- The session keeps each branch's conversation as token ids (`history`): the engine finishes a
  sequence when its reply ends, so the conversation must outlive it.
- While the user speaks there is a live prefill-only sequence (`add_request(generate=False)`),
  opened by the first `append` (or by `start` when it gives a system prompt) over the whole
  history; later appends go to it with engine.append, so the input is prefilled as it arrives.
- `commit` starts the reply: engine.commit on the live sequence, or, when none is live (a reply
  just ended), a new sequence over the whole history (the prefix cache reuses its KV). Each
  commit takes the next session-wide `response_id`; tokens carry it and their position.
- The reply ends by itself (stop/length: its tokens join the history) or by `cancel` (barge-in):
  the sequence is cancelled at the next step boundary, its last tokens and ReplyFinished are
  sent, then the Cancelled ack; keep_partial decides whether the partial reply joins the history.
- `truncate` cuts the history, and the live sequence with it. Sent while a reply runs, it
  first stops that reply (keeping what was said, as the client is about to cut it anyway).
- Requests may come at any moment: append, commit and truncate apply in the order they came,
  per branch, and append or commit sent while a reply runs wait for that reply to end (a
  transcript that arrives before the client's barge-in joins the conversation after the
  reply, kept or dropped as the cancel said), then apply. cancel and fork act at once, but for
  one thing: sent right after a commit that is still being applied (no reply running yet), they
  wait for it and then act on the reply it started, as the client meant.
- `fork` makes a branch with a copy of the history, its live sequence forked in the engine (KV
  shared by refcount). Forking a running reply (search over continuations) gives the new branch
  the reply so far as history and a reply of its own, under a new response_id, sampled on its
  own branch so it continues differently.
- A request that fails (bad value, out of range, context full, overload) is answered with a
  SessionError event and changes nothing; the session goes on. Half-closing the request stream
  waits for running replies, then ends every live sequence and sends SessionEnd. A client that
  disconnects cancels every live sequence of the session at the next step.

Errors become gRPC status codes with a one-line message, never a traceback:
InvalidRequestError/ContextLengthError -> INVALID_ARGUMENT; OverloadedError, CapacityError ->
RESOURCE_EXHAUSTED; EngineStoppedError -> UNAVAILABLE; a missing or wrong API key -> UNAUTHENTICATED, before the engine is touched.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import logging
from typing import AsyncIterator

import grpc

from .async_engine import AsyncEngine, EngineStoppedError, OverloadedError
from .errors import CapacityError, InvalidRequestError, LockstepError
from .grpc_codegen import pb2, pb2_grpc
from .sampling_params import SamplingParams
from .sequence import FinishReason, SeqOutput

log = logging.getLogger("lockstep")

HEALTH_TIMEOUT_S = 5.0
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos",
                    "min_tokens", "logprobs", "latency_class", "itl_target_ms")


def status_of(exc: LockstepError) -> grpc.StatusCode:
    if isinstance(exc, EngineStoppedError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, (OverloadedError, CapacityError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.FAILED_PRECONDITION


def sampling_overrides(options: pb2.SamplingOptions) -> dict:
    """The fields a SamplingOptions sets (unset ones keep their defaults)."""
    fields = {name: getattr(options, name) for name in _SAMPLING_FIELDS if options.HasField(name)}
    if options.stop:
        fields["stop"] = list(options.stop)
    if options.stop_token_ids:
        fields["stop_token_ids"] = list(options.stop_token_ids)
    return fields


def sampling_params(options: pb2.SamplingOptions, base: SamplingParams | None = None) -> SamplingParams:
    """SamplingParams from the message; raises InvalidRequestError for a bad value."""
    fields = sampling_overrides(options)
    return dataclasses.replace(base, **fields) if base is not None else SamplingParams(**fields)


def token_message(out: SeqOutput) -> pb2.Token:
    return pb2.Token(token_id=out.token_id, text=out.text, logprob=out.logprob,
                     top_logprobs=[pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in out.top_logprobs])


def finished_message(out: SeqOutput, prompt_tokens: int, completion_tokens: int, text: str = "") -> pb2.Finished:
    return pb2.Finished(finish_reason=out.finish_reason.value, text=text, error=out.error or "",
                        usage=pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))


class _Branch:
    """One conversation of a session: its token ids and the engine sequence working on it."""

    def __init__(self, branch_id: int, history: list[int]) -> None:
        self.id = branch_id
        self.history = history
        self.live: int | None = None  # the live engine sequence (prefill-only, or replying)
        self.pump: asyncio.Task | None = None  # streams the live sequence's outputs
        self.replying = False
        self.response_id = 0
        self.reply: list[int] = []
        self.reply_prompt_tokens = 0
        self.keep_partial = True
        # append, commit and truncate (and a cancel or fork behind a commit), applied in order by
        # `worker`, started on first use; commits_pending counts commits queued or being applied.
        self.work: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.commits_pending = 0


class _Session:
    """The state of one Session call; events go to `outbox` (None ends the stream)."""

    def __init__(self, service: LockstepService) -> None:
        self.ae = service.ae
        self.engine = service.ae.engine
        self.next_response_id = service.next_response_id
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.defaults = SamplingParams()
        self.branches: dict[int, _Branch] = {0: _Branch(0, [])}
        self.started = False

    def send(self, **event) -> None:
        self.outbox.put_nowait(pb2.SessionEvent(**event))

    def error(self, branch: int, code: grpc.StatusCode, message: str) -> None:
        self.send(error=pb2.SessionError(branch=branch, code=code.name, message=message))

    # --- the request loop ----------------------------------------------------------------------

    async def run(self, requests: AsyncIterator[pb2.SessionRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                message = getattr(request, kind) if kind else None
                branch_id = getattr(message, "branch", 0)
                try:
                    if kind is None:
                        raise InvalidRequestError("empty SessionRequest: set one of start, append, commit, "
                                                  "cancel, truncate, fork")
                    if kind != "start" and branch_id not in self.branches:
                        raise InvalidRequestError(f"branch {branch_id} does not exist in this session")
                    branch = self.branches.get(branch_id)
                    # A cancel or fork right behind a commit that is still being applied means the
                    # reply that commit starts: it waits for the commit (else it acts at once).
                    if kind in ORDERED or (kind in ("cancel", "fork") and branch.commits_pending
                                           and not branch.replying):
                        self._enqueue(branch, kind, message)
                    else:
                        await getattr(self, f"on_{kind}")(message)
                except LockstepError as exc:
                    self.error(branch_id, status_of(exc), str(exc))
            # The client half-closed: apply what it queued, let running replies finish, then end.
            for branch in self.branches.values():
                branch.work.put_nowait(None)
            await asyncio.gather(*(b.worker for b in self.branches.values() if b.worker))
            await asyncio.gather(*(b.pump for b in self.branches.values() if b.replying and b.pump))
            self.send(end=pb2.SessionEnd())
        finally:
            self.close()
            self.outbox.put_nowait(None)

    def close(self) -> None:
        """Ends every live sequence: cancelling a pump leaves ae.outputs, which cancels it."""
        for branch in self.branches.values():
            for task in (branch.worker, branch.pump):
                if task is not None and not task.done():
                    task.cancel()

    def _enqueue(self, branch: _Branch, kind: str, message) -> None:
        if branch.worker is None:
            branch.worker = asyncio.create_task(self._work(branch))
        branch.commits_pending += kind == "commit"
        branch.work.put_nowait((kind, message))

    async def _work(self, branch: _Branch) -> None:
        """Applies a branch's queued requests in order (None: no more)."""
        while (item := await branch.work.get()) is not None:
            kind, message = item
            try:
                while kind in ORDERED and branch.replying and branch.pump is not None:
                    if kind == "truncate":  # the client cuts the reply: stop it first
                        await self._stop_reply(branch, keep_partial=True)
                    else:
                        await asyncio.wait([branch.pump])  # append and commit wait for it to end
                await getattr(self, f"on_{kind}")(message)
            except LockstepError as exc:
                self.error(branch.id, status_of(exc), str(exc))
            finally:
                branch.commits_pending -= kind == "commit"

    # --- requests --------------------------------------------------------------------------------

    async def on_start(self, start: pb2.SessionStart) -> None:
        if self.started or any(b.history or b.live is not None for b in self.branches.values()):
            raise SessionStateError("start must be the session's first request, and come once")
        self.defaults = sampling_params(start.sampling)
        context = start.WhichOneof("context")
        if context == "system_prompt":
            ids = self.engine.tokenizer.encode(start.system_prompt)
        elif context == "messages":
            ids = await self.ae.call(lambda: self.engine.encode_chat(_messages(start.messages)))
        else:
            ids = []
        self.started = True
        if ids:
            await self._open(self.branches[0], ids, self.defaults, generate=False)
            self.branches[0].history = ids

    async def on_append(self, append: pb2.Append) -> None:
        branch = self.branches[append.branch]
        if append.WhichOneof("input") == "text":
            # BOS only at the very start of a conversation
            ids = self.engine.tokenizer.encode(append.text, add_bos=None if not branch.history else False)
        else:
            ids = list(append.token_ids.ids)
        if not ids:
            raise InvalidRequestError("append needs some text or token ids")
        if branch.live is None:
            await self._open(branch, branch.history + ids, self.defaults, generate=False)
        else:
            live = branch.live
            await self.ae.call(lambda: self.engine.append(live, ids))
        branch.history.extend(ids)
        self.send(appended=pb2.Appended(branch=branch.id, num_tokens=len(branch.history)))

    async def on_commit(self, commit: pb2.Commit) -> None:
        branch = self.branches[commit.branch]
        params = sampling_params(commit.sampling, self.defaults)
        if branch.live is None:
            if not branch.history:
                raise InvalidRequestError("nothing to reply to: append some input first")
            await self._open(branch, list(branch.history), params, generate=True,
                             response_id=next(self.next_response_id))
            return
        live, loop = branch.live, asyncio.get_running_loop()

        def commit() -> None:
            self.engine.commit(live, params)  # raises, and nothing is announced, if it is refused
            # Announced from the engine thread before the step that samples the reply's first
            # token: that step's outputs reach this loop after this callback, so the pump counts
            # every token of the reply and ReplyStarted precedes them.
            loop.call_soon_threadsafe(self._begin_reply, branch, next(self.next_response_id))

        await self.ae.call(commit)

    def _begin_reply(self, branch: _Branch, response_id: int) -> None:
        branch.replying = True
        branch.response_id = response_id
        branch.reply = []
        branch.reply_prompt_tokens = len(branch.history)
        branch.keep_partial = True
        self.send(reply_started=pb2.ReplyStarted(branch=branch.id, response_id=response_id,
                                                  num_tokens=len(branch.history)))

    async def on_cancel(self, cancel: pb2.Cancel) -> None:
        branch = self.branches[cancel.branch]
        response_id = 0
        if branch.replying:
            response_id = branch.response_id
            await self._stop_reply(branch, cancel.keep_partial)
        self.send(cancelled=pb2.Cancelled(branch=branch.id, response_id=response_id,
                                          num_tokens=len(branch.history)))

    async def _stop_reply(self, branch: _Branch, keep_partial: bool) -> None:
        """Barge-in: cancels the running reply at the next step and waits until its ReplyFinished
        is out, so no token of it follows."""
        branch.keep_partial = keep_partial
        live, pump = branch.live, branch.pump
        await self.ae.call(lambda: self.engine.cancel(live))
        await asyncio.wait([pump])

    async def on_truncate(self, truncate: pb2.Truncate) -> None:
        branch = self.branches[truncate.branch]
        n = truncate.num_tokens
        if not 1 <= n <= len(branch.history):
            raise InvalidRequestError(f"truncate position must be in [1, {len(branch.history)}], got {n}")
        if branch.live is not None:
            live = branch.live
            await self.ae.call(lambda: self.engine.truncate(live, n))
        del branch.history[n:]
        self.send(truncated=pb2.Truncated(branch=branch.id, num_tokens=n))

    async def on_fork(self, fork: pb2.Fork) -> None:
        parent = self.branches[fork.branch]
        child = _Branch(max(self.branches) + 1, list(parent.history))
        live, replying = parent.live, parent.replying
        if live is not None:
            try:
                ((seq, tokens),) = await self.ae.fork_with_tokens(live, 1)
            except InvalidRequestError:  # it ended in the engine before the fork: fork what it left
                if parent.pump is not None:
                    await asyncio.wait([parent.pump])
                child.history, replying = list(parent.history), False
            else:
                # The engine's tokens at the fork: a running reply's tokens so far are the fork's
                # conversation (its own reply starts after them), however far the parent's
                # stream has got.
                child.history, child.live = tokens, seq.seq_id
        self.branches[child.id] = child
        self.send(forked=pb2.Forked(branch=parent.id, new_branch=child.id, num_tokens=len(child.history)))
        if child.live is not None:
            if replying:  # the fork goes on generating: a reply of its own, sampled on its own branch
                self._begin_reply(child, next(self.next_response_id))
            child.pump = asyncio.create_task(self._pump(child, child.live))

    # --- the live sequence -----------------------------------------------------------------------

    async def _open(self, branch: _Branch, ids: list[int], params: SamplingParams, generate: bool,
                    response_id: int = 0) -> None:
        seq_id = await self.ae.open(ids, params, generate=generate)
        branch.live = seq_id
        if generate:
            self._begin_reply(branch, response_id)
        branch.pump = asyncio.create_task(self._pump(branch, seq_id))

    async def _pump(self, branch: _Branch, seq_id: int) -> None:
        """Streams one live sequence's outputs until it finishes."""
        try:
            async for out in self.ae.outputs(seq_id):
                if out.token_id is not None and branch.replying:
                    position = branch.reply_prompt_tokens + len(branch.reply)
                    branch.reply.append(out.token_id)
                    self.send(token=pb2.SessionToken(branch=branch.id, response_id=branch.response_id,
                                                     position=position, token=token_message(out)))
                if out.finished:
                    self._finished(branch, out)
        finally:
            if branch.live == seq_id:
                branch.live = None
                branch.replying = False

    def _finished(self, branch: _Branch, out: SeqOutput) -> None:
        if not branch.replying:
            if out.finish_reason is FinishReason.ERROR:  # the prefill failed; the history stands
                self.error(branch.id, grpc.StatusCode.INTERNAL, out.error or "the engine step failed")
            return
        if out.finish_reason is not FinishReason.CANCELLED or branch.keep_partial:
            branch.history.extend(branch.reply)
        # out.text: text still pending at the end (the token's own text was sent with it)
        text = "" if out.token_id is not None else out.text
        finished = finished_message(out, branch.reply_prompt_tokens, len(branch.reply), text)
        branch.live = None
        branch.replying = False
        self.send(reply_finished=pb2.ReplyFinished(branch=branch.id, response_id=branch.response_id,
                                                   finished=finished, num_tokens=len(branch.history)))


class SessionStateError(LockstepError):
    """A valid request at the wrong moment (start after the session began): FAILED_PRECONDITION."""


ORDERED = ("append", "commit", "truncate")  # per-branch requests applied in order (_Session._work)


def _messages(messages: pb2.ChatMessages) -> list[dict]:
    if not messages.messages:
        raise InvalidRequestError("messages must not be empty")
    return [{"role": m.role, "content": m.content} for m in messages.messages]


class LockstepService(pb2_grpc.LockstepServicer):
    def __init__(self, async_engine: AsyncEngine, api_key: str | None = None) -> None:
        self.ae = async_engine
        self.api_key = api_key
        self.next_response_id = itertools.count(1)  # response ids, increasing across sessions

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.api_key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            why = "missing" if not given else "wrong"
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{why} API key: send the metadata 'authorization: Bearer <key>'")

    async def Generate(self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        await self._authorize(context)
        try:
            params = sampling_params(request.sampling)
            kind = request.WhichOneof("prompt")
            if kind == "text":
                ids = self.ae.engine.tokenizer.encode(request.text)  # thread-safe (Rust tokenizers)
            elif kind == "token_ids":
                ids = list(request.token_ids.ids)
            elif kind == "messages":
                messages = _messages(request.messages)
                ids = await self.ae.call(lambda: self.ae.engine.encode_chat(messages))
            else:
                raise InvalidRequestError("GenerateRequest needs a prompt: text, token_ids or messages")
            seq_id = await self.ae.open(ids, params)
        except LockstepError as exc:
            await context.abort(status_of(exc), str(exc))
        completion = 0
        async for out in self.ae.outputs(seq_id):  # a disconnect cancels the task: outputs() cancels
            if out.token_id is not None:
                completion += 1
                yield pb2.GenerateResponse(token=token_message(out))
            if out.finished:
                text = "" if out.token_id is not None else out.text
                yield pb2.GenerateResponse(finished=finished_message(out, len(ids), completion, text))

    async def Session(self, requests: AsyncIterator[pb2.SessionRequest], context: grpc.aio.ServicerContext):
        await self._authorize(context)
        session = _Session(self)
        reader = asyncio.create_task(session.run(requests))
        try:
            while (event := await session.outbox.get()) is not None:
                yield event
            await reader  # raises what the request loop raised, if anything
        finally:
            if not reader.done():
                reader.cancel()
            session.close()

    async def Health(self, request: pb2.HealthRequest, context: grpc.aio.ServicerContext) -> pb2.HealthResponse:
        await self._authorize(context)
        scheduler = self.ae.engine.scheduler
        try:
            running, waiting = await asyncio.wait_for(
                self.ae.call(lambda: (len(scheduler.running), scheduler.num_waiting)), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, EngineStoppedError):
            return pb2.HealthResponse(status="NOT_SERVING")
        return pb2.HealthResponse(status="SERVING", num_running=running, num_waiting=waiting)


async def serve_grpc(async_engine: AsyncEngine, host: str = "127.0.0.1", port: int = 50051,
                     api_key: str | None = None) -> grpc.aio.Server:
    """Starts the gRPC server on host:port (0: a free port, see `server.bound_port`) and returns it."""
    server = grpc.aio.server()
    pb2_grpc.add_LockstepServicer_to_server(LockstepService(async_engine, api_key), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.bound_port = bound
    await server.start()
    log.info("gRPC listening on %s:%d", host, bound)
    return server
