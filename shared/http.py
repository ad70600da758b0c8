"""HTTP plumbing both services share: the error envelope on every failure path, request ids."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import ErrorCode, GKTError, InvalidBody, error_body
from shared.logs import REQUEST_ID

log = logging.getLogger("gkt.http")
T = TypeVar("T")

REQUEST_ID_HEADER = "X-Request-ID"
# Sent by the edge with every call of one answer (its request id); balancers in front of cloud replicas hash
# on it so re-guidance and verify reach the replica that already holds the answer's KV cache (gkt cluster).
AFFINITY_HEADER = "X-GKT-Affinity"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HTTP_CODES = {404: ErrorCode.not_found, 405: ErrorCode.method_not_allowed, 413: ErrorCode.payload_too_large}


def app_state(name: str) -> Callable[[Request], object]:
    """A FastAPI dependency that returns ``app.state.<name>``, the object an app factory put there (routes
    declare ``Annotated[Type, Depends(app_state("name"))]`` and never reach into ``request.app`` themselves)."""

    def dependency(request: Request) -> object:
        return getattr(request.app.state, name)

    dependency.__name__ = f"app_state_{name}"
    return dependency


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or "-"


def error_response(err: GKTError, request: Request | None = None) -> JSONResponse:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    if request is not None:
        headers[REQUEST_ID_HEADER] = request_id(request)
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _log_refusal(request: Request, err: GKTError) -> None:
    """A client's error, in the log with the reason its envelope gave (the access line has only the status).
    The messages name fields and counts, never a key (S3)."""
    if err.code.status < 500:
        token = REQUEST_ID.set(request_id(request))
        try:
            log.info("refused %s %s: %s %s", request.method, request.url.path, err.code.name, err.message)
        finally:
            REQUEST_ID.reset(token)


def install_error_handlers(app: FastAPI, on_invalid: Callable[[Request, GKTError], None] | None = None) -> None:
    """Every error leaves as the OpenAI envelope; internal errors never leak their text.

    ``on_invalid`` sees each request whose body failed validation (they never reach a route).
    """

    @app.exception_handler(GKTError)
    async def _gkt(request: Request, exc: GKTError) -> JSONResponse:
        if isinstance(exc, InvalidBody) and on_invalid is not None:
            on_invalid(request, exc)  # a model validator's refusal: the body never reached its route either
        _log_refusal(request, exc)
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        err = GKTError(ErrorCode.invalid_request, message, param=param)
        if on_invalid is not None:
            on_invalid(request, err)
        _log_refusal(request, err)
        return error_response(err, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.invalid_request)
        resp = JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)
        resp.headers[REQUEST_ID_HEADER] = request_id(request)
        return resp

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette calls this outside the middlewares, where the request's context has ended: set it again.
        rid = request_id(request)
        token = REQUEST_ID.set(rid)
        try:
            log.exception("internal error (request %s)", rid)
            return error_response(GKTError(ErrorCode.internal_error, f"internal error (request id {rid})"), request)
        finally:
            REQUEST_ID.reset(token)


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is http.disconnect: the client left (or the
    # response is complete, which cannot happen before this request's answer is ready).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """C1 for non-streaming answers: ``work``'s result, or None when the client leaves first.

    Without this a non-streaming request notices a gone client only when it writes the answer, so the
    engine runs to the end for nobody. Here the connection is watched while ``work`` runs; a disconnect
    cancels it at once, and its cleanup (closing the generation, which stops the engine at the next token)
    runs to its end, shielded.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this request itself is being cancelled
            task.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await task
    return None if task.cancelled() else task.result()


class RequestIdMiddleware:
    """Takes a well-formed ``X-Request-ID`` from the client or makes one; echoes it on the response and sets
    it as the request's context (``shared.logs.REQUEST_ID``) for logs, error bodies and calls it makes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)  # every log line and error body of this request carries it (O2)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a body grows past the limit (an HTTPException, so FastAPI passes it on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodyLimitMiddleware:
    """V1: refuse bodies over ``max_bytes`` with 413: at once from Content-Length, or while a chunked body
    streams in, without ever holding more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                resp = JSONResponse(error_body(ErrorCode.invalid_request, "invalid Content-Length"), status_code=400)
                await resp(scope, receive, send)
                return
            if too_big:
                err = BodyTooLarge(self.max_bytes)
                resp = JSONResponse(error_body(ErrorCode.payload_too_large, str(err.detail)), status_code=413)
                await resp(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
