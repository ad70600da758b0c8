"""The edge app factory: ``create_app(settings, student=None, http=None)``; run with ``python -m edge_agent``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from edge_agent.adapters import AdapterFollower, base_sha256, startup_adapter
from edge_agent.api import ROUTE_LABELS, ready_info, router
from edge_agent.cloud import CloudClient
from edge_agent.metrics import EdgeMetrics
from edge_agent.outbox import Outbox
from edge_agent.pipeline import Pipeline
from edge_agent.resilience import CircuitBreaker, RetryPolicy
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine
from edge_agent.telemetry import Telemetry
from shared.auth import key_ring
from shared.errors import GKTError
from shared.lifecycle import Lifecycle, watchdog
from shared.models import resolve
from shared.ratelimit import RateLimiter
from shared.serve import service_app
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


def open_telemetry(settings: EdgeSettings, client: httpx.AsyncClient, metrics: EdgeMetrics) -> Telemetry | None:
    """The answer records' outbox (one file per edge port, so two edges on a host never share one) and the
    task that pushes it to the cloud; None when telemetry is off, or when the outbox cannot be opened (said
    in the log: the edge answers anyway, as it does without its cloud)."""
    if not settings.telemetry:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gkt"
    path = (Path(settings.telemetry_dir) if settings.telemetry_dir else cache / "telemetry") / \
        f"outbox-{settings.port}.sqlite3"
    try:
        outbox = Outbox(path, settings.telemetry_max_records)
    except (OSError, sqlite3.Error) as exc:
        logging.getLogger("gkt.telemetry").error("telemetry off: cannot open the outbox %s (%s)", path, exc)
        return None
    return Telemetry(outbox, client, metrics, batch=settings.telemetry_batch, interval_s=settings.telemetry_interval_s,
                     policy=RetryPolicy(base_s=1.0, cap_s=settings.telemetry_retry_cap_s))


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
        path = resolve(settings.model) if student is None else student.path
        base_sha = await base_sha256(settings.model, path) if settings.adapter or settings.follow_adapter else ""
        lora, adapter = None, None
        if settings.adapter and student is None:  # a bad adapter stops the edge here, saying why
            lora, adapter = await asyncio.to_thread(startup_adapter, settings.adapter, base_sha,
                                                    settings.adapter_scale)
        engine = student or await asyncio.to_thread(
            LlamaEngine, path, n_ctx=settings.n_ctx, n_threads=settings.n_threads, n_batch=settings.n_batch,
            max_waiting=settings.max_waiting, name=settings.model, lora_path=lora,
            lora_scale=settings.adapter_scale, adapter=adapter,
        )
        client = http or cloud_http_client(settings)
        metrics.bind_queue(lambda: engine.waiting)
        metrics.serving_adapter(engine.adapter)
        follower = app.state.adapter_follower = (
            AdapterFollower(engine, client, settings, metrics, base_sha) if settings.follow_adapter else None
        )
        cloud = CloudClient(
            client,
            policy=RetryPolicy(settings.cloud_retries + 1, settings.cloud_retry_base_s, settings.cloud_retry_cap_s),
            breaker=CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s),
            read_timeout_s=settings.cloud_read_timeout_s,
        )
        telemetry = open_telemetry(settings, client, metrics)
        app.state.pipeline = Pipeline(engine, cloud, settings, telemetry.record if telemetry else None)
        lifecycle.checks.append(lambda: "engine stalled" if engine.stalled(settings.stall_timeout_s) else None)
        lifecycle.ready()
        guard = asyncio.create_task(watchdog(lifecycle, lambda: engine.dead))
        following = asyncio.create_task(follower.run()) if follower else None
        pusher = asyncio.create_task(telemetry.run()) if telemetry else None
        try:
            yield
        finally:
            guard.cancel()
            if following is not None:
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await following
            app.state.pipeline = None
            if telemetry is not None and pusher is not None:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
                await telemetry.flush(settings.telemetry_flush_timeout_s)  # after the drain: every answer is in
                await asyncio.to_thread(telemetry.outbox.close)
            if http is None:
                await client.aclose()
            if student is None:
                await asyncio.to_thread(engine.close)

    metrics = EdgeMetrics()
    lifecycle = Lifecycle()

    def on_invalid(request: Request, err: GKTError) -> None:
        # Bodies that fail validation never reach a route; count them here so every answer request shows.
        if route := ROUTE_LABELS.get(request.url.path):
            metrics.rejected(route, "unknown", err)

    app = service_app(
        "gkt edge", lifespan, router, metrics=metrics, lifecycle=lifecycle, keys=keys,
        max_body_bytes=settings.max_body_bytes, on_invalid=on_invalid, ready_info=ready_info,
    )
    app.state.settings = settings
    app.state.pipeline = None
    app.state.adapter_follower = None
    app.state.limiter = RateLimiter(settings.rate_limit_per_min, settings.rate_limit_burst)
    return app
