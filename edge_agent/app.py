"""The edge app factory: ``create_app(settings, student=None, http=None)``; run with ``python -m edge_agent``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from edge_agent.api import router
from edge_agent.cloud import CloudClient
from edge_agent.pipeline import Pipeline
from edge_agent.settings import EdgeSettings
from shared.http import RequestIdMiddleware, install_error_handlers
from shared.llama import LlamaEngine
from shared.models import resolve


def cloud_http_client(settings: EdgeSettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.cloud_connect_timeout_s, read=settings.cloud_read_timeout_s,
        write=settings.cloud_read_timeout_s, pool=settings.cloud_connect_timeout_s,
    )
    headers = {}
    if settings.cloud_api_key is not None:
        headers["Authorization"] = f"Bearer {settings.cloud_api_key.get_secret_value()}"
    return httpx.AsyncClient(base_url=settings.cloud_url, timeout=timeout, headers=headers)


def create_app(
    settings: EdgeSettings | None = None,
    student: LlamaEngine | None = None,
    http: httpx.AsyncClient | None = None,
) -> FastAPI:
    """An edge app; the lifespan loads the student and opens the cloud client unless they are given."""
    settings = settings or EdgeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = student or await asyncio.to_thread(
            LlamaEngine, resolve(settings.model), n_ctx=settings.n_ctx, n_threads=settings.n_threads,
            n_batch=settings.n_batch, max_waiting=settings.max_waiting, name=settings.model,
        )
        client = http or cloud_http_client(settings)
        app.state.pipeline = Pipeline(engine, CloudClient(client), settings)
        try:
            yield
        finally:
            app.state.pipeline = None
            if http is None:
                await client.aclose()
            if student is None:
                await asyncio.to_thread(engine.close)

    app = FastAPI(title="gkt edge", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.pipeline = None
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.include_router(router)
    return app
