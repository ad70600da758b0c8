"""The guidance service: turns a teacher generation into frames, a JSON result, or a batch.

Before the engine: the ledger's health (503 while its database is down), the per-key rate limit (429), a
replay of an answer already billed under the caller's ``Idempotency-Key``, the guidance cache (a hit replays
without the engine) and admission (bounded in-flight work and queue, 503). Every answer is priced by the
ledger and its row committed before the done frame is sent; the cost travels in the done frame and the JSON
result.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

from cloud_service.admission import Admission
from cloud_service.cache import CachedGuidance, GuidanceCache
from cloud_service.deadline import bounded, cancel
from cloud_service.engine import Generation, Item, Stream, TeacherEngine
from cloud_service.ledger import Charge, Ledger
from cloud_service.ledger_db import LedgerStore, default_url
from cloud_service.metrics import CloudMetrics
from cloud_service.settings import CloudSettings
from shared.cost import TeacherRates
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult, Piece, TokenChoice
from shared.lifecycle import Lifecycle
from shared.logs import REQUEST_ID
from shared.protocol import (
    BatchGuidanceRequest,
    BatchGuidanceResponse,
    BatchItem,
    DoneFrame,
    ErrorFrame,
    ErrorInfo,
    GuidanceOutcome,
    GuidanceRequest,
    GuidanceResult,
    HeartbeatFrame,
    Timings,
    TokenFrame,
    TokenLogprob,
    Usage,
    encode_frame,
)
from shared.ratelimit import RateLimiter

log = logging.getLogger("gkt.cloud")


class GuidanceService:
    """Validates requests against the teacher, then streams or collects its first k tokens."""

    def __init__(
        self,
        engine: TeacherEngine,
        settings: CloudSettings,
        metrics: CloudMetrics | None = None,
        lifecycle: Lifecycle | None = None,
        store: LedgerStore | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics or CloudMetrics()
        self.lifecycle = lifecycle or Lifecycle()
        self.admission = Admission(settings.max_in_flight, settings.max_waiting, settings.queue_timeout_s)
        redis = settings.redis_url.get_secret_value() if settings.redis_url else None
        self.limiter = RateLimiter(settings.rate_limit_per_min, settings.rate_limit_burst, redis,
                                   on_outage=settings.rate_limit_on_outage, namespace="gkt-cloud")
        self.cache = GuidanceCache(settings.cache_max_entries, settings.cache_max_bytes)
        self.ledger = Ledger(TeacherRates(
            currency=settings.currency, input_per_mtok=settings.price_input_per_mtok,
            cached_input_per_mtok=settings.price_cached_input_per_mtok,
            output_per_mtok=settings.price_output_per_mtok, accelerator_per_hour=settings.price_accelerator_per_hour,
        ), store or ledger_store(settings))

    def _check(self, request: GuidanceRequest) -> None:
        if request.max_tokens > self.settings.max_guidance_tokens:
            raise GKTError(
                ErrorCode.invalid_request,
                f"max_tokens must be at most {self.settings.max_guidance_tokens} on this cloud",
                param="max_tokens",
            )

    async def open(
        self, request: GuidanceRequest, tenant: str, *, route: str = "guidance", rate: bool = True,
        idempotency_key: str | None = None,
    ) -> Stream:
        """Validate, limit, admit and start; errors here become an HTTP status (nothing has been sent yet).

        The generation is bounded by the caller's budget (``timeout_ms``, at most ``request_timeout_s``) and
        observed by the metrics. Whoever holds the stream closes it (``aclose``, idempotent), which stops the
        engine and frees the admission slot, whether or not the response body ever started.
        ``idempotency_key``: the caller's key for this answer; a retry with it is replayed from the ledger
        instead of generated and billed again."""
        budget = self.settings.request_timeout_s
        if request.timeout_ms is not None:
            budget = min(budget, request.timeout_ms / 1000)
        deadline = time.monotonic() + budget
        charge = Charge(tenant, idempotency_key or uuid.uuid4().hex, REQUEST_ID.get(), self.engine.model_name)
        try:
            self._check(request)
            self.ledger.check()
            if rate:
                await self.limiter.take(tenant)
            # The cache and the ledger's replay keep text only: an answer asked with its log-probabilities is
            # always generated (a retried one is still billed once: the ledger keeps the first row).
            text_only = request.top_logprobs is None
            if text_only and idempotency_key is not None and (
                prior := await self.ledger.answered(tenant, idempotency_key)
            ):
                if prior["answer"] is not None:
                    return Stream(_replay(CachedGuidance.from_json(prior["answer"]))).then(self.metrics.observe, route)
            key = self.cache.key(self.engine.model_name, request) if text_only else None
            if key is not None and (hit := self.cache.get(key)) is not None:
                replayed = replace(hit.result, cached_prompt_tokens=hit.result.prompt_tokens)  # no engine read it
                await self.ledger.record(charge, replayed, cached=True, answer=hit.to_json())
                return Stream(_replay(hit)).then(self.metrics.observe, route)
            waited = await self.admission.enter()

            def on_result(result: GenerationResult) -> None:
                if result.finish_reason == "cancelled":  # nobody will see a done frame: bill in the background
                    self.ledger.record_soon(charge, result)

            try:
                generation = await self.engine.open(request, on_result)
            except BaseException:
                self.admission.release()
                raise
        except GKTError as err:
            self.metrics.rejected(route, err)
            raise
        return (
            Stream(generation).on_close(self.admission.release)
            .then(self._admitted, waited, key, charge).then(bounded, deadline).then(self.metrics.observe, route)
        )

    async def _admitted(
        self, generation: Generation, waited: float, key: str | None, charge: Charge
    ) -> AsyncGenerator[Item, None]:
        """The engine's generation; each result is billed (committed) before it is passed on, completed answers
        are cached (the stream's owner frees the slot)."""
        pieces: list[tuple[str, int]] = []
        async for item in generation:
            if isinstance(item, GenerationResult):
                item.queue_s += waited
                answer = CachedGuidance(pieces, item)
                await self.ledger.record(charge, item, answer=answer.to_json())
                if key is not None:
                    self.cache.put(key, pieces, item)
            else:
                pieces.append((item.text, item.tokens))
            yield item

    async def stats(self) -> dict[str, Any]:
        """Plain counters of every stage, for the stats endpoint."""
        totals = await self.ledger.totals()
        return {
            "model": self.engine.model_name,
            "engine": getattr(self.engine, "stats", {}),
            "admission": self.admission.snapshot(),
            "cache": self.cache.snapshot(),
            "ledger": {"currency": self.ledger.rates.currency, **vars(totals)},
            "rate_limited": dict(self.limiter.limited),
            "rate_limit_store": {"shared": self.limiter.shared, "down": self.limiter.store_down,
                                 "outages": self.limiter.outages, "on_outage": self.limiter.on_outage},
        }

    def _outcome(self, result: GenerationResult) -> GuidanceOutcome:
        cached = isinstance(result, _CachedResult)
        return GuidanceOutcome(
            finish_reason="stop" if result.finish_reason == "stop" else "length",
            model=self.engine.model_name,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        cached_tokens=result.cached_prompt_tokens, draft_tokens=result.draft_tokens,
                        draft_accepted_tokens=result.draft_accepted_tokens),
            timings=Timings(queue_s=result.queue_s, prompt_s=result.prompt_s, generation_s=result.generation_s),
            cost=self.ledger.free() if cached else self.ledger.price(result),
            cached=cached,
            draft_accepted=None if result.draft_accepted_text is None else len(result.draft_accepted_text),
        )

    async def sse(self, generation: Generation) -> AsyncIterator[bytes]:
        """Frames as server-sent events: tokens, heartbeats while idle, exactly one terminal frame.

        The generation is closed before the terminal frame is sent: the engine stops as soon as the answer
        is decided, not once a slow client has read the frame."""
        seq = 0
        pending: asyncio.Task | None = None
        drained = asyncio.ensure_future(self.lifecycle.drain_deadline.wait())
        terminal: DoneFrame | ErrorFrame
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(generation))
                done, _ = await asyncio.wait(
                    {pending, drained}, timeout=self.settings.heartbeat_s, return_when=asyncio.FIRST_COMPLETED
                )
                if drained in done:
                    # G2: the drain deadline passed; end with a terminal frame rather than silence.
                    err = GKTError(ErrorCode.draining, "the cloud is shutting down; the guidance was cut short")
                    terminal = ErrorFrame.from_error(seq, err)
                    break
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
                terminal = DoneFrame(seq=seq, **dict(self._outcome(item)))
                break
        except StopAsyncIteration:
            err = GKTError(ErrorCode.engine_error, "the teacher ended without a result")
            terminal = ErrorFrame.from_error(seq, err)
        except GKTError as err:
            terminal = ErrorFrame.from_error(seq, err)
        except Exception:
            log.exception("guidance stream failed")
            err = GKTError(ErrorCode.internal_error, "internal error while generating guidance")
            terminal = ErrorFrame.from_error(seq, err)
        finally:
            drained.cancel()
            await cancel(pending)
            await generation.aclose()
        yield encode_frame(terminal)

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
                    return GuidanceResult(text="".join(parts), logprobs=_logprobs(choices) if parts else None,
                                          **dict(self._outcome(item)))
        finally:
            await generation.aclose()
        raise GKTError(ErrorCode.engine_error, "the teacher ended without a result")

    async def batch(self, request: BatchGuidanceRequest, tenant: str,
                    idempotency_key: str | None = None) -> BatchGuidanceResponse:
        """Every item answered or failed on its own; items run ``batch_concurrency`` at a time.

        The batch is charged to the rate limit as one request per item; item ``i`` of a batch sent with an
        idempotency key is billed under ``<key>#<i>``.
        """
        self.ledger.check()
        await self.limiter.take(tenant, len(request.requests))
        gate = asyncio.Semaphore(self.settings.batch_concurrency)

        async def one(index: int, item: GuidanceRequest) -> BatchItem:
            async with gate:
                try:
                    key = None if idempotency_key is None else f"{idempotency_key}#{index}"
                    gen = await self.open(item, tenant, route="batch", rate=False, idempotency_key=key)
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


async def _replay(hit: CachedGuidance) -> AsyncGenerator[Item, None]:
    for text, tokens in hit.pieces:
        yield Piece(text, tokens)
    r = hit.result
    yield _CachedResult(**{**vars(replace(r)), "queue_s": 0.0, "prompt_s": 0.0, "generation_s": 0.0,
                           "engine_s": 0.0, "cached_prompt_tokens": r.prompt_tokens})


def ledger_store(settings: CloudSettings) -> LedgerStore:
    """The configured ledger database (SQLite in the cache directory unless ``database_url`` says otherwise)."""
    url = settings.database_url.get_secret_value() if settings.database_url else default_url()
    return LedgerStore(url, settings.database_timeout_s)
