"""The guidance service: turns a teacher generation into frames, a JSON result, or a batch.

Before the engine: the per-key rate limit (429), the guidance cache (a hit replays without the engine) and
admission (bounded in-flight work and queue, 503). Every answer is priced by the ledger; the cost travels in
the done frame and the JSON result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from cloud_service.admission import Admission
from cloud_service.cache import CachedGuidance, GuidanceCache
from cloud_service.deadline import bounded, stop
from cloud_service.engine import Generation, Guarded, TeacherEngine
from cloud_service.ledger import Ledger
from cloud_service.metrics import CloudMetrics
from cloud_service.settings import CloudSettings
from shared.auth import RateLimiter
from shared.cost import TeacherRates
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult, Piece, TokenChoice
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
    TokenLogprob,
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
        self.admission = Admission(settings.max_in_flight, settings.max_waiting, settings.queue_timeout_s)
        self.limiter = RateLimiter(settings.rate_limit_per_min, settings.rate_limit_burst)
        self.cache = GuidanceCache(settings.cache_max_entries, settings.cache_max_bytes)
        self.ledger = Ledger(TeacherRates(
            currency=settings.currency, input_per_mtok=settings.price_input_per_mtok,
            output_per_mtok=settings.price_output_per_mtok, accelerator_per_hour=settings.price_accelerator_per_hour,
        ))

    def _check(self, request: GuidanceRequest) -> None:
        if request.max_tokens > self.settings.max_guidance_tokens:
            raise GKTError(
                ErrorCode.invalid_request,
                f"max_tokens must be at most {self.settings.max_guidance_tokens} on this cloud",
                param="max_tokens",
            )

    async def open(
        self, request: GuidanceRequest, tenant: str, *, route: str = "guidance", rate: bool = True
    ) -> Generation:
        """Validate, limit, admit and start; errors here become an HTTP status (nothing has been sent yet).

        The generation is bounded by the caller's budget (``timeout_ms``, at most ``request_timeout_s``) and
        observed by the metrics."""
        budget = self.settings.request_timeout_s
        if request.timeout_ms is not None:
            budget = min(budget, request.timeout_ms / 1000)
        deadline = time.monotonic() + budget
        try:
            self._check(request)
            if rate:
                self.limiter.take(tenant)
            # The cache keeps text only: an answer asked with its log-probabilities is always generated.
            key = None if request.top_logprobs is not None else self.cache.key(self.engine.model_name, request)
            if key is not None and (hit := self.cache.get(key)) is not None:
                self.ledger.record_hit(tenant)
                return self.metrics.observe(_replay(hit), route)
            waited = await self.admission.enter()
            try:
                generation = await self.engine.open(request, lambda result: self.ledger.record(tenant, result))
            except BaseException:
                self.admission.release()
                raise
        except GKTError as err:
            self.metrics.rejected(route, err)
            raise

        async def cleanup() -> None:  # exactly once, whether or not the response body ever started
            self.admission.release()
            with contextlib.suppress(Exception):
                await generation.aclose()  # type: ignore[attr-defined]

        observed = self.metrics.observe(bounded(self._admitted(generation, waited, key), deadline), route)
        return Guarded(observed, cleanup)

    async def _admitted(self, generation: Generation, waited: float, key: str | None) -> Generation:
        """The engine's generation; completed answers are cached (the slot is released by ``Guarded``)."""
        pieces: list[tuple[str, int]] = []
        async for item in generation:
            if isinstance(item, GenerationResult):
                item.queue_s += waited
                if key is not None:
                    self.cache.put(key, pieces, item)
            else:
                pieces.append((item.text, item.tokens))
            yield item

    def stats(self) -> dict[str, Any]:
        """Plain counters of every stage, for the stats endpoint (and metrics)."""
        totals = self.ledger.totals()
        return {
            "model": self.engine.model_name,
            "engine": getattr(self.engine, "stats", {}),
            "admission": self.admission.snapshot(),
            "cache": self.cache.snapshot(),
            "ledger": {"currency": self.ledger.rates.currency, **vars(totals)},
            "rate_limited": dict(self.limiter.limited),
        }

    def _done(self, seq: int, result: GenerationResult) -> DoneFrame:
        cached = isinstance(result, _CachedResult)
        return DoneFrame(
            seq=seq,
            finish_reason="stop" if result.finish_reason == "stop" else "length",
            model=self.engine.model_name,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        draft_tokens=result.draft_tokens, draft_accepted_tokens=result.draft_accepted_tokens),
            timings=Timings(queue_s=result.queue_s, prompt_s=result.prompt_s, generation_s=result.generation_s),
            cost=self.ledger.free() if cached else self.ledger.price(result),
            cached=cached,
            draft_accepted=None if result.draft_accepted_text is None else len(result.draft_accepted_text),
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
                    yield encode_frame(TokenFrame(seq=seq, text=item.text, tokens=item.tokens,
                                                  logprobs=_logprobs(item.choices)))
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
            await stop(pending, generation)

    async def collect(self, generation: Generation) -> GuidanceResult:
        """The whole guidance as one result."""
        parts: list[str] = []
        choices: list[TokenChoice] | None = []  # None once a piece came without them (no ids from the engine)
        try:
            async for item in generation:
                if isinstance(item, Piece):
                    parts.append(item.text)
                    if choices is not None:
                        choices = None if item.choices is None else choices + item.choices
                else:
                    done = self._done(0, item)
                    return GuidanceResult(
                        text="".join(parts), logprobs=_logprobs(choices) if parts else None,
                        finish_reason=done.finish_reason, model=done.model,
                        usage=done.usage, timings=done.timings, cost=done.cost, cached=done.cached,
                        draft_accepted=done.draft_accepted,
                    )
        finally:
            with contextlib.suppress(Exception):
                await generation.aclose()  # type: ignore[attr-defined]
        raise GKTError(ErrorCode.engine_error, "the teacher ended without a result")

    async def batch(self, request: BatchGuidanceRequest, tenant: str) -> BatchGuidanceResponse:
        """Every item answered or failed on its own; items run ``batch_concurrency`` at a time.

        The batch is charged to the rate limit as one request per item.
        """
        self.limiter.take(tenant, len(request.requests))
        gate = asyncio.Semaphore(self.settings.batch_concurrency)

        async def one(index: int, item: GuidanceRequest) -> BatchItem:
            async with gate:
                try:
                    gen = await self.open(item, tenant, route="batch", rate=False)
                    return BatchItem(index=index, result=await self.collect(gen))
                except GKTError as err:
                    info = ErrorInfo(message=err.message, type=err.code.type, code=err.code.name, param=err.param)
                    return BatchItem(index=index, error=info)

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(request.requests)))
        return BatchGuidanceResponse(results=list(results))


def _logprobs(choices: list[TokenChoice] | None) -> list[TokenLogprob] | None:
    if choices is None:
        return None
    return [TokenLogprob(id=c.id, logprob=c.logprob, top=c.top) for c in choices]


class _CachedResult(GenerationResult):
    """A result replayed from the cache (no engine time)."""


async def _replay(hit: CachedGuidance) -> Generation:
    for text, tokens in hit.pieces:
        yield Piece(text, tokens)
    r = hit.result
    yield _CachedResult(**{**vars(replace(r)), "queue_s": 0.0, "prompt_s": 0.0, "generation_s": 0.0,
                           "engine_s": 0.0, "cached_prompt_tokens": r.prompt_tokens})
