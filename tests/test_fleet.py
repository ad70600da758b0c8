"""Fleet telemetry on real processes (SmolLM2 on both sides, separate uvicorn processes, the ledger on SQLite):
answers through an edge reach the cloud's ledger and ``/v1/usage`` per edge (E1); an edge whose cloud is
killed keeps its records on disk and delivers them once the cloud is back on the same ledger file (E2); a
batch sent twice is stored once (E3); the outbox bound drops the oldest and counts them (E4); bad bodies get
400 envelopes and store nothing (E5); an edge stopped with records still queued sends them while it
shuts down (E6). Scenarios in docs/RELIABILITY.md; the pusher's and the store's details in test_telemetry.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gkt.launcher import Service, cloud_service, edge_service, free_port
from tests.conftest import AUTH, CLIENT_AUTH, EDGE_AUTH, EDGE_KEYS, ONE_THREAD
from tests.scale import REPLICA_ENV

pytestmark = pytest.mark.models

CLOUD_ENV = {**REPLICA_ENV, "GKT_CLOUD_FLEET_VIEWERS": "tests", "GKT_CLOUD_MAX_GUIDANCE_TOKENS": "64"}
QUESTION = [{"role": "user", "content": "What is 6 times 7?"}]
# One answer of each kind: gkt, the student alone, the teacher alone, and a fallback (k above the cloud's
# limit: the cloud refuses the guidance and the student answers alone).
ANSWERS = [
    {"messages": QUESTION, "max_tokens": 12, "guidance_tokens": 4},
    {"messages": QUESTION, "max_tokens": 8, "mode": "student"},
    {"messages": QUESTION, "max_tokens": 6, "mode": "teacher"},
    {"messages": QUESTION, "max_tokens": 80, "guidance_tokens": 100},
]


def edge_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**ONE_THREAD, **EDGE_AUTH, **EDGE_KEYS, "GKT_EDGE_MODEL": "smollm2-135m-instruct",
            "GKT_EDGE_N_CTX": "1024", "GKT_EDGE_TELEMETRY_DIR": str(tmp / "telemetry"),
            "GKT_EDGE_TELEMETRY_INTERVAL_S": "0.2", "GKT_EDGE_TELEMETRY_RETRY_CAP_S": "0.5", **extra}


def start_cloud(tmp: Path, port: int | None = None, name: str = "cloud") -> Service:
    env = {**CLOUD_ENV, "GKT_CLOUD_DATABASE_URL": f"sqlite:///{tmp / 'ledger.sqlite3'}"}
    return cloud_service(port or free_port(), env, log_path=tmp / f"{name}.log").start().wait_ready()


def start_edge(tmp: Path, cloud_url: str, **extra: str) -> Service:
    return edge_service(free_port(), cloud_url, edge_env(tmp, **extra), log_path=tmp / "edge.log").start().wait_ready()


@pytest.fixture
def stop_after() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in reversed(started):
        s.stop()


def ask(edge: Service, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(edge.url + "/v1/chat/completions", json=body, headers=CLIENT_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["gkt"]


def fleet_usage(cloud: Service) -> dict[str, Any]:
    r = httpx.get(cloud.url + "/v1/usage", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def metric(service: Service, name: str, **labels: str) -> float | None:
    text = httpx.get(service.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)


def stored(tmp: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp / "ledger.sqlite3") as conn:
        return conn.execute("SELECT tenant, answer_id FROM fleet_answers ORDER BY id").fetchall()


def outbox(tmp: Path, edge: Service) -> list[dict[str, Any]]:
    with sqlite3.connect(tmp / "telemetry" / f"outbox-{edge.port}.sqlite3") as conn:
        return [json.loads(b) for (b,) in conn.execute("SELECT body FROM outbox ORDER BY seq")]


def test_e1_answers_reach_the_ledger_and_usage_per_edge(tmp_path: Path, stop_after: list[Service]) -> None:
    cloud = start_cloud(tmp_path)
    stop_after.append(cloud)
    stop_after.append(edge := start_edge(tmp_path, cloud.url))
    answers = [ask(edge, body) for body in ANSWERS]
    assert [a["mode"] for a in answers] == ["gkt", "student", "teacher", "gkt"]
    assert answers[3]["fallback"] == "invalid_request" and answers[0]["fallback"] is None
    wait_for(lambda: fleet_usage(cloud)["edge"]["answers"] == 4, "4 answers in /v1/usage")

    usage = fleet_usage(cloud)
    e = usage["edge"]
    assert e["fallbacks"] == 1 and e["partial"] == 0
    assert e["student_tokens"] == sum(a["usage"]["student_tokens"] for a in answers) > 0
    assert e["student_cost"] == pytest.approx(sum(a["cost"]["student"] for a in answers))
    assert e["teacher_cost"] == pytest.approx(sum(a["cost"]["teacher"] for a in answers))
    assert e["teacher_cost"] > 0
    # The teacher's cost as the edge reported it is what the cloud billed this key for the same answers.
    assert e["teacher_cost"] == pytest.approx(usage["cost"])
    saved = [a["cost"]["saved"] for a in answers if a["cost"]["teacher_only"] is not None]
    assert e["saved"] == pytest.approx(sum(saved))
    assert usage["fleet"]["by_edge"] == {"tests": e} and usage["fleet"]["answers"] == 4
    assert len(stored(tmp_path)) == 4 and {t for t, _ in stored(tmp_path)} == {"tests"}
    assert metric(cloud, "gkt_cloud_fleet_answers_total", edge="tests") == 4
    assert metric(cloud, "gkt_cloud_fleet_fallbacks_total", edge="tests") == 1
    assert metric(cloud, "gkt_cloud_fleet_student_cost_dollars_total", edge="tests") == pytest.approx(e["student_cost"])
    # The cloud commits a batch before the edge hears back: the edge's side settles a moment later.
    wait_for(lambda: metric(edge, "gkt_edge_telemetry_sent_total") == 4, "4 records acknowledged")
    assert metric(edge, "gkt_edge_telemetry_buffered") == 0


def test_e2_cloud_down_records_wait_on_disk_and_arrive_after(tmp_path: Path, stop_after: list[Service]) -> None:
    """kill -9 of the cloud; the edge answers alone, its records wait in the outbox; the cloud restarted on the
    same port and the same ledger file receives them, each once."""
    cloud = start_cloud(tmp_path)
    stop_after.append(edge := start_edge(tmp_path, cloud.url))
    ask(edge, ANSWERS[1])
    wait_for(lambda: len(stored(tmp_path)) == 1, "the first record stored")
    os.kill(cloud.pid, signal.SIGKILL)  # type: ignore[arg-type]
    cloud.proc.wait()  # type: ignore[union-attr]
    during = [ask(edge, body) for body in (ANSWERS[1], ANSWERS[0], ANSWERS[1])]
    assert during[1]["fallback"] is not None  # gkt mode with the cloud gone: the student answered alone
    wait_for(lambda: len(outbox(tmp_path, edge)) == 3, "3 records in the outbox")
    assert metric(edge, "gkt_edge_telemetry_buffered") == 3
    time.sleep(1.5)  # a few failed deliveries (backing off), nothing lost
    assert len(outbox(tmp_path, edge)) == 3

    restarted = start_cloud(tmp_path, cloud.port, name="cloud2")
    stop_after.append(restarted)
    wait_for(lambda: fleet_usage(restarted)["edge"]["answers"] == 4, "4 answers after the restart")
    ids = [i for _, i in stored(tmp_path)]
    assert len(ids) == len(set(ids)) == 4
    assert fleet_usage(restarted)["edge"]["fallbacks"] == 1
    wait_for(lambda: metric(edge, "gkt_edge_telemetry_buffered") == 0, "the outbox empty")
    assert outbox(tmp_path, edge) == []


def record(i: int, **over: Any) -> dict[str, Any]:
    return {"id": f"e3-batch-{i:03d}", "mode": "student", "policy": None, "student_tokens": 5, "student_prompt_s": 0.1,
            "student_generation_s": 0.2, "student_cost": 0.001, "teacher_cost": 0.0, "teacher_only_cost": None,
            "fallback": None, "partial": False, "finish": "stop", "at": datetime.now(UTC).isoformat(), **over}


@pytest.fixture(scope="module")
def lone_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    tmp = tmp_path_factory.mktemp("fleet-cloud")
    cloud = start_cloud(tmp)
    yield cloud, tmp
    cloud.stop()


def post(cloud: Service, content: str | bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(cloud.url + "/v1/telemetry/answers", content=content, timeout=30,
                      headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def test_e3_a_batch_sent_twice_is_stored_once(lone_cloud: tuple[Service, Path]) -> None:
    cloud, tmp = lone_cloud
    before = fleet_usage(cloud)["edge"]["answers"]
    batch = json.dumps({"records": [record(i) for i in range(5)]})
    first, second = post(cloud, batch), post(cloud, batch)  # the first acknowledgement "lost"
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json() == {"accepted": 5, "stored": 5, "duplicates": 0}
    assert second.json() == {"accepted": 5, "stored": 0, "duplicates": 5}
    assert fleet_usage(cloud)["edge"]["answers"] == before + 5
    assert metric(cloud, "gkt_cloud_fleet_records_received_total", result="duplicate") == 5
    assert metric(cloud, "gkt_cloud_fleet_answers_total", edge="tests") == before + 5


BAD = {
    "not json": "{records: [",
    "empty": json.dumps({"records": []}),
    "no records": json.dumps({}),
    "missing fields": json.dumps({"records": [{"id": "e5-missing-1"}]}),
    "unknown field": json.dumps({"records": [record(1, id="e5-extra-01", extra=1)]}),
    "negative cost": json.dumps({"records": [record(1, id="e5-negative", student_cost=-1.0)]}),
    "NaN cost": json.dumps({"records": [record(1, id="e5-nan-cost-1", teacher_cost=float("nan"))]}),
    "bad id": json.dumps({"records": [record(1, id="../../../etc/passwd")]}),
    "no time zone": json.dumps({"records": [record(1, id="e5-naive-at1", at="2026-12-07T01:00:00")]}),
    "too many": json.dumps({"records": [record(i, id=f"e5-many-{i:04d}") for i in range(501)]}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_e5_bad_telemetry_bodies_get_400_envelopes(lone_cloud: tuple[Service, Path], case: str) -> None:
    cloud, tmp = lone_cloud
    before = len(stored(tmp))
    r = post(cloud, BAD[case])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["type"] == "invalid_request_error"
    assert len(stored(tmp)) == before  # nothing of a refused batch is stored


def test_e5_telemetry_needs_an_edge_key(lone_cloud: tuple[Service, Path]) -> None:
    cloud, _ = lone_cloud
    r = post(cloud, json.dumps({"records": [record(900)]}), headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_e4_the_outbox_bound_drops_the_oldest_and_counts_them(tmp_path: Path, stop_after: list[Service]) -> None:
    """No cloud at all (a port nobody listens on): four answers into an outbox of two; the two oldest are
    dropped and counted, the two newest delivered once a cloud comes up on that port."""
    port = free_port()
    stop_after.append(edge := start_edge(tmp_path, f"http://127.0.0.1:{port}", GKT_EDGE_TELEMETRY_MAX_RECORDS="2"))
    marks = []
    for _ in range(4):
        ask(edge, ANSWERS[1])
        marks.append(datetime.now(UTC))
    wait_for(lambda: metric(edge, "gkt_edge_telemetry_dropped_total", reason="full") == 2, "2 dropped")
    kept = outbox(tmp_path, edge)
    assert len(kept) == 2 and metric(edge, "gkt_edge_telemetry_buffered") == 2
    assert all(datetime.fromisoformat(r["at"]) > marks[1] for r in kept)  # the answers after the second
    cloud = start_cloud(tmp_path, port)
    stop_after.append(cloud)
    wait_for(lambda: len(stored(tmp_path)) == 2, "the 2 kept records delivered")
    assert [i for _, i in stored(tmp_path)] == [r["id"] for r in kept]


def test_e6_an_edge_stopped_with_records_queued_sends_them_on_the_way_out(
        tmp_path: Path, stop_after: list[Service]) -> None:
    """A long send interval holds the records back; SIGTERM flushes them within the drain."""
    cloud = start_cloud(tmp_path)
    stop_after.append(cloud)
    edge = start_edge(tmp_path, cloud.url, GKT_EDGE_TELEMETRY_INTERVAL_S="3600")
    stop_after.append(edge)
    for _ in range(2):
        ask(edge, ANSWERS[1])
    wait_for(lambda: len(outbox(tmp_path, edge)) == 2, "2 records queued")
    assert stored(tmp_path) == []
    assert edge.stop() == 0
    assert len(stored(tmp_path)) == 2 and outbox(tmp_path, edge) == []
