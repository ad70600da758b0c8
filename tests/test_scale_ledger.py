"""The cloud's durable ledger on real processes: ``kill -9`` mid-load loses no answer a client was told was
done (D1), retries with one Idempotency-Key are billed once and replayed (D2), and a PostgreSQL that goes
away makes the cloud not ready with a reason and refuse guidance rather than serve it unbilled (D3).
Scenarios in docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gkt.backing import Postgres
from gkt.launcher import Service, cloud_service, free_port
from tests.conftest import AUTH
from tests.pg import private_postgres
from tests.scale import REPLICA_ENV, body, stream, usage

pytestmark = pytest.mark.models


def cloud_on(database_url: str, log: Path, port: int | None = None) -> Service:
    return cloud_service(port or free_port(), {**REPLICA_ENV, "GKT_CLOUD_DATABASE_URL": database_url},
                         log_path=log).start().wait_ready()


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    yield from private_postgres()


def test_kill_9_mid_load_loses_no_answer_that_was_done(tmp_path: Path) -> None:
    """D1: 12 streams, ``kill -9`` once some have their done frame; after a restart on the same SQLite file
    every answer whose done frame arrived is in the ledger, with the cost the frame stated."""
    db = tmp_path / "ledger.sqlite3"
    cloud = cloud_on(f"sqlite:///{db}", tmp_path / "cloud.log")
    done: dict[str, float] = {}

    def one(i: int) -> None:
        try:
            status, last, _ = stream(cloud.url, body(i, 24), {"Idempotency-Key": f"d1-{i}"}, timeout=60)
        except httpx.HTTPError:
            return  # cut by the kill: never told done
        if status == 200 and last is not None and last.type == "done":
            done[f"d1-{i}"] = last.cost.amount  # type: ignore[union-attr]

    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, i) for i in range(12)]
            deadline = time.monotonic() + 300
            while len(done) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(cloud.pid, signal.SIGKILL)  # type: ignore[arg-type]
            for f in futures:
                f.result()
        assert 3 <= len(done) < 12  # killed mid-load
        restarted = cloud_on(f"sqlite:///{db}", tmp_path / "cloud2.log", cloud.port)
        try:
            with sqlite3.connect(db) as conn:
                rows = dict(conn.execute("SELECT request_key, cost FROM ledger WHERE finish_reason != 'cancelled'"))
            assert set(done) <= set(rows)
            assert all(rows[k] == pytest.approx(done[k]) for k in done)
            assert usage(restarted.url)["requests"] >= len(done)
        finally:
            restarted.stop()
    finally:
        cloud.stop()


def test_retries_are_billed_once_and_replayed(tmp_path: Path) -> None:
    """D2: the same Idempotency-Key sent again (in turn and at once, streamed and not) is one row; retries
    get the same text, marked cached, at no cost."""
    cloud = cloud_on(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", tmp_path / "cloud.log")
    key = {"Idempotency-Key": "d2-answer"}
    try:
        status, first, text = stream(cloud.url, body(1, 8), key)
        assert status == 200 and first is not None and first.type == "done" and not first.cached
        again = [stream(cloud.url, body(1, 8), key) for _ in range(2)]
        with ThreadPoolExecutor(3) as pool:
            again += list(pool.map(lambda _: stream(cloud.url, body(1, 8), key), range(3)))
        whole = httpx.post(cloud.url + "/v1/guidance", json=body(1, 8, stream=False), headers={**AUTH, **key},
                           timeout=60).json()
        for status, last, retext in again:
            assert status == 200 and last is not None and last.type == "done"
            assert last.cached and last.cost.amount == 0 and retext == text  # type: ignore[union-attr]
        assert whole["text"] == text and whole["cached"] and whole["cost"]["amount"] == 0
        u = usage(cloud.url)
        assert u["requests"] == 1 and u["cost"] == pytest.approx(first.cost.amount)  # type: ignore[union-attr]
        other = stream(cloud.url, body(1, 8), {"Idempotency-Key": "d2-other"})[1]
        assert other is not None and not other.cached and usage(cloud.url)["requests"] == 2
        bad = httpx.post(cloud.url + "/v1/guidance", json=body(1, 8), headers={**AUTH, "Idempotency-Key": "a b"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    finally:
        cloud.stop()


def test_database_down_makes_the_cloud_not_ready(postgres: Postgres, tmp_path: Path) -> None:
    """D3: PostgreSQL killed -> /ready 503 naming the database within the probe interval, guidance refused
    with 503 store_unavailable and Retry-After; PostgreSQL back -> ready and billing again."""
    cloud = cloud_on(postgres.url, tmp_path / "cloud.log")
    try:
        assert stream(cloud.url, body(1, 2))[0] == 200
        postgres.kill()
        deadline = time.monotonic() + 15
        while (ready := httpx.get(cloud.url + "/ready", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert ready.status_code == 503 and any(r.startswith("database unavailable") for r in ready.json()["reasons"])
        refused = httpx.post(cloud.url + "/v1/guidance", json=body(2, 2), headers=AUTH, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert refused.headers["retry-after"] == "1"
        postgres.start()
        deadline = time.monotonic() + 30
        while httpx.get(cloud.url + "/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert stream(cloud.url, body(3, 2))[0] == 200
        assert usage(cloud.url)["requests"] == 2
    finally:
        cloud.stop()
