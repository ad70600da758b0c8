"""The frame of a gkt service, built once for both: the middleware stack, error handlers, probes and
``/metrics`` (``service_app``); and running it under uvicorn with gkt's lifecycle (``serve``): SIGTERM drains,
a fatal engine error exits non-zero."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from shared.auth import AuthMiddleware, KeyRing
from shared.errors import GKTError
from shared.http import BodyLimitMiddleware, RequestIdMiddleware, install_error_handlers
from shared.lifecycle import Lifecycle, LifecycleMiddleware, drain
from shared.metrics import ServiceMetrics, metrics_response

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def service_app(
    title: str, lifespan: Lifespan, router: APIRouter, *, metrics: ServiceMetrics, lifecycle: Lifecycle,
    keys: KeyRing | None, max_body_bytes: int, ready_info: Callable[[FastAPI], dict[str, Any]],
    on_invalid: Callable[[Request, GKTError], None] | None = None,
) -> FastAPI:
    """A service's app: its ``router`` behind the shared middleware and error handlers, plus ``/health``,
    ``/ready`` (with ``ready_info(app)`` when ready) and ``/metrics`` (``metrics.registry``).

    ``app.state.metrics`` and ``app.state.lifecycle`` are set; the event-loop task gauge counts the loop the
    lifespan runs on."""

    @asynccontextmanager
    async def counted(app: FastAPI) -> AsyncIterator[None]:
        metrics.bind_loop(asyncio.get_running_loop())
        async with lifespan(app):
            yield

    app = FastAPI(title=title, version="0.1.0", lifespan=counted)
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    # Outermost last: request id, then auth (a refused caller costs nothing more), lifecycle, body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(RequestIdMiddleware)  # outermost: refusals carry the request id too
    install_error_handlers(app, on_invalid=on_invalid)
    app.include_router(router)
    app.include_router(_probes(ready_info))
    return app


def _probes(ready_info: Callable[[FastAPI], dict[str, Any]]) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition of the service's ``gkt_*`` series."""
        return metrics_response(request.app.state.metrics.registry)

    @router.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers (independent of the engine)."""
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness with reasons: loading, draining, engine stalled, engine dead (never another service)."""
        lifecycle = request.app.state.lifecycle
        ok, reasons = lifecycle.readiness()
        if not ok:
            return JSONResponse({"status": lifecycle.phase, "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready", **ready_info(request.app)})

    return router


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before stopping; a second one stops at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Future | None = None
        lifecycle.on_fatal = self._stop_soon

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._draining is not None or self.lifecycle.phase == "dead":
            super().handle_exit(sig, frame)
            return
        self.lifecycle.begin_drain()
        self._draining = asyncio.run_coroutine_threadsafe(self._drain_then_exit(sig), self._loop)  # type: ignore[assignment]

    async def _drain_then_exit(self, sig: int) -> None:
        await drain(self.lifecycle, self.drain_timeout_s)
        self.should_exit = True

    def _stop_soon(self) -> None:
        self.should_exit = True


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], service: str) -> S:
    """The service's settings from the environment, or exit saying what is wrong: only pydantic's messages,
    never its ``input_value`` (which could be a secret, S3)."""
    try:
        return cls()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"gkt {service}: {problems}") from None


def listener(config: uvicorn.Config, tcp_user_timeout_s: float | None) -> socket.socket | None:
    """The listening socket, bound here when it needs options uvicorn does not set (else None: uvicorn binds).

    Accepted connections inherit the listener's options. TCP_NODELAY must be among them: asyncio sets it on
    each accepted socket only when the listener was created with ``proto=IPPROTO_TCP``, which
    ``uvicorn.Config.bind_socket`` does not do, and without it Nagle's algorithm held every small write behind
    the client's delayed ACK (40 ms more to the first token, measured with ``gkt bench --sections ttft``).
    """
    if not tcp_user_timeout_s or not hasattr(socket, "TCP_USER_TIMEOUT"):
        return None
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(tcp_user_timeout_s * 1000))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(app: FastAPI, host: str, port: int, log_level: str, drain_timeout_s: float,
          tls: dict[str, Any] | None = None, tcp_user_timeout_s: float | None = None) -> None:
    """Serve until signalled; exit with the lifecycle's code (1 after a fatal engine failure). ``tls``: uvicorn's
    ssl options (``shared.tls.server_options``).

    ``tcp_user_timeout_s`` (N3): a connection whose sent data stays unacknowledged this long is aborted by the
    kernel. Without it a peer behind a cut link is only given up after TCP's retransmissions (about 15
    minutes), and a stream blocked on the dead socket keeps its slot and its buffers all that time.
    """
    # log_config=None: uvicorn's own lines (access log included) go to the root handler, which adds the
    # request id (shared/logs.py).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), log_config=None,
                            timeout_graceful_shutdown=max(1, round(drain_timeout_s / 4)), **(tls or {}))
    server = DrainingServer(config, app.state.lifecycle, drain_timeout_s)
    sock = listener(config, tcp_user_timeout_s)
    server.run(sockets=None if sock is None else [sock])
    code = app.state.lifecycle.exit_code
    if not server.started and code == 0:
        code = 3  # the app failed to start (e.g. the model could not be loaded)
    sys.exit(code)

