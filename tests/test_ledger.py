"""The durable ledger on SQLite and on a real PostgreSQL (private instance on a loopback port): migrations,
one bill per idempotency key (D2), rows that outlive the process that wrote them (D1), and a database that
goes away and comes back (D3). The cloud-level versions run in test_scale_ledger.py.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cloud_service.ledger import Charge, Ledger
from cloud_service.ledger_db import LedgerStore, async_url
from gkt.backing import Postgres
from shared.cost import TeacherRates
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult
from tests.pg import private_postgres

DONE = GenerationResult("stop", prompt_tokens=10, completion_tokens=5, engine_s=0.2, cached_prompt_tokens=4)
CUT = GenerationResult("cancelled", prompt_tokens=10, completion_tokens=2, engine_s=0.1)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    yield from private_postgres()


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    pg: Postgres = request.getfixturevalue("postgres")
    yield pg.url
    store = LedgerStore(pg.url)
    async with store.engine.begin() as conn:  # a clean table for the next test
        await conn.exec_driver_sql("DELETE FROM ledger")
    await store.aclose()


async def open_ledger(url: str) -> Ledger:
    store = LedgerStore(url, timeout_s=2.0)
    assert await store.check(), store.reason
    return Ledger(TeacherRates(), store)


def test_urls_take_the_async_drivers() -> None:
    assert async_url("sqlite:////tmp/x.db") == "sqlite+aiosqlite:////tmp/x.db"
    assert async_url("postgresql://u:p@h:5/db") == "postgresql+asyncpg://u:p@h:5/db"


async def test_rows_are_durable_and_summed_per_tenant(url: str) -> None:
    """D1: what one process committed, the next one reads (a new engine, a new pool)."""
    ledger = await open_ledger(url)
    cost = await ledger.record(Charge("a", "k1", "r1", "m"), DONE)
    await ledger.record(Charge("a", "k2", "r2", "m"), DONE, cached=True)
    await ledger.record(Charge("b", "k1", "r3", "m"), CUT)
    await ledger.aclose()
    again = await open_ledger(url)  # migrations at start-up are idempotent
    a, b, total = await again.tenant("a"), await again.tenant("b"), await again.totals()
    await again.aclose()
    assert (a.requests, a.cache_hits, a.cancelled, a.completion_tokens, a.cached_tokens) == (2, 1, 0, 10, 8)
    assert cost.amount > 0 and a.cost == pytest.approx(cost.amount)  # the cache hit is free
    assert (b.requests, b.cancelled) == (1, 1)
    assert total.requests == 3


async def test_one_bill_per_key(url: str) -> None:
    """D2: an abandoned attempt is replaced by the retry that completes; a completed answer is never billed
    again, also when retries race."""
    ledger = await open_ledger(url)
    key = Charge("a", "same", "r", "m")
    await ledger.record(key, CUT)
    await ledger.record(key, DONE, answer={"pieces": [["Hi", 1]], "result": {}})
    await asyncio.gather(*(ledger.record(key, DONE) for _ in range(4)), ledger.record(key, CUT))
    usage = await ledger.tenant("a")
    prior = await ledger.answered("a", "same")
    await ledger.aclose()
    assert (usage.requests, usage.cancelled, usage.completion_tokens) == (1, 0, 5)
    assert usage.cost == pytest.approx(ledger.price(DONE).amount)
    assert prior is not None and prior["answer"]["pieces"] == [["Hi", 1]]


async def test_concurrent_start_up_migrates_once(postgres: Postgres) -> None:
    stores = [LedgerStore(postgres.url) for _ in range(3)]
    assert all(await asyncio.gather(*(s.check() for s in stores)))
    for s in stores:
        await s.aclose()


async def test_database_down_is_reported_and_refused_then_recovers(tmp_path: Path) -> None:
    """D3: while PostgreSQL is down the store is unhealthy with a reason, writes raise ``store_unavailable``
    (the cloud sends an error frame, never an unbilled done frame) and new work is refused; when it is back,
    the next check restores it."""
    data = Path(tempfile.mkdtemp(prefix="gkt-pg-"))
    pg = Postgres(data).start()
    try:
        ledger = await open_ledger(pg.url)
        await ledger.record(Charge("a", "k1", "r", "m"), DONE)
        pg.kill()
        assert not await ledger.store.check()
        assert ledger.store.reason and ledger.store.reason.startswith("database unavailable")
        with pytest.raises(GKTError) as refused:
            ledger.check()
        assert refused.value.code is ErrorCode.store_unavailable
        with pytest.raises(GKTError) as failed:
            await ledger.record(Charge("a", "k2", "r", "m"), DONE)
        assert failed.value.code is ErrorCode.store_unavailable
        pg.start()
        assert await ledger.store.check() and ledger.store.reason is None
        ledger.check()
        await ledger.record(Charge("a", "k3", "r", "m"), DONE)
        assert (await ledger.tenant("a")).requests == 2  # k1 survived the crash; k2 was never billed
        await ledger.aclose()
    finally:
        pg.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_database_and_redis_passwords_stay_out_of_repr() -> None:
    """S3: the URLs may carry passwords; settings keep them as secrets."""
    from cloud_service.settings import CloudSettings

    s = CloudSettings(auth=False, database_url="postgresql://gkt:pg-s3cret@db:5432/gkt",
                      redis_url="redis://:redis-s3cret@cache:6379/0")
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())
