"""The edge's client for the cloud's guidance stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from shared.errors import ErrorCode, GKTError, IncompleteStreamError, code_from_name
from shared.protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    DoneFrame,
    ErrorFrame,
    GuidanceRequest,
    HeartbeatFrame,
    SSEDecoder,
    TokenFrame,
    parse_frame,
)

Frame = TokenFrame | HeartbeatFrame | DoneFrame | ErrorFrame


class CloudClient:
    """Opens guidance streams on the cloud; the httpx client is owned by the edge app's lifespan."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def guidance(self, request: GuidanceRequest) -> AsyncIterator[Frame]:
        """Frames of one guidance stream, ending with its terminal frame.

        Raises ``GKTError`` when the cloud refuses or cannot be reached (before any frame), when the
        stream breaks, stalls past the read timeout, or ends without a terminal frame.
        """
        body = request.model_dump(exclude_none=True)
        headers = {PROTOCOL_HEADER: PROTOCOL_VERSION, "Accept": "text/event-stream"}
        try:
            async with self._client.stream("POST", "/v1/guidance", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    raise _refusal(resp.status_code, await resp.aread(), resp.headers.get("retry-after"))
                decoder = SSEDecoder()
                expected = 0
                async for chunk in resp.aiter_raw():
                    for data in decoder.feed(chunk):
                        frame = parse_frame(data)
                        if frame.seq != expected:
                            raise GKTError(ErrorCode.protocol_error, "guidance frames out of sequence")
                        expected += 1
                        yield frame
                        if isinstance(frame, DoneFrame | ErrorFrame):
                            return
                raise IncompleteStreamError()
        except httpx.TimeoutException as exc:
            raise GKTError(ErrorCode.timeout, "the cloud did not answer in time") from exc
        except httpx.TransportError as exc:
            raise GKTError(ErrorCode.upstream_unavailable, "the cloud is unreachable or the link broke") from exc


def _refusal(status: int, raw: bytes, retry_after: str | None) -> GKTError:
    try:
        info = json.loads(raw)["error"]
        code, message = code_from_name(info.get("code")), str(info.get("message", ""))[:500]
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = ErrorCode.upstream_error, f"the cloud answered HTTP {status}"
    wait = None
    if retry_after:
        try:
            wait = float(retry_after)
        except ValueError:
            wait = None
    return GKTError(code, f"cloud: {message}", retry_after=wait)
