"""The edge's client for the cloud's guidance stream: the one retry layer, the breaker, the deadline."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from edge_agent.resilience import CircuitBreaker, RetryPolicy
from shared.errors import ErrorCode, GKTError, IncompleteStreamError, code_from_name
from shared.http import AFFINITY_HEADER, REQUEST_ID_HEADER
from shared.logs import REQUEST_ID
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
from shared.upstream import gkt_status_error, json_object, transport_errors

VOCAB_TTL_S = 300.0  # how long the teacher's vocabulary fingerprint is trusted before the cloud is asked again

Frame = TokenFrame | HeartbeatFrame | DoneFrame


class CloudClient:
    """Opens guidance streams on the cloud; the httpx client is owned by the edge app's lifespan."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        read_timeout_s: float = 30.0,
    ) -> None:
        self._client = client
        self.policy = policy or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self.read_timeout_s = read_timeout_s
        self._teacher_vocab: tuple[float, str] | None = None  # (when asked, fingerprint; "" when none given)

    async def guidance(self, request: GuidanceRequest, deadline: float) -> AsyncIterator[Frame]:
        """Frames of one guidance stream up to its ``done`` frame (``deadline`` is ``time.monotonic()``).

        Raises ``GKTError`` when the breaker is open, when the cloud refuses or cannot be reached (after the
        retries the deadline allows), when it sends an error frame, or when the stream breaks, stalls past
        the read timeout or the deadline, or ends without a terminal frame.
        """
        if not self.breaker.allow():
            raise GKTError(ErrorCode.circuit_open, "the cloud has been failing; answering without guidance")
        retry = 0
        key = uuid.uuid4().hex  # one per call, the same on its retries: the cloud bills the call once
        while True:
            started = False
            try:
                # aclosing: if our consumer stops early, the HTTP stream to the cloud closes now (which
                # cancels the teacher's work there), not whenever the generator is garbage-collected.
                async with aclosing(self._attempt(request, deadline, key)) as frames:
                    async for frame in frames:
                        started = True
                        yield frame
                self.breaker.success()
                return
            except GKTError as err:
                if err.code.retryable:
                    self.breaker.failure()
                else:
                    self.breaker.success()  # the cloud answered; the request was the problem
                if started or not err.code.retryable or self.breaker.state != "closed":
                    raise
                if err.retry_after is not None and err.retry_after > self.policy.cap_s:
                    raise  # the cloud asks for a longer pause than an interactive answer should wait
                wait = self.policy.delay(retry, err.retry_after)
                retry += 1
                if retry >= self.policy.attempts or time.monotonic() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)
            except GeneratorExit:
                if started:  # the consumer stopped reading a healthy stream
                    self.breaker.success()
                raise

    async def teacher_vocabulary(self) -> str | None:
        """The teacher's vocabulary fingerprint from the cloud's ``/tokenizer_info`` (None when it gives none),
        asked again after ``VOCAB_TTL_S`` (a cloud restarted with another teacher changes it)."""
        if self._teacher_vocab is None or time.monotonic() - self._teacher_vocab[0] > VOCAB_TTL_S:
            info = await self.call("/tokenizer_info", method="GET")
            self._teacher_vocab = (time.monotonic(), str(info.get("vocab_sha256") or ""))
        return self._teacher_vocab[1] or None

    async def call(self, path: str, body: dict[str, Any] | None = None, *, method: str = "POST") -> dict[str, Any]:
        """One JSON call to the cloud (``/tokenize``, ``/detokenize``, ``GET /tokenizer_info``): its answer, or
        its refusal as a ``GKTError``. Not retried and not counted by the breaker: nothing of an answer's text
        depends on it."""
        if not self.breaker.allow():
            raise GKTError(ErrorCode.circuit_open, "the cloud has been failing")
        headers = {REQUEST_ID_HEADER: rid} if (rid := REQUEST_ID.get()) != "-" else {}
        with transport_errors("the cloud did not answer in time", "the cloud is unreachable"):
            resp = await self._client.request(method, path, json=body, headers=headers)
        if resp.status_code != 200:
            raise gkt_status_error(resp.status_code, resp.content, resp.headers.get("retry-after"))
        return json_object(resp, "the cloud")

    async def _attempt(self, request: GuidanceRequest, deadline: float, key: str) -> AsyncIterator[Frame]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GKTError(ErrorCode.timeout, "no time left for guidance")
        body = request.model_copy(update={"timeout_ms": max(1, int(remaining * 1000))}).model_dump(exclude_none=True)
        headers = {PROTOCOL_HEADER: PROTOCOL_VERSION, "Accept": "text/event-stream", "Idempotency-Key": key}
        if (rid := REQUEST_ID.get()) != "-":
            headers[REQUEST_ID_HEADER] = rid  # O2: the cloud logs this request under the client's id
            headers[AFFINITY_HEADER] = rid  # a balancer keeps one answer's calls on one replica (its KV cache)
        base = self._client.timeout
        timeout = httpx.Timeout(connect=min(base.connect or remaining, remaining),
                                read=min(self.read_timeout_s, remaining), write=base.write, pool=base.pool)
        with transport_errors("the cloud did not answer in time", "the cloud is unreachable or the link broke"):
            async with self._client.stream("POST", "/v1/guidance", json=body, headers=headers,
                                           timeout=timeout) as resp:
                if resp.status_code != 200:
                    raise gkt_status_error(resp.status_code, await resp.aread(), resp.headers.get("retry-after"))
                decoder = SSEDecoder()
                expected = 0
                async for chunk in resp.aiter_raw():
                    for data in decoder.feed(chunk):
                        frame = parse_frame(data)
                        if frame.seq != expected:
                            raise GKTError(ErrorCode.protocol_error, "guidance frames out of sequence")
                        expected += 1
                        if isinstance(frame, ErrorFrame):
                            raise GKTError(code_from_name(frame.error.code), f"cloud: {frame.error.message}")
                        yield frame
                        if isinstance(frame, DoneFrame):
                            return
                    if time.monotonic() > deadline:
                        raise GKTError(ErrorCode.timeout, "the guidance deadline passed")
                raise IncompleteStreamError()
