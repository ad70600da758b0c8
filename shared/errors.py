"""One error table for both services.

Every error a client can see is an ``ErrorCode``: its HTTP status, its OpenAI-style ``type`` and whether
retrying the same request may succeed. Bodies always use the OpenAI envelope::

    {"error": {"message": "...", "type": "...", "param": "...", "code": "..."}}

Exception tree::

    GKTError                      an error with a code from the table (safe to show to a client)
    ├── InvalidBody               a request model's validator refused a field (400, counted as invalid)
    └── IncompleteStreamError     a guidance stream ended without a terminal frame (F1)

Internal exceptions never reach a client as text: they become ``internal_error`` with a request id. Every
envelope built while a request is served carries that request's ``request_id`` too.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from shared.logs import REQUEST_ID


class ErrorCode(Enum):
    """Error codes with their HTTP status, OpenAI error type and retryability.

    Each value starts with the code's own name so that no two members alias each other.
    """

    invalid_request = ("invalid_request", 400, "invalid_request_error", False)
    context_length_exceeded = ("context_length_exceeded", 400, "invalid_request_error", False)
    not_found = ("not_found", 404, "invalid_request_error", False)
    method_not_allowed = ("method_not_allowed", 405, "invalid_request_error", False)
    payload_too_large = ("payload_too_large", 413, "invalid_request_error", False)
    unauthorized = ("unauthorized", 401, "authentication_error", False)
    rate_limited = ("rate_limited", 429, "rate_limit_error", True)
    overloaded = ("overloaded", 503, "server_error", True)
    upstream_unavailable = ("upstream_unavailable", 502, "server_error", True)
    upstream_error = ("upstream_error", 502, "server_error", True)
    upstream_rejected = ("upstream_rejected", 400, "invalid_request_error", False)
    timeout = ("timeout", 504, "server_error", True)
    circuit_open = ("circuit_open", 503, "server_error", True)
    draining = ("draining", 503, "server_error", True)
    store_unavailable = ("store_unavailable", 503, "server_error", True)  # ledger database or rate-limit Redis
    protocol_error = ("protocol_error", 502, "server_error", True)
    engine_error = ("engine_error", 500, "server_error", True)
    internal_error = ("internal_error", 500, "server_error", False)

    @property
    def status(self) -> int:
        return self.value[1]

    @property
    def type(self) -> str:
        return self.value[2]

    @property
    def retryable(self) -> bool:
        return self.value[3]


class GKTError(Exception):
    """An error whose message is safe to send to a client."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.code.status

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, param=self.param)


class InvalidBody(GKTError):
    """Raised by a request model's validators (a GKTError rather than a ValueError so the 400 names the exact
    field, even inside a JSON schema). The error handler treats it as a body that failed validation: it never
    reached a route, so ``on_invalid`` counts it."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(ErrorCode.invalid_request, message, param=param)


class IncompleteStreamError(GKTError):
    """The guidance stream reached EOF without a ``done`` or ``error`` frame."""

    def __init__(self, message: str = "guidance stream ended without a terminal frame") -> None:
        super().__init__(ErrorCode.protocol_error, message)


def error_body(code: ErrorCode, message: str, *, param: str | None = None) -> dict[str, Any]:
    """The OpenAI-style error envelope, with the current request's id when there is one (O2)."""
    body: dict[str, Any] = {"message": message, "type": code.type, "param": param, "code": code.name}
    if (rid := REQUEST_ID.get()) != "-":
        body["request_id"] = rid
    return {"error": body}


def code_from_name(name: str | None) -> ErrorCode:
    """Map a code name received over the wire back to the table (unknown names are upstream errors)."""
    try:
        return ErrorCode[name] if name else ErrorCode.upstream_error
    except KeyError:
        return ErrorCode.upstream_error
