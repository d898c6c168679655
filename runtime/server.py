"""`lockstep serve`: the OpenAI-compatible HTTP API (FastAPI on uvicorn) over one AsyncEngine.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (each with stream over SSE), /health
and /metrics. A request is parsed and checked here (size, JSON, types, limits, API key), its
prompt tokenized, and then it runs as one sequence, or as n forks of one prefilled prompt.
Every error is OpenAI's JSON shape with the matching status (400, 401, 404, 413, 429, 503);
no traceback reaches a client. A client that disconnects mid-stream cancels its request at
the next step and frees its blocks (runtime/async_engine.py).

A client that disconnects from a whole (non-streamed) answer cancels it the same way: the
handler watches the connection while it waits.

Extension fields (vLLM's names where vLLM has them): `latency_class` ("interactive" or
"batch"); `priority`, either the same two words or vLLM's integer (lower is more urgent: 0 or
less is interactive, above 0 is batch); `itl_target_ms`, `ignore_eos`, `min_tokens`, `top_k`,
`min_p`, `return_token_ids`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine, EngineStoppedError, OverloadedError
from .errors import CapacityError, InvalidRequestError, LockstepError
from .sampling_params import SamplingParams
from .sequence import FinishReason, SeqOutput

log = logging.getLogger("lockstep")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 << 20
    max_tokens: int = 8192
    max_n: int = 16


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "abort",
          FinishReason.ERROR: "error"}

# The fields each endpoint understands. A field OpenAI defines that lockstep cannot honour is
# accepted only at its neutral value (UNSUPPORTED), so a request is never silently answered
# differently from what it asked. Anything else is unknown: ignored, or a 400 with `strict`.
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop",
                 "stop_token_ids", "logprobs", "stream", "stream_options", "ignore_eos", "min_tokens",
                 "itl_target_ms", "latency_class", "priority", "return_token_ids",
                 "user", "store", "metadata", "service_tier"}  # the last four change nothing in the output
ENDPOINT_FIELDS = {False: COMMON_FIELDS | {"prompt", "echo"},
                   True: COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "parallel_tool_calls"}}
UNSUPPORTED = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
               "logit_bias": ({},), "best_of": (1,), "suffix": ("",), "tools": ([],), "functions": ([],),
               "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
               "response_format": ({"type": "text"},)}

SAMPLING_FIELDS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
                   "min_p": (int, float), "seed": int, "ignore_eos": bool, "min_tokens": int,
                   "itl_target_ms": (int, float)}


def _field(body: dict, name: str, kinds, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python, but `"max_tokens": true` is a client's mistake, not 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        raise HTTPError(400, f"'{name}' must be {_kind_name(kinds)}, got {type(value).__name__}", param=name)
    return value


def _kind_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join({int: "an integer", float: "a number", bool: "a boolean", str: "a string",
                        list: "a list"}.get(k, k.__name__) for k in kinds)


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, model_name: str, api_key: str | None = None, metrics=None,
                 limits: Limits | None = None, strict: bool = False) -> None:
        self.engine = engine
        self.strict = strict  # unknown request fields are a 400 (else ignored)
        self.model_name = model_name
        self.api_key = api_key
        self.metrics = metrics
        self.limits = limits or Limits()
        self.tokenizer = engine.engine.tokenizer
        self.app = self._build()

    # --- the app ---------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="lockstep", docs_url=None, redoc_url=None, openapi_url=None)

        @app.middleware("http")
        async def guard(request: Request, call_next):
            if request.url.path.startswith("/v1/") and self.api_key is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):  # constant time
                    return error_response(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                                          "authentication_error")
            try:
                return await call_next(request)
            except Exception:  # noqa: BLE001 - a bug must reach the log, not the client
                log.exception("unhandled error serving %s", request.url.path)
                return error_response(500, "internal error; see the server log", "internal_error")

        @app.exception_handler(HTTPError)
        async def http_error(_: Request, exc: HTTPError):
            return error_response(exc.status, exc.message, exc.type, exc.param)

        @app.exception_handler(StarletteHTTPException)
        async def routing_error(_: Request, exc: StarletteHTTPException):
            # An unknown path (404) or a wrong method (405): OpenAI's shape too, not FastAPI's.
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            response = error_response(exc.status_code, f"{exc.detail}: see the README for lockstep's endpoints", kind)
            response.headers.update(exc.headers or {})  # a 405 names the methods that work (Allow)
            return response

        @app.exception_handler(ClientDisconnected)
        async def client_left(request: Request, _: ClientDisconnected):
            log.debug("client left before its answer to %s; its request is cancelled", request.url.path)
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")

        @app.exception_handler(LockstepError)
        async def lockstep_error(_: Request, exc: LockstepError):
            return self._lockstep_error(exc)

        @app.get("/health")
        async def health():
            if not self.engine.is_running:
                return JSONResponse({"status": "unavailable"}, 503)
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            if self.metrics is None:
                return Response("", media_type="text/plain")
            body, content_type = self.metrics.render()
            return Response(body, media_type=content_type)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                 "owned_by": "lockstep",
                                                 "max_model_len": self.engine.engine.max_model_len}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._handle(request, chat=True)

        return app

    def _lockstep_error(self, exc: LockstepError) -> JSONResponse:
        if isinstance(exc, OverloadedError):
            return error_response(429, str(exc), "rate_limit_error")
        if isinstance(exc, (CapacityError, EngineStoppedError)):
            return error_response(503, str(exc), "service_unavailable_error")
        return error_response(400, str(exc), "invalid_request_error")

    # --- requests --------------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        too_large = f"the request body exceeds the {limit}-byte limit"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, too_large)  # refused before a byte of it is read
        # Read in pieces so a body sent without (or with a false) Content-Length stops at the limit.
        pieces, size = [], 0
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise HTTPError(413, too_large)
            pieces.append(piece)
        raw = b"".join(pieces)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return body

    def _check_fields(self, body: dict, chat: bool) -> None:
        for name, neutral in UNSUPPORTED.items():
            if body.get(name) is not None and body[name] not in neutral:
                raise HTTPError(400, f"'{name}' is not supported by lockstep; leave it out (or send "
                                     f"{json.dumps(neutral[0])})", param=name)
        unknown = sorted(set(body) - ENDPOINT_FIELDS[chat] - set(UNSUPPORTED))
        if unknown and self.strict:
            raise HTTPError(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                                 "(this server is strict: see the README's list of request fields)",
                            param=unknown[0])
        if unknown:
            log.debug("ignoring unknown request fields %s", unknown)

    def _params(self, body: dict, chat: bool) -> tuple[SamplingParams, int]:
        values = {name: _field(body, name, kinds) for name, kinds in SAMPLING_FIELDS.items() if name in body}
        if chat and body.get("max_completion_tokens") is not None:
            values["max_tokens"] = _field(body, "max_completion_tokens", int)
        max_tokens = values.get("max_tokens", 16 if not chat else None)
        if max_tokens is not None and not 0 <= max_tokens <= self.limits.max_tokens:
            raise HTTPError(400, f"max_tokens must be in [0, {self.limits.max_tokens}], got {max_tokens}",
                            param="max_tokens")
        values["max_tokens"] = max_tokens
        stop = body.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise HTTPError(400, "'stop' must be a string or a list of strings", param="stop")
            values["stop"] = [_text(s, "stop") for s in stop]
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None:
            if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
                raise HTTPError(400, "'stop_token_ids' must be a list of token ids", param="stop_token_ids")
            values["stop_token_ids"] = stop_ids
        latency = body.get("latency_class", body.get("priority"))
        if isinstance(latency, int) and not isinstance(latency, bool) and "latency_class" not in body:
            latency = "interactive" if latency <= 0 else "batch"  # vLLM's priority: lower is sooner
        if latency is not None:
            if latency not in ("interactive", "batch"):
                raise HTTPError(400, "'latency_class' must be 'interactive' or 'batch' ('priority' also takes "
                                     "vLLM's integer: 0 or less is interactive, above 0 batch)",
                                param="latency_class")
            values["latency_class"] = latency
        if chat:
            if _field(body, "logprobs", bool, False):
                values["logprobs"] = _field(body, "top_logprobs", int, 0)
        elif body.get("logprobs") is not None:
            values["logprobs"] = _field(body, "logprobs", int)
        if not chat and _field(body, "echo", bool, False) and "logprobs" in values:
            values["prompt_logprobs"] = values["logprobs"]
        n = _field(body, "n", int, 1)
        if not 1 <= n <= self.limits.max_n:
            raise HTTPError(400, f"n must be in [1, {self.limits.max_n}], got {n}", param="n")
        if "temperature" not in values:
            values["temperature"] = 1.0
        try:
            return SamplingParams(**values), n
        except InvalidRequestError as exc:
            raise HTTPError(400, str(exc)) from None

    def _prompt(self, body: dict, chat: bool) -> tuple[list[int], str]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "'messages' must be a non-empty list", param="messages")
            ids = self.engine.engine.encode_chat(normalize_messages(messages))
            return ids, ""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise HTTPError(400, "'prompt' must not be empty", param="prompt")
            return self.tokenizer.encode(_text(prompt, "prompt")), prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            try:
                self.engine.engine.check_token_ids(prompt)  # before decoding them for echo
            except InvalidRequestError as exc:
                raise HTTPError(400, f"'prompt': {exc}", param="prompt") from None
            return list(prompt), self.tokenizer.decode(prompt, skip_special_tokens=False)
        raise HTTPError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                        param="prompt")

    async def _handle(self, request: Request, chat: bool):
        body = await self._body(request)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise HTTPError(404, f"model '{model}' is not served here; this server serves '{self.model_name}'",
                            "not_found_error", "model")
        self._check_fields(body, chat)
        params, n = self._params(body, chat)
        ids, prompt_text = self._prompt(body, chat)
        stream = _field(body, "stream", bool, False)
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        echo = not chat and _field(body, "echo", bool, False)
        return_ids = _field(body, "return_token_ids", bool, False)
        reply = _Reply(self, chat, ids, prompt_text if echo else "", params, return_ids)
        if stream:
            # StreamingResponse watches the connection itself once it streams; until then (an
            # n > 1 prompt is prefilled before its forks exist), this handler does.
            seqs = await until_disconnected(request, self._start(ids, params, n))
            return _EventStream(reply.sse(seqs, include_usage), lambda: reply.release_unfinished(seqs))
        return await until_disconnected(request, self._start_and_collect(reply, ids, params, n))

    async def _start_and_collect(self, reply: _Reply, ids: list[int], params: SamplingParams, n: int) -> JSONResponse:
        seqs = await self._start(ids, params, n)
        try:
            return await reply.whole(seqs)
        except BaseException:  # the client left (cancelled) or a bug: no sequence may run on unread
            reply.release_unfinished(seqs)
            raise

    async def _start(self, ids: list[int], params: SamplingParams, n: int) -> list:
        if n == 1:
            return [await self.engine.open_sequence(ids, params)]
        parent = await self.engine.open_sequence(ids, params, generate=False)
        try:
            return [parent, *await self.engine.fork_and_commit(parent.seq_id, n - 1)]
        except BaseException:
            # The request failed (a fork's commit refused it) or its client left: nobody will
            # read the prefilled parent, so it must not keep its KV blocks.
            self.engine.release(parent.seq_id)
            raise


class _EventStream(StreamingResponse):
    """SSE whose sequences are released however the response ends. Starlette may cancel a
    stream before its generator ever runs (the client left at once), and then no `finally` in
    the generator runs: this one does."""

    def __init__(self, events: AsyncIterator[str], release) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


async def until_disconnected(request: Request, work):
    """Runs `work` (a coroutine) unless the client disconnects first; then cancels it (which
    cancels its sequences at the next step, async_engine.outputs) and raises ClientDisconnected.
    The body has been read by now, so the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)  # a receive() that failed counts as gone
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _text(value: str, param: str) -> str:
    """A JSON string may carry an unpaired surrogate escape ("\\ud800"): no UTF-8 text holds one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPError(400, f"'{param}' is not valid Unicode text: {exc.reason} at character {exc.start}",
                        param=param) from None
    return value


def normalize_messages(messages: list) -> list[dict[str, Any]]:
    """Voice pipelines send odd histories: consecutive messages of one role are merged (a template
    may insist on alternation); assistant-first and system-only conversations pass as they are.
    Content given as OpenAI's list of text parts is joined."""
    merged: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise HTTPError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if not all(isinstance(t, str) for t in texts):
                raise HTTPError(400, f"messages[{i}].content: every text part needs a string 'text'", param="messages")
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise HTTPError(400, f"messages[{i}].content must be a string or a list of text parts, got "
                                 f"{type(content).__name__}", param="messages")
        content = _text(content, f"messages[{i}].content")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise HTTPError(400, f"messages[{i}].role must be a non-empty string", param="messages")
        role = _text(role, f"messages[{i}].role")
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n" + content
        else:
            merged.append({"role": role, "content": content})
    return merged


