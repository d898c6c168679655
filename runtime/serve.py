"""Runs `lockstep serve`: one engine thread, the HTTP server (uvicorn) and metrics, in one process."""
from __future__ import annotations

import logging

import uvicorn

from .async_engine import AsyncEngine
from .engine import Engine
from .server import OpenAIServer

log = logging.getLogger("lockstep")


def build_server(engine: Engine, model_name: str, api_key: str | None = None,
                 max_waiting: int = 256) -> tuple[AsyncEngine, OpenAIServer]:
    """The AsyncEngine (started) and the HTTP app over it, with Prometheus metrics."""
    from .metrics import EngineMetrics

    metrics = EngineMetrics()
    async_engine = AsyncEngine(engine, max_waiting=max_waiting, observer=metrics).start()
    return async_engine, OpenAIServer(async_engine, model_name, api_key=api_key, metrics=metrics)


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_waiting: int = 256) -> int:
    async_engine, server = build_server(engine, model_name, api_key, max_waiting)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    print(f"lockstep: serving {model_name} on http://{host}:{port}/v1 (metrics at /metrics)", flush=True)
    try:
        uvicorn.run(server.app, host=host, port=port, log_level="warning")
    finally:
        async_engine.shutdown()
    return 0
