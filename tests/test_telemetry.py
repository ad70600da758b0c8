"""Fleet telemetry without models: the edge's outbox (bounded, oldest dropped and counted, durable), the pusher's
retries and refusals (faults injected with httpx.MockTransport), and the cloud's store of records (each stored
once per (tenant, answer id)) on SQLite and a real PostgreSQL. The whole path on real processes:
test_fleet.py. Scenarios E1-E5 in docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from cloud_service.fleet import Fleet, FleetMetrics
from cloud_service.ledger_db import LedgerStore
from edge_agent.app import open_telemetry
from edge_agent.metrics import EdgeMetrics
from edge_agent.outbox import Outbox
from edge_agent.resilience import RetryPolicy
from edge_agent.settings import EdgeSettings
from edge_agent.telemetry import Telemetry
from shared.errors import GKTError
from shared.telemetry import AnswerBatch, AnswerRecord
from tests.test_ledger import postgres  # noqa: F401  (the fixture)


def rec(i: int, **over: object) -> AnswerRecord:
    base = dict(id=f"answer-{i:04d}", mode="gkt", policy="fixed", student_tokens=10 + i, student_prompt_s=0.1,
                student_generation_s=0.2, student_cost=0.001, teacher_cost=0.002, teacher_only_cost=0.01,
                fallback=None, partial=False, finish="stop", at=datetime.now(UTC))
    return AnswerRecord(**{**base, **over})  # type: ignore[arg-type]


def rows(*ids: int) -> list[tuple[str, str]]:
    return [(r.id, r.model_dump_json()) for r in map(rec, ids)]


# --- the outbox (E4) -----------------------------------------------------------------------------------


def test_outbox_bound_drops_the_oldest_and_survives_a_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_records=3)
    assert box.add(rows(1, 2)) == 0
    assert box.add(rows(2)) == 0 and box.size == 2  # an id already queued is kept once
    assert box.add(rows(3, 4, 5)) == 2  # 5 > 3: the two oldest go
    assert [i for i, _ in box.oldest(10)] == ["answer-0003", "answer-0004", "answer-0005"]
    box.remove(["answer-0003"])
    box.close()
    again = Outbox(tmp_path / "o.sqlite3", max_records=3)  # a restart finds what was not acknowledged
    assert again.size == 2 and [i for i, _ in again.oldest(1)] == ["answer-0004"]
    again.close()


# --- the pusher, faults injected --------------------------------------------------------------------------


class Cloud:
    """A scripted cloud: answers each telemetry POST with the next status (200 stores the batch's ids)."""

    def __init__(self, statuses: list[int], refuse: set[str] | None = None) -> None:
        self.statuses = statuses
        self.refuse = refuse or set()
        self.stored: list[str] = []
        self.calls: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        ids = [r["id"] for r in json.loads(request.content)["records"]]
        self.calls.append(len(ids))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200 and self.refuse & set(ids):
            status = 400
        if status == 200:
            self.stored += [i for i in ids if i not in self.stored]
        return httpx.Response(status, json={})


def pusher(tmp_path: Path, cloud: Cloud, max_records: int = 100, batch: int = 50
           ) -> tuple[Telemetry, EdgeMetrics, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(cloud), base_url="http://cloud")
    metrics = EdgeMetrics(CollectorRegistry())
    t = Telemetry(Outbox(tmp_path / "o.sqlite3", max_records), client, metrics, batch=batch, interval_s=0.05,
                  policy=RetryPolicy(base_s=0.02, cap_s=0.05))
    return t, metrics, client


def value(metrics: EdgeMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@pytest.fixture
async def running() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_cloud_that_fails_gets_the_records_later_in_batches(tmp_path: Path, running: list) -> None:
    """E2 (in small): 503s and refused connections back off; nothing is lost or sent twice once it answers."""
    cloud = Cloud([503, 503, 502])
    t, metrics, _ = pusher(tmp_path, cloud, batch=4)
    for i in range(10):
        t._pending.append(rec(i))
    running.append(asyncio.create_task(t.run()))
    # acknowledged (the cloud stores a batch before the edge hears back)
    await until(lambda: value(metrics, "gkt_edge_telemetry_sent_total") == 10)
    assert cloud.stored == [rec(i).id for i in range(10)]  # oldest first
    assert cloud.calls[:3] == [4, 4, 4] and max(cloud.calls) <= 4
    assert value(metrics, "gkt_edge_telemetry_sent_total") == 10 and t.outbox.size == 0


async def test_a_refused_record_is_isolated_dropped_and_counted(tmp_path: Path, running: list) -> None:
    """One record the cloud refuses (400) does not hold back the others."""
    cloud = Cloud([], refuse={rec(2).id})
    t, metrics, _ = pusher(tmp_path, cloud, batch=10)
    for i in range(5):
        t._pending.append(rec(i))
    running.append(asyncio.create_task(t.run()))
    await until(lambda: value(metrics, "gkt_edge_telemetry_sent_total") == 4 and t.outbox.size == 0)
    assert rec(2).id not in cloud.stored
    assert value(metrics, "gkt_edge_telemetry_dropped_total", reason="refused") == 1


async def test_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    """E4 (in small): the bound holds while the cloud is away; the newest are the ones kept."""
    t, metrics, _ = pusher(tmp_path, Cloud([]), max_records=3)
    for i in range(5):
        t._pending.append(rec(i))
    await t._persist()
    assert value(metrics, "gkt_edge_telemetry_dropped_total", reason="full") == 2
    assert [i for i, _ in t.outbox.oldest(10)] == [rec(i).id for i in (2, 3, 4)]


async def test_flush_stops_at_its_timeout_and_keeps_the_rest(tmp_path: Path) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(unreachable), base_url="http://cloud")
    t = Telemetry(Outbox(tmp_path / "o.sqlite3", 10), client, EdgeMetrics(CollectorRegistry()))
    t._pending.append(rec(1))
    async with asyncio.timeout(5):
        await t.flush(0.3)
    assert t.outbox.size == 1  # kept on disk for the next start


# --- the wire model (E5) -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"records": []},
    {"records": [{"id": "x"}]},
    {"records": [{**json.loads(rec(1).model_dump_json()), "student_cost": -1}]},
    {"records": [{**json.loads(rec(1).model_dump_json()), "teacher_cost": float("nan")}]},
    {"records": [{**json.loads(rec(1).model_dump_json()), "extra": 1}]},
    {"records": [{**json.loads(rec(1).model_dump_json()), "at": "2026-12-07T01:00:00"}]},  # no time zone
    {"records": [{**json.loads(rec(1).model_dump_json()), "id": "../../etc"}]},
    {"records": [json.loads(rec(i).model_dump_json()) for i in range(501)]},
    {"records": [{**json.loads(rec(1).model_dump_json()), "at": "0001-01-01T00:00:00+05:00"}]},
    {"records": [{**json.loads(rec(1).model_dump_json()), "fallback": "oops\u0000"}]},
    {"records": [{**json.loads(rec(1).model_dump_json()), "currency": "\ud800SD"}]},
])
def test_bad_batches_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        AnswerBatch.model_validate(bad)


