"""Load (L1) and connect/cancel soak (L2, C4) on real processes, short versions of ``gkt bench load``.

Asserted here are the invariants that are not timings: every request ends answered or refused with
``Retry-After`` (lost = 0), overload really was refused, and file descriptors, threads and the servers'
asyncio tasks come back to their baseline. The figures (capacity, goodput ratio, latencies) are printed;
``gkt bench load`` runs the full-length version and records them (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from gkt.bench.load import Target, l1, soak
from gkt.launcher import Service, cloud_service, edge_service, free_port
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS
from tests.test_cancellation import wait_until

SLOTS = 2
LOAD_ENV = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
            "GKT_CLOUD_MAX_IN_FLIGHT": str(SLOTS), "GKT_CLOUD_MAX_WAITING": "2", "GKT_CLOUD_QUEUE_TIMEOUT_S": "5",
            "GKT_CLOUD_CACHE_MAX_ENTRIES": "0", "GKT_CLOUD_RATE_LIMIT_PER_MIN": "1000000",
            "GKT_CLOUD_RATE_LIMIT_BURST": "100000", **CLOUD_KEYS,
            "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
            # The soak is about resources, not the client's rate limit (S5, tested in test_edge_auth.py).
            "GKT_EDGE_RATE_LIMIT_PER_MIN": "1000000", "GKT_EDGE_RATE_LIMIT_BURST": "100000",
            **EDGE_AUTH, **EDGE_KEYS}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    logs = tmp_path_factory.mktemp("load")
    cloud = cloud_service(free_port(), LOAD_ENV, log_path=logs / "cloud.log").start()
    edge = edge_service(free_port(), cloud.url, LOAD_ENV, log_path=logs / "edge.log").start()
    try:
        yield cloud.wait_ready(1800), edge.wait_ready(1800)
    finally:
        edge.stop()
        cloud.stop()


def flat(report: dict, name: str) -> None:
    """fds and asyncio tasks back to baseline; threads within 2 of it. Worker pools (anyio's, the engine's)
    keep idle threads until new work prunes them, so the high-water mark may move by one or two; a leak grows
    with the cycles."""
    base, settled = report["resources"]["baseline"][name], report["resources"]["settled"][name]
    assert settled["fds"] <= base["fds"], (name, base, settled)
    assert 0 < settled["tasks"] <= base["tasks"], (name, base, settled)
    assert settled["threads"] <= base["threads"] + 2, (name, base, settled)


def test_l1_three_times_capacity_loses_nothing(pair: tuple[Service, Service]) -> None:
    """L1: capacity first (closed loop at the admission limit), then three times that rate, open loop."""
    cloud, _ = pair
    report = asyncio.run(l1(Target(cloud.url, AUTH), {"cloud": cloud}, SLOTS,
                            capacity_s=8, load_s=15))
    print("\nL1 (short):", json.dumps(report, indent=1))
    cap, over = report["capacity"], report["overload"]
    for phase in (cap, over):
        assert phase["lost"] == 0, phase["lost_why"]
        assert phase["sent"] == phase["answered"] + phase["refused"]
        assert phase["refused_without_retry_after"] == 0
    assert cap["answered"] > 0 and cap["refused"] == 0  # the closed loop stays within admission
    assert over["answered"] > 0 and over["refused"] > 0  # three times capacity really overflowed
    flat(report, "cloud")


def test_c4_connect_cancel_soak_stays_flat(pair: tuple[Service, Service]) -> None:
    """C4/L2: 150 streamed answers through the edge, abandoned before the headers, after them or after a few
    frames; then a normal answer. fds (sockets, the edge's pooled cloud connections) and threads stay flat,
    nothing is left in flight."""
    cloud, edge = pair
    body = {"prompt": "Once upon a time", "max_tokens": 60, "guidance_tokens": 40}
    report = asyncio.run(soak(edge.url, CLIENT_AUTH, 150, {"cloud": cloud, "edge": edge},
                              path="/v1/completions", body=body))
    print("\nC4 soak:", json.dumps(report, indent=1))
    assert report["after_status"] == 200
    assert report["phases"].pop("error_frames", 0) == 0  # L2: no error frame in the streams read
    assert sum(report["phases"].values()) == 150 + report["warm_up_cycles"]
    flat(report, "edge")
    flat(report, "cloud")
    for svc, gauge in ((cloud, "gkt_cloud_requests_in_flight"), (edge, "gkt_edge_requests_in_flight")):
        wait_until(lambda: f"\n{gauge} 0.0\n" in httpx.get(svc.url + "/metrics").text)  # noqa: B023
