"""How an OpenAI-compatible upstream's HTTP errors map onto the error table (shared/errors.py)."""

from __future__ import annotations

import json

from shared.errors import ErrorCode, GKTError

_MAX_UPSTREAM_MESSAGE = 500


def status_error(status: int, raw: bytes, retry_after: str | None) -> GKTError:
    """Map by status: the client's fault (4xx) keeps the upstream's message; server faults stay generic."""
    if status in (429, 503):
        try:
            wait = float(retry_after) if retry_after else 1.0
        except ValueError:
            wait = 1.0
        return GKTError(ErrorCode.overloaded, "the teacher upstream is busy; try again shortly", retry_after=wait)
    if status in (400, 413, 422):
        message = "the teacher upstream rejected the request"
        try:
            detail = json.loads(raw).get("error", {})
            if isinstance(detail, dict) and isinstance(detail.get("message"), str):
                message = f"{message}: {detail['message'][:_MAX_UPSTREAM_MESSAGE]}"
        except (ValueError, AttributeError):
            pass
        return GKTError(ErrorCode.upstream_rejected, message)
    return GKTError(ErrorCode.upstream_error, f"the teacher upstream answered HTTP {status}")
