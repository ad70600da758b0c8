"""The edge app factory: ``create_app(settings, student=None, http=None)``; run with ``python -m edge_agent``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request

from edge_agent.api import ROUTE_LABELS, router
from edge_agent.cloud import CloudClient
from edge_agent.metrics import EdgeMetrics
from edge_agent.pipeline import Pipeline
from edge_agent.resilience import CircuitBreaker, RetryPolicy
from edge_agent.settings import EdgeSettings
from shared.auth import AuthMiddleware, key_ring
from shared.errors import GKTError
from shared.http import BodyLimitMiddleware, RequestIdMiddleware, install_error_handlers
from shared.lifecycle import Lifecycle, LifecycleMiddleware, watchdog
from shared.llama import LlamaEngine
from shared.metrics import bind_loop
from shared.models import resolve
from shared.ratelimit import RateLimiter
from shared.tls import client_context


def cloud_http_client(settings: EdgeSettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.cloud_connect_timeout_s, read=settings.cloud_read_timeout_s,
        write=settings.cloud_read_timeout_s, pool=settings.cloud_connect_timeout_s,
    )
    headers = {}
    if settings.cloud_api_key is not None:
        headers["Authorization"] = f"Bearer {settings.cloud_api_key.get_secret_value()}"
    # S4: verify the cloud against its CA and present this edge's certificate when configured.
    tls = settings.cloud_ca_file or settings.cloud_cert_file
    verify = client_context(settings.cloud_ca_file, settings.cloud_cert_file, settings.cloud_key_file) if tls else True
    return httpx.AsyncClient(base_url=settings.cloud_url, timeout=timeout, headers=headers, verify=verify)


def create_app(
    settings: EdgeSettings | None = None,
    student: LlamaEngine | None = None,
    http: httpx.AsyncClient | None = None,
) -> FastAPI:
    """An edge app; the lifespan loads the student and opens the cloud client unless they are given."""
    settings = settings or EdgeSettings()
    keys = key_ring(settings.auth, settings.api_keys, "GKT_EDGE_", "add a client key (`gkt keys new NAME`)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = student or await asyncio.to_thread(
            LlamaEngine, resolve(settings.model), n_ctx=settings.n_ctx, n_threads=settings.n_threads,
            n_batch=settings.n_batch, max_waiting=settings.max_waiting, name=settings.model,
        )
        client = http or cloud_http_client(settings)
        metrics.bind_queue(lambda: engine.waiting)
        bind_loop(metrics.loop_tasks, asyncio.get_running_loop())
        cloud = CloudClient(
            client,
            policy=RetryPolicy(settings.cloud_retries + 1, settings.cloud_retry_base_s, settings.cloud_retry_cap_s),
            breaker=CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s),
            read_timeout_s=settings.cloud_read_timeout_s,
        )
        app.state.pipeline = Pipeline(engine, cloud, settings)
        lifecycle.checks.append(lambda: "engine stalled" if engine.stalled(settings.stall_timeout_s) else None)
        lifecycle.ready()
        guard = asyncio.create_task(watchdog(lifecycle, lambda: engine.dead))
        try:
            yield
        finally:
            guard.cancel()
            app.state.pipeline = None
            if http is None:
                await client.aclose()
            if student is None:
                await asyncio.to_thread(engine.close)

    app = FastAPI(title="gkt edge", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.pipeline = None
    app.state.metrics = metrics = EdgeMetrics()
    app.state.lifecycle = lifecycle = Lifecycle()
    app.state.limiter = RateLimiter(settings.rate_limit_per_min, settings.rate_limit_burst)

    def on_invalid(request: Request, err: GKTError) -> None:
        # Bodies that fail validation never reach a route; count them here so every answer request shows.
        if route := ROUTE_LABELS.get(request.url.path):
            metrics.rejected(route, "unknown", err)

    # Outermost last: request id, then auth (a refused caller costs nothing more), lifecycle, body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(RequestIdMiddleware)  # outermost: refusals carry the request id too
    install_error_handlers(app, on_invalid=on_invalid)
    app.include_router(router)
    return app
