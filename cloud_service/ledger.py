"""The cloud's cost ledger: prices every guidance answer and writes it as a durable row (``ledger_db``).

Engines report each generation's final result exactly once, also when the client went away mid-stream, so
streamed and cancelled work is charged for what was really generated (LiteLLM once logged streamed requests
at zero cost). A completed answer's row is committed before its done frame is sent: an answer a client was
told is done is billed, whatever happens to the process next. Cache hits cost nothing and are rows too.

When the database is down the cloud is not ready (``reason``) and refuses new guidance (503
``store_unavailable``) rather than serve unbilled; an answer whose row cannot be written ends with an error
frame instead of its done frame, and the row is logged (``unbilled row``) for the operator to reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from cloud_service.ledger_db import LedgerStore
from shared.cost import TeacherCost, TeacherRates, teacher_cost
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult

log = logging.getLogger("gkt.ledger")


@dataclass
class TenantUsage:
    """Totals for one tenant (or all of them)."""

    requests: int = 0  # guidance answers started on the engine or served from the cache
    cache_hits: int = 0
    cancelled: int = 0  # stopped early (client gone) or failed; charged for what was generated
    prompt_tokens: int = 0  # drafts verified included (input the teacher read)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the engine reused (billed at the cached-input price)
    engine_s: float = 0.0
    cost: float = 0.0

    def add(self, other: TenantUsage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass(frozen=True)
class Charge:
    """Who pays for one answer: the tenant, its idempotency key (one bill per key) and the request id."""

    tenant: str
    key: str
    request_id: str
    model: str


class Ledger:
    """Prices results with the cloud's rates and writes one row per answer."""

    def __init__(self, rates: TeacherRates, store: LedgerStore) -> None:
        self.rates = rates
        self.store = store
        self.recorded = TenantUsage()  # what this process wrote (Prometheus counters; the database has the rest)
        self._pending: set[asyncio.Task[None]] = set()

    def price(self, result: GenerationResult, *, list_price: bool = False) -> TeacherCost:
        """A draft the teacher verified is input it read, priced with the prompt; prompt tokens the engine
        found in its KV cache at the cached-input price (``list_price``: every input token at the full one)."""
        read = result.prompt_tokens + result.draft_tokens
        cached = 0 if list_price else result.cached_prompt_tokens
        return teacher_cost(self.rates, read, result.completion_tokens, result.engine_s, cached)

    def free(self) -> TeacherCost:
        """The cost of a cache hit."""
        return TeacherCost(rates=self.rates)

    def check(self) -> None:
        """Refuse new work while the database is down (nothing could be billed)."""
        if not self.store.healthy:
            raise GKTError(ErrorCode.store_unavailable, "the ledger is unavailable; try again shortly",
                           retry_after=1.0)

    async def record(self, charge: Charge, result: GenerationResult, *, cached: bool = False,
                     answer: dict[str, Any] | None = None) -> TeacherCost:
        """Write the answer's row (committed when this returns) and return its cost."""
        cost = self.free() if cached else self.price(result)
        full = self.price(result, list_price=True)  # the counterfactual: the same tokens, no cache of any kind
        row = dict(tenant=charge.tenant, request_key=charge.key, request_id=charge.request_id, model=charge.model,
                   finish_reason=result.finish_reason, cached=cached,
                   prompt_tokens=result.prompt_tokens + result.draft_tokens,
                   completion_tokens=result.completion_tokens, cached_tokens=result.cached_prompt_tokens,
                   engine_s=0.0 if cached else result.engine_s, currency=self.rates.currency,
                   cost=cost.amount, counterfactual=full.amount, answer=answer)
        try:
            await self.store.write(row)
        except Exception as exc:
            self.store.down(exc)
            log.error("unbilled row (write failed): %s", json.dumps({k: v for k, v in row.items() if k != "answer"}))
            raise GKTError(ErrorCode.store_unavailable, "the ledger is unavailable; the answer was not completed",
                           retry_after=1.0) from None
        self.recorded.add(TenantUsage(requests=1, cache_hits=int(cached),
                                      cancelled=int(result.finish_reason == "cancelled"),
                                      prompt_tokens=row["prompt_tokens"], completion_tokens=result.completion_tokens,
                                      cached_tokens=result.cached_prompt_tokens, engine_s=row["engine_s"],
                                      cost=cost.amount))
        return cost

    def record_soon(self, charge: Charge, result: GenerationResult) -> None:
        """Write an abandoned generation's row in the background (nobody waits for its done frame)."""
        task = asyncio.get_running_loop().create_task(self._record_quietly(charge, result))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record_quietly(self, charge: Charge, result: GenerationResult) -> None:
        with contextlib.suppress(GKTError):  # already logged as an unbilled row
            await self.record(charge, result)

    async def answered(self, tenant: str, key: str) -> dict[str, Any] | None:
        """The completed answer billed under ``key`` (replayed to a retry instead of billed again)."""
        try:
            return await self.store.answered(tenant, key)
        except Exception as exc:
            self.store.down(exc)
            self.check()
            raise

    async def tenant(self, name: str) -> TenantUsage:
        return await self._totals(name)

    async def totals(self) -> TenantUsage:
        return await self._totals(None)

    async def _totals(self, tenant: str | None) -> TenantUsage:
        try:
            return TenantUsage(**await self.store.totals(tenant))
        except Exception as exc:
            self.store.down(exc)
            self.check()
            raise

    async def aclose(self) -> None:
        """Let background writes finish (bounded by the store's timeout), then close the pool."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self.store.timeout_s)
        await self.store.aclose()
