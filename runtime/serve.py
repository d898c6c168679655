"""Runs `lockstep serve`: one engine thread behind the HTTP server (uvicorn), the gRPC server and
metrics, all in one process and one asyncio loop."""
from __future__ import annotations

import asyncio
import logging

import uvicorn

from .async_engine import AsyncEngine
from .engine import Engine
from .server import OpenAIServer

log = logging.getLogger("lockstep")


def build_server(engine: Engine, model_name: str, api_key: str | None = None, max_waiting: int = 256,
                 strict: bool = False, log_requests: bool = False) -> tuple[AsyncEngine, OpenAIServer]:
    """The AsyncEngine (started) and the HTTP app over it, with Prometheus metrics (and, when
    asked, a log of every request's prompt and output)."""
    from .metrics import EngineMetrics
    from .request_log import RequestLog

    metrics = EngineMetrics(model_name)
    observers = [metrics, RequestLog(engine.tokenizer)] if log_requests else [metrics]
    async_engine = AsyncEngine(engine, max_waiting=max_waiting, observers=observers).start()
    return async_engine, OpenAIServer(async_engine, model_name, api_key=api_key, metrics=metrics, strict=strict)


def curl_example(host: str, port: int, with_key: bool) -> str:
    """A chat request to paste into a shell (the key is read from the environment, never printed)."""
    key = ' -H "Authorization: Bearer $LOCKSTEP_API_KEY"' if with_key else ""
    body = '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'
    host = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets in a URL
    return f"curl -s http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json'{key} -d '{body}'"


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_waiting: int = 256, grpc_port: int = 50051, strict: bool = False, log_requests: bool = False) -> int:
    async_engine, server = build_server(engine, model_name, api_key, max_waiting, strict, log_requests)
    if log_requests:
        logging.getLogger("lockstep.requests").setLevel(logging.INFO)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)

    async def run() -> None:
        from .grpc_service import serve_grpc

        grpc_server = await serve_grpc(async_engine, host=host, port=grpc_port, api_key=api_key)
        print(f"lockstep: serving {model_name} on http://{host}:{port}/v1 (metrics at /metrics) and gRPC "
              f"{host}:{grpc_server.bound_port}\ntry it:\n  {curl_example(host, port, api_key is not None)}",
              flush=True)
        try:
            await uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level="warning")).serve()
        finally:
            await grpc_server.stop(grace=1.0)

    try:
        asyncio.run(run())
    finally:
        async_engine.shutdown()
    return 0
