"""Logging for both services: every line a request causes carries its request id (O2).

``RequestIdMiddleware`` (``shared/http.py``) puts the id into ``REQUEST_ID``, a context variable, so it
follows the request into every coroutine and task it starts; ``RequestIdFilter`` on the root handler copies
it into each record, uvicorn's access lines included (``shared/serve.py`` lets them propagate to the root).
Threads that work for requests carry it too: the edge's engine runs each job in a copy of the caller's
context, and the cloud's batch scheduler sets ``request_context`` around the work of each sequence (a step
that fails for all of them lists every id). Lines outside any request (start-up, shutdown) show ``-``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("gkt_request_id", default="-")
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Log lines inside carry ``request_id`` (for threads that serve requests outside their context)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, or ``-``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(level: str) -> None:
    """One stderr handler on the root logger, with the request id in every line."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
