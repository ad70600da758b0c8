"""What a gkt service makes of an HTTP peer's failures: the one place httpx errors become ``GKTError``.

Two peers, two kinds of error body:

- an OpenAI-compatible upstream (the cloud's teacher: ``vllm serve`` or a hosted API) answers in OpenAI's
  envelope, whose codes are not ours: errors are mapped by status (``openai_status_error``);
- a gkt cloud (the edge's guidance stream) answers in our envelope: its code names map back onto the error
  table as they are (``gkt_status_error``).

Transport failures map the same way for both (``transport_errors``): a timeout is ``timeout``, any other
broken or refused connection ``upstream_unavailable``; both are retryable before the first byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from shared.errors import ErrorCode, GKTError, code_from_name

_MAX_UPSTREAM_MESSAGE = 500


@contextmanager
def transport_errors(timeout: str, broken: str) -> Iterator[None]:
    """Within the block, an httpx timeout raises ``timeout`` with message ``timeout``, any other transport
    failure ``upstream_unavailable`` with message ``broken`` (the httpx exception is the cause, never sent)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise GKTError(ErrorCode.timeout, timeout) from exc
    except httpx.TransportError as exc:
        raise GKTError(ErrorCode.upstream_unavailable, broken) from exc


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def openai_status_error(status: int, raw: bytes, retry_after: str | None) -> GKTError:
    """An OpenAI-compatible upstream's error status: the client's fault (4xx) keeps the upstream's message;
    server faults stay generic; busy (429, 503) is ``overloaded`` with the upstream's Retry-After."""
    if status in (429, 503):
        wait = _retry_after(retry_after)
        return GKTError(ErrorCode.overloaded, "the teacher upstream is busy; try again shortly",
                        retry_after=1.0 if wait is None else wait)
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


def gkt_status_error(status: int, raw: bytes, retry_after: str | None) -> GKTError:
    """A gkt cloud's refusal: its own code and message (prefixed ``cloud:``), keeping its Retry-After; a body
    that is not our envelope is an upstream error (5xx) or rejection (4xx)."""
    try:
        info = json.loads(raw)["error"]
        code, message = code_from_name(info.get("code")), str(info.get("message", ""))[:_MAX_UPSTREAM_MESSAGE]
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = (ErrorCode.upstream_error if status >= 500 else ErrorCode.upstream_rejected,
                         f"the cloud answered HTTP {status}")
    return GKTError(code, f"cloud: {message}", retry_after=_retry_after(retry_after))


def json_object(resp: httpx.Response, peer: str) -> dict[str, Any]:
    """A peer's JSON object body, or ``protocol_error`` naming the peer (``"the cloud"``, ``"the teacher
    upstream"``) when the body is not JSON or not an object."""
    try:
        obj = resp.json()
    except ValueError as exc:
        raise GKTError(ErrorCode.protocol_error, f"{peer} sent malformed JSON") from exc
    if not isinstance(obj, dict):
        raise GKTError(ErrorCode.protocol_error, f"{peer} sent malformed JSON")
    return obj


def cached_tokens(usage: dict[str, Any]) -> int:
    """Prompt tokens the upstream served from its prefix cache, where it says so: OpenAI's
    ``usage.prompt_tokens_details.cached_tokens`` (vLLM sends it with ``--enable-prompt-tokens-details``);
    0 when absent, so an upstream that does not report them bills every prompt token at the input price."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return 0
    try:
        return max(0, int(details.get("cached_tokens") or 0))
    except (TypeError, ValueError):
        return 0
