"""Cloud replicas behind haproxy on shared state, all real processes started by ``gkt.cluster`` (private Redis,
haproxy and replicas on loopback ephemeral ports; the ledger a shared SQLite file). Scenarios: S5 across
replicas, K1 affinity, K2 failover, K3 drain behind the balancer, K4 replica killed mid-load (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gkt.backing import Redis
from gkt.cluster import Cluster, Haproxy
from gkt.launcher import Service, edge_service, free_port
from shared.http import AFFINITY_HEADER
from tests.conftest import AUTH, CLIENT_AUTH, EDGE_AUTH, EDGE_KEYS
from tests.scale import REPLICA_ENV, admitted, body, stream

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(not (Haproxy.available() and Redis.available()),
                       reason="haproxy or redis-server missing: make system-deps"),
]


def cluster_of(tmp: Path, **env: str) -> Iterator[Cluster]:
    with Cluster(2, tmp, {**REPLICA_ENV, **env}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from cluster_of(tmp_path_factory.mktemp("cluster"))


def served_by(cluster: Cluster, affinity: str) -> Service:
    """The replica the balancer sends ``affinity`` to (found with one cheap request)."""
    before = [admitted(r) for r in cluster.replicas]
    status, done, _ = stream(cluster.url, body(0, 1), {AFFINITY_HEADER: affinity})
    assert status == 200 and done is not None and done.type == "done"
    grew = [r for r, b in zip(cluster.replicas, before, strict=True) if admitted(r) > b]
    assert len(grew) == 1
    return grew[0]


def restart(cluster: Cluster, replica: Service) -> None:
    replica.stop()
    replica.start().wait_ready()
    deadline = time.monotonic() + 20
    while served_by_any(cluster) < 2:  # haproxy counts it up again after two good checks
        assert time.monotonic() < deadline
        time.sleep(0.3)


def served_by_any(cluster: Cluster) -> int:
    return len({served_by(cluster, f"probe-{i}").name for i in range(12)})


def test_the_limit_holds_across_two_replicas(tmp_path: Path) -> None:
    """S5 with shared state: a key's burst of 5 is spent once across both replicas (round robin without an
    affinity header), not once per replica; refusals carry Retry-After."""
    for cluster in cluster_of(tmp_path, GKT_CLOUD_RATE_LIMIT_BURST="5", GKT_CLOUD_RATE_LIMIT_PER_MIN="0.001"):
        statuses = [stream(cluster.url, body(i, 1))[0] for i in range(10)]
        assert statuses.count(200) == 5 and statuses.count(429) == 5, statuses
        assert all(admitted(r) >= 2 for r in cluster.replicas)  # both replicas served part of the burst
        r = httpx.post(cluster.url + "/v1/guidance", json=body(99, 1, stream=False), headers=AUTH)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_one_answers_calls_stay_on_one_replica(cluster: Cluster) -> None:
    """K1: every call with the same affinity header reaches the same replica (its KV cache); different
    answers spread over both."""
    target = served_by(cluster, "answer-1")
    before = {r.name: admitted(r) for r in cluster.replicas}
    for i in range(5):
        assert stream(cluster.url, body(i, 1), {AFFINITY_HEADER: "answer-1"})[0] == 200
    after = {r.name: admitted(r) for r in cluster.replicas}
    assert {n: after[n] - before[n] for n in after} == {r.name: 5 if r is target else 0 for r in cluster.replicas}
    assert served_by_any(cluster) == 2


def test_affinity_falls_over_when_its_replica_is_gone(cluster: Cluster) -> None:
    """K2: kill -9 of the replica an answer is pinned to; its next call is served by the other one at once
    (haproxy re-sends a connection that failed, before any health check noticed)."""
    target = served_by(cluster, "answer-2")
    os.kill(target.pid, signal.SIGKILL)  # type: ignore[arg-type]
    target.proc.wait()  # type: ignore[union-attr]
    try:
        status, done, text = stream(cluster.url, body(2, 4), {AFFINITY_HEADER: "answer-2"})
        assert status == 200 and done is not None and done.type == "done" and text
    finally:
        restart(cluster, target)


def test_a_draining_replica_finishes_its_streams_while_new_work_goes_elsewhere(cluster: Cluster) -> None:
    """K3 (G1 behind the balancer): SIGTERM the replica during a long stream; the stream ends with its done
    frame; new calls with the same affinity are served by the other replica once the balancer saw /ready
    turn 503 (a caller retrying 503 draining, as the edge does, gets there within a second or two)."""
    target = served_by(cluster, "answer-3")
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(stream, cluster.url, body(3, 160), {AFFINITY_HEADER: "answer-3"})
        deadline = time.monotonic() + 60
        while httpx.get(target.url + "/v1/stats", headers=AUTH).json()["admission"]["in_flight"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        target.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        t0, statuses = time.monotonic(), []
        while True:
            status, done, _ = stream(cluster.url, body(4, 1), {AFFINITY_HEADER: "answer-3"})
            statuses.append(status)
            if status == 200:
                break
            assert status == 503 and time.monotonic() - t0 < 10, statuses
            time.sleep(0.25)
        status, done, text = long.result(120)
    try:
        assert status == 200 and done is not None and done.type == "done", done
        assert done.usage.completion_tokens > 1 and text
        assert target.proc.wait(90) == 0  # type: ignore[union-attr]  # drained, then exited cleanly
    finally:
        restart(cluster, target)


def test_a_replica_killed_mid_load_loses_no_answer(cluster: Cluster, tmp_path: Path) -> None:
    """K4: an edge behind the balancer answers every request while one replica is killed mid-load; answers
    sent after the kill still get guidance (the edge's retries before the first frame, and the balancer's
    redispatch, reach the surviving replica)."""
    env = {"GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
           **EDGE_AUTH, **EDGE_KEYS}
    edge = edge_service(free_port(), cluster.url, env, log_path=tmp_path / "edge.log").start()
    victim = cluster.replicas[0]

    def ask(i: int) -> httpx.Response:
        return httpx.post(edge.url + "/v1/completions", headers=CLIENT_AUTH, timeout=300,
                          json={"prompt": f"Story {i}. Once upon a time", "max_tokens": 12, "guidance_tokens": 6})

    try:
        edge.wait_ready()
        with ThreadPoolExecutor(4) as pool:
            before = [pool.submit(ask, i) for i in range(6)]
            time.sleep(1.0)
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
            after = [pool.submit(ask, 100 + i) for i in range(6)]
            answers = [f.result() for f in before + after]
        assert [r.status_code for r in answers] == [200] * 12
        # lost = 0: every answer whole (a model may end its answer at once; that is an answer, not a loss).
        assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in answers)
        assert sum(bool(r.json()["choices"][0]["text"]) for r in answers) >= 10
        # Guidance after the kill came from the surviving replica (some answers may still have gone to the
        # student alone if the edge's breaker opened on the streams the kill broke: R3, not a loss).
        assert any(r.json()["gkt"]["usage"]["teacher_tokens"] > 0 for r in answers[6:])
    finally:
        edge.stop()
        restart(cluster, victim)