# --- the cloud's store (E1, E3) on SQLite and PostgreSQL ----------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fleet]:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").url
    store = LedgerStore(url, timeout_s=5.0)
    assert await store.check(), store.reason
    try:
        yield Fleet(store, FleetMetrics(CollectorRegistry()), viewers="ops")
    finally:
        async with store.engine.begin() as conn:
            await conn.exec_driver_sql("DELETE FROM fleet_answers")
        await store.aclose()


async def test_records_are_stored_once_per_edge_and_summed(fleet: Fleet) -> None:
    batch = AnswerBatch(records=[rec(1), rec(2, fallback="circuit_open", teacher_cost=0.0), rec(3, partial=True)])
    assert (await fleet.receive("edge-a", batch)).stored == 3
    again = await fleet.receive("edge-a", batch)  # E3: the acknowledgement was lost; the edge sends it again
    assert (again.stored, again.duplicates) == (0, 3)
    assert (await fleet.receive("edge-b", AnswerBatch(records=[rec(1)]))).stored == 1  # ids are per edge
    own = await fleet.usage("edge-a")
    assert "fleet" not in own  # another edge's figures are for fleet viewers only
    e = own["edge"]
    assert (e["answers"], e["fallbacks"], e["partial"], e["student_tokens"]) == (3, 1, 1, 11 + 12 + 13)
    assert e["teacher_cost"] == pytest.approx(0.004) and e["student_cost"] == pytest.approx(0.003)
    assert e["saved"] == pytest.approx(3 * 0.01 - 0.004 - 0.003)
    assert e["saved_fraction"] == pytest.approx(e["saved"] / 0.03)
    view = await fleet.usage("ops")
    assert view["edge"]["answers"] == 0  # the viewer's own key reported nothing
    assert set(view["fleet"]["by_edge"]) == {"edge-a", "edge-b"}
    assert (view["fleet"]["answers"], view["fleet"]["edges"]) == (4, 2)
    counted = fleet.metrics.registry.get_sample_value  # once per stored record
    assert [counted("gkt_cloud_fleet_answers_total", {"edge": e}) for e in ("edge-a", "edge-b")] == [3.0, 1.0]


async def test_a_database_that_is_down_refuses_the_batch(fleet: Fleet) -> None:
    fleet.ledger.healthy = False
    with pytest.raises(GKTError) as err:
        await fleet.receive("edge-a", AnswerBatch(records=[rec(1)]))
    assert err.value.status == 503 and err.value.retry_after
    fleet.ledger.healthy = True


def test_an_outbox_that_cannot_be_opened_turns_telemetry_off(tmp_path: Path) -> None:
    """The edge answers anyway (as it does without its cloud); the log says why telemetry is off."""
    (tmp_path / "a-file").write_text("")
    client = httpx.AsyncClient(base_url="http://cloud")
    settings = EdgeSettings(telemetry_dir=str(tmp_path / "a-file"), auth=False)
    assert open_telemetry(settings, client, EdgeMetrics(CollectorRegistry())) is None
    assert open_telemetry(settings.model_copy(update={"telemetry": False}), client,
                          EdgeMetrics(CollectorRegistry())) is None
    ok = open_telemetry(settings.model_copy(update={"telemetry_dir": str(tmp_path)}), client,
                        EdgeMetrics(CollectorRegistry()))
    assert ok is not None and ok.outbox.path == tmp_path / "outbox-8002.sqlite3"
    ok.outbox.close()


async def test_a_ledger_from_before_fleet_telemetry_is_migrated(tmp_path: Path) -> None:
    """A database at revision 0001 (the ledger alone, with a row) gets the fleet table at start-up; the row stays."""
    store = LedgerStore(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    await store.migrate("0001")
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO ledger (tenant, request_key, request_id, model, finish_reason, cached, prompt_tokens, "
            "completion_tokens, cached_tokens, engine_s, currency, cost, created_at) "
            "VALUES ('edge-a', 'k1', 'r1', 'm', 'stop', 0, 3, 4, 0, 0.1, 'USD', 0.5, '2026-12-07 01:00:00')")
    assert await store.check(), store.reason
    fleet = Fleet(store, FleetMetrics(CollectorRegistry()))
    assert (await fleet.receive("edge-a", AnswerBatch(records=[rec(1)]))).stored == 1
    assert (await store.totals("edge-a"))["cost"] == 0.5
    await store.aclose()
