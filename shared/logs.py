"""Logging for both services: every line a request causes carries its request id (O2).

``RequestIdMiddleware`` (``shared/http.py``) puts the id into ``REQUEST_ID``, a context variable, so it
follows the request into every coroutine and task it starts; ``RequestIdFilter`` on the root handler copies
it into each record, uvicorn's access lines included (``shared/serve.py`` lets them propagate to the root).
Lines outside any request (start-up, the cloud's batch scheduler, engine threads) show ``-``.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("gkt_request_id", default="-")
FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


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
