"""The cloud app factory: ``create_app(settings, engine=None)``; run with ``python -m cloud_service``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cloud_service.api import router
from cloud_service.auth import AuthMiddleware, KeyRing
from cloud_service.engine import TeacherEngine, build_engine
from cloud_service.serving import GuidanceService
from cloud_service.settings import CloudSettings
from shared.http import RequestIdMiddleware, install_error_handlers


def create_app(settings: CloudSettings | None = None, engine: TeacherEngine | None = None) -> FastAPI:
    """A cloud app; the lifespan loads the configured teacher unless ``engine`` is given."""
    settings = settings or CloudSettings()
    keys = KeyRing(settings.api_keys) if settings.auth else None
    if keys is not None and not len(keys):
        # S6: auth on with no key would lock everyone out; say so instead of starting.
        raise RuntimeError("GKT_CLOUD_AUTH is on but GKT_CLOUD_API_KEYS is empty: add an edge key "
                           "(`gkt keys new NAME`) or set GKT_CLOUD_AUTH=false on a trusted network")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        teacher = engine or await build_engine(settings)
        app.state.service = GuidanceService(teacher, settings)
        try:
            yield
        finally:
            app.state.service = None
            if engine is None:  # we own what we built
                await teacher.aclose()

    app = FastAPI(title="gkt cloud", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = None
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(RequestIdMiddleware)  # outermost: refusals carry the request id too
    install_error_handlers(app)
    app.include_router(router)
    return app
