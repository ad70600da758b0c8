"""The cloud app factory: ``create_app(settings, engine=None)``; run with ``python -m cloud_service``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from cloud_service.adapters import AdapterShelf
from cloud_service.adapters import router as adapters_router
from cloud_service.api import ROUTE_LABELS, router
from cloud_service.engine import TeacherEngine
from cloud_service.engines import build_engine
from cloud_service.fleet import Fleet, FleetMetrics
from cloud_service.ledger_db import LedgerStore
from cloud_service.metrics import CloudMetrics
from cloud_service.serving import GuidanceService
from cloud_service.settings import CloudSettings
from shared.auth import key_ring
from shared.errors import GKTError
from shared.lifecycle import Lifecycle, watchdog
from shared.serve import service_app


def create_app(settings: CloudSettings | None = None, engine: TeacherEngine | None = None) -> FastAPI:
    """A cloud app; the lifespan loads the configured teacher unless ``engine`` is given, and opens the ledger's
    database (migrated at start; while it is down the cloud runs but is not ready, and says why)."""
    settings = settings or CloudSettings()
    keys = key_ring(settings.auth, settings.api_keys, "GKT_CLOUD_", "add an edge key (`gkt keys new NAME`)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        teacher = engine or await build_engine(settings)
        if hasattr(teacher, "stalled"):
            lifecycle.checks.append(
                lambda: "engine stalled" if teacher.stalled(settings.stall_timeout_s) else None  # type: ignore[attr-defined]
            )
        service = app.state.service = GuidanceService(teacher, settings, metrics, lifecycle)
        store = service.ledger.store
        app.state.fleet = Fleet(store, fleet_metrics, settings.fleet_viewers)
        lifecycle.checks.append(lambda: store.reason)
        await store.check()
        metrics.bind_service(service)
        lifecycle.ready()
        guard = asyncio.create_task(watchdog(lifecycle, lambda: getattr(teacher, "dead", None)))
        probe = asyncio.create_task(_probe(store))
        try:
            yield
        finally:
            guard.cancel()
            probe.cancel()
            app.state.service = None
            await service.ledger.aclose()
            if engine is None:  # we own what we built
                await teacher.aclose()

    metrics = CloudMetrics()
    fleet_metrics = FleetMetrics(metrics.registry)
    lifecycle = Lifecycle()

    def on_invalid(request: Request, err: GKTError) -> None:
        # Bodies that fail validation never reach a route; count them so every request shows.
        if route := ROUTE_LABELS.get(request.url.path):
            metrics.rejected(route, err)

    app = service_app(
        "gkt cloud", lifespan, router, metrics=metrics, lifecycle=lifecycle, keys=keys,
        max_body_bytes=settings.max_body_bytes, on_invalid=on_invalid,
        ready_info=lambda app: {"model": app.state.service.engine.model_name},
    )
    app.include_router(adapters_router)
    app.state.adapters = AdapterShelf(settings.adapter_dir)
    app.state.settings = settings
    app.state.service = None
    app.state.fleet = None
    return app


async def _probe(store: LedgerStore, interval_s: float = 2.0) -> None:
    """Readiness follows the database even without traffic: a lost database shows within ``interval_s``, and
    a database that comes back (or comes up after the cloud) makes the cloud ready again."""
    while True:
        await asyncio.sleep(interval_s)
        await store.check()