class _Reply:
    """One request's answer: n sequences' outputs as OpenAI JSON, whole or as SSE chunks."""

    def __init__(self, server: OpenAIServer, chat: bool, prompt_ids: list[int], echo_text: str,
                 params: SamplingParams, return_ids: bool) -> None:
        self.server, self.chat, self.prompt_ids = server, chat, prompt_ids
        self.echo_text, self.params, self.return_ids = echo_text, params, return_ids
        self.finished: set[int] = set()  # sequences whose terminal output has come
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.tokenizer = server.tokenizer

    def _logprobs(self, outs: list[SeqOutput]) -> Any:
        if self.params.logprobs is None:
            return None
        tokens = [o for o in outs if o.token_id is not None]
        text = lambda t: self.tokenizer.token_text(t)  # noqa: E731
        if self.chat:
            return {"content": [{"token": text(o.token_id), "logprob": o.logprob,
                                 "bytes": list(self.tokenizer.token_bytes(o.token_id)),
                                 "top_logprobs": [{"token": text(t), "logprob": lp,
                                                   "bytes": list(self.tokenizer.token_bytes(t))}
                                                  for t, lp in o.top_logprobs]} for o in tokens]}
        return {"tokens": [text(o.token_id) for o in tokens], "token_logprobs": [o.logprob for o in tokens],
                "top_logprobs": [{text(t): lp for t, lp in o.top_logprobs} for o in tokens] if self.params.logprobs
                else None, "text_offset": []}

    def _usage(self, completion_tokens: int) -> dict:
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    async def whole(self, seqs: list) -> JSONResponse:
        per_seq = await asyncio.gather(*(self._collect(s.seq_id) for s in seqs))
        choices = []
        for index, (seq, outs) in enumerate(zip(seqs, per_seq)):
            last = outs[-1]
            if last.finish_reason is FinishReason.ERROR:
                return error_response(500, f"generation failed: {last.error}", "internal_error")
            text = "".join(o.text for o in outs)
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text},
                          "logprobs": self._logprobs(outs), "finish_reason": FINISH[last.finish_reason]}
            else:
                logprobs = self._logprobs(outs)
                if logprobs is not None and self.params.prompt_logprobs is not None:
                    logprobs = self._with_prompt(seq, logprobs)
                choice = {"index": index, "text": self.echo_text + text, "logprobs": logprobs,
                          "finish_reason": FINISH[last.finish_reason]}
            if self.return_ids:
                choice["token_ids"] = [o.token_id for o in outs if o.token_id is not None]
                choice["prompt_token_ids"] = self.prompt_ids
            choices.append(choice)
        completion = sum(o.token_id is not None for outs in per_seq for o in outs)
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.server.model_name, "choices": choices,
                             "usage": self._usage(completion)})

    def _with_prompt(self, seq, logprobs: dict) -> dict:
        text = lambda t: self.tokenizer.token_text(t)  # noqa: E731
        prompt_tokens = [text(t) for t in self.prompt_ids]
        prompt_top = [None] + [{text(t): lp for t, lp in top} for top in seq.prompt_top_logprobs] \
            if self.params.prompt_logprobs else None
        return {"tokens": prompt_tokens + logprobs["tokens"],
                "token_logprobs": [None, *seq.prompt_logprobs] + logprobs["token_logprobs"],
                "top_logprobs": None if prompt_top is None else prompt_top + (logprobs["top_logprobs"] or []),
                "text_offset": []}

    async def _collect(self, seq_id: int) -> list[SeqOutput]:
        outs = [out async for out in self.server.engine.outputs(seq_id)]
        self.finished.add(seq_id)
        return outs

    def release_unfinished(self, seqs: list) -> None:
        """Cancels every sequence of this reply that has not ended (a no-op for the rest)."""
        for seq in seqs:
            if seq.seq_id not in self.finished:
                self.server.engine.release(seq.seq_id)

    async def sse(self, seqs: list, include_usage: bool) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, seq_id: int) -> None:
            async for out in self.server.engine.outputs(seq_id):
                await queue.put((index, out))

        tasks = [asyncio.ensure_future(pump(i, s.seq_id)) for i, s in enumerate(seqs)]
        remaining, completion = len(seqs), 0
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        try:
            if self.chat:
                for index in range(len(seqs)):
                    yield self._chunk(kind, {"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None})
            elif self.echo_text:
                for index in range(len(seqs)):
                    yield self._chunk(kind, {"index": index, "text": self.echo_text, "logprobs": None,
                                             "finish_reason": None})
            while remaining:
                index, out = await queue.get()
                completion += out.token_id is not None
                if out.finish_reason is FinishReason.ERROR:
                    yield f"data: {json.dumps({'error': {'message': f'generation failed: {out.error}', 'type': 'internal_error', 'param': None, 'code': 500}})}\n\n"
                finish = FINISH[out.finish_reason] if out.finished else None
                remaining -= out.finished
                if out.finished:
                    self.finished.add(out.seq_id)
                if not out.text and finish is None and self.params.logprobs is None and not self.return_ids:
                    continue  # a token whose text is still held back: nothing to send yet
                logprobs = self._logprobs([out]) if out.token_id is not None else None
                if self.chat:
                    choice = {"index": index, "delta": {"content": out.text} if out.text else {},
                              "logprobs": logprobs, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": finish}
                if self.return_ids and out.token_id is not None:
                    choice["token_ids"] = [out.token_id]
                yield self._chunk(kind, choice)
            if include_usage:
                yield "data: " + json.dumps({"id": self.id, "object": kind, "created": self.created,
                                             "model": self.server.model_name, "choices": [],
                                             "usage": self._usage(completion)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:  # a client that left: each pump's exit cancels its sequence
                task.cancel()

    def _chunk(self, kind: str, choice: dict) -> str:
        return "data: " + json.dumps({"id": self.id, "object": kind, "created": self.created,
                                      "model": self.server.model_name, "choices": [choice]}) + "\n\n"
