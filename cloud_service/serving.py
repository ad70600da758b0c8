"""The guidance service: turns a teacher generation into frames, a JSON result, or a batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import anyio

from cloud_service.deadline import bounded
from cloud_service.engine import Generation, TeacherEngine
from cloud_service.metrics import CloudMetrics
from cloud_service.settings import CloudSettings
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult, Piece
from shared.lifecycle import Lifecycle
from shared.protocol import (
    BatchGuidanceRequest,
    BatchGuidanceResponse,
    BatchItem,
    DoneFrame,
    ErrorFrame,
    ErrorInfo,
    GuidanceRequest,
    GuidanceResult,
    HeartbeatFrame,
    Timings,
    TokenFrame,
    Usage,
    encode_frame,
)

log = logging.getLogger("gkt.cloud")


class GuidanceService:
    """Validates requests against the teacher, then streams or collects its first k tokens."""

    def __init__(
        self,
        engine: TeacherEngine,
        settings: CloudSettings,
        metrics: CloudMetrics | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics or CloudMetrics()
        self.lifecycle = lifecycle or Lifecycle()

    def _check(self, request: GuidanceRequest) -> None:
        if request.max_tokens > self.settings.max_guidance_tokens:
            raise GKTError(
                ErrorCode.invalid_request,
                f"max_tokens must be at most {self.settings.max_guidance_tokens} on this cloud",
                param="max_tokens",
            )

    async def open(self, request: GuidanceRequest, route: str = "guidance") -> Generation:
        """Validate and start; errors here become an HTTP status (nothing has been sent yet)."""
        budget = self.settings.request_timeout_s
        if request.timeout_ms is not None:
            budget = min(budget, request.timeout_ms / 1000)
        deadline = time.monotonic() + budget
        try:
            self._check(request)
            generation = await self.engine.open(request)
        except GKTError as err:
            self.metrics.rejected(route, err)
            raise
        return self.metrics.observe(bounded(generation, deadline), route)

    def _done(self, seq: int, result: GenerationResult) -> DoneFrame:
        return DoneFrame(
            seq=seq,
            finish_reason="stop" if result.finish_reason == "stop" else "length",
            model=self.engine.model_name,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            timings=Timings(queue_s=result.queue_s, prompt_s=result.prompt_s, generation_s=result.generation_s),
        )

    async def sse(self, generation: Generation) -> AsyncIterator[bytes]:
        """Frames as server-sent events: tokens, heartbeats while idle, exactly one terminal frame."""
        seq = 0
        it = aiter(generation)
        pending: asyncio.Task | None = None
        drained = asyncio.ensure_future(self.lifecycle.drain_deadline.wait())
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(it))
                done, _ = await asyncio.wait(
                    {pending, drained}, timeout=self.settings.heartbeat_s, return_when=asyncio.FIRST_COMPLETED
                )
                if drained in done:
                    # G2: the drain deadline passed; end with a terminal frame rather than silence.
                    err = GKTError(ErrorCode.draining, "the cloud is shutting down; the guidance was cut short")
                    yield encode_frame(ErrorFrame.from_error(seq, err))
                    return
                if not done:
                    # Waiting on the same task keeps the generation untouched while we tell the client
                    # the stream is alive.
                    yield encode_frame(HeartbeatFrame(seq=seq))
                    seq += 1
                    continue
                item = pending.result()
                pending = None
                if isinstance(item, Piece):
                    yield encode_frame(TokenFrame(seq=seq, text=item.text, tokens=item.tokens))
                    seq += 1
                    continue
                yield encode_frame(self._done(seq, item))
                return
        except StopAsyncIteration:
            err = GKTError(ErrorCode.engine_error, "the teacher ended without a result")
            yield encode_frame(ErrorFrame.from_error(seq, err))
        except GKTError as err:
            yield encode_frame(ErrorFrame.from_error(seq, err))
        except Exception:
            log.exception("guidance stream failed")
            err = GKTError(ErrorCode.internal_error, "internal error while generating guidance")
            yield encode_frame(ErrorFrame.from_error(seq, err))
        finally:
            drained.cancel()
            # Shielded: after a client disconnect Starlette cancels this task's scope at every await, and
            # the engine (or the upstream HTTP stream) must really be stopped, not abandoned halfway.
            with anyio.CancelScope(shield=True):
                if pending is not None and not pending.done():
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending
                with contextlib.suppress(Exception):
                    await generation.aclose()  # type: ignore[attr-defined]

    async def collect(self, generation: Generation) -> GuidanceResult:
        """The whole guidance as one result."""
        parts: list[str] = []
        try:
            async for item in generation:
                if isinstance(item, Piece):
                    parts.append(item.text)
                else:
                    done = self._done(0, item)
                    return GuidanceResult(
                        text="".join(parts), finish_reason=done.finish_reason, model=done.model,
                        usage=done.usage, timings=done.timings,
                    )
        finally:
            with contextlib.suppress(Exception):
                await generation.aclose()  # type: ignore[attr-defined]
        raise GKTError(ErrorCode.engine_error, "the teacher ended without a result")

    async def batch(self, request: BatchGuidanceRequest) -> BatchGuidanceResponse:
        """Every item answered or failed on its own; items run ``batch_concurrency`` at a time."""
        gate = asyncio.Semaphore(self.settings.batch_concurrency)

        async def one(index: int, item: GuidanceRequest) -> BatchItem:
            async with gate:
                try:
                    return BatchItem(index=index, result=await self.collect(await self.open(item, "batch")))
                except GKTError as err:
                    info = ErrorInfo(message=err.message, type=err.code.type, code=err.code.name, param=err.param)
                    return BatchItem(index=index, error=info)

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(request.requests)))
        return BatchGuidanceResponse(results=list(results))
