"""Fleet metrics by Prometheus's own remote write (issue 19, point 5; O1 across a fleet): real processes only.

A real cloud and a real edge (SmolLM2 on both sides), Prometheus in agent mode scraping the edge and pushing
to a central Prometheus whose remote-write receiver is on and which scrapes the cloud itself. The edge's
``gkt_`` series must reach the central Prometheus with the ``edge`` label, equal to the traffic sent; and
samples scraped while the central Prometheus was down must arrive once it is back (the agent's WAL).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gkt import remote_write
from gkt.launcher import Service, cloud_service, edge_service, free_port
from tests.conftest import CLIENT_AUTH
from tests.test_observability import SMOL, prom_query

ROOT = Path(__file__).resolve().parents[1]
EDGE_NAME = "edge-berlin-7"


def test_committed_configs_are_generated() -> None:
    assert (ROOT / "deploy/prometheus/edge-agent.yml").read_text() == remote_write.agent_config(
        remote_write.DEPLOY_EDGE_TARGET, remote_write.DEPLOY_REMOTE_WRITE_URL)
    assert (ROOT / "deploy/prometheus/central.yml").read_text() == remote_write.central_config(
        remote_write.DEPLOY_CLOUD_TARGETS)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: `apt-get install prometheus`")
@pytest.mark.parametrize("name", ["edge-agent.yml", "central.yml"])
def test_promtool_accepts_the_configs(name: str) -> None:
    # promtool checks agent configs the way the agent reads them (`--agent`): no rules, remote write required.
    extra = ["--agent"] if name == "edge-agent.yml" else []
    out = subprocess.run(["promtool", "check", "config", *extra, str(ROOT / "deploy/prometheus" / name)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Service]]:
    if shutil.which("prometheus") is None:
        pytest.skip("PROMETHEUS NOT INSTALLED: `apt-get install prometheus` (make test does this as root)")
    work = tmp_path_factory.mktemp("fleet")
    cloud = cloud_service(free_port(), SMOL, log_path=work / "cloud.log").start()
    edge = edge_service(free_port(), cloud.url, SMOL, log_path=work / "edge.log").start()
    central = remote_write.central_service(free_port(), [f"127.0.0.1:{cloud.port}"], work / "central",
                                           scrape_interval="1s", log_path=work / "central.log").start()
    agent = remote_write.agent_service(free_port(), f"127.0.0.1:{edge.port}", f"{central.url}/api/v1/write",
                                       EDGE_NAME, work / "agent", scrape_interval="1s",
                                       log_path=work / "agent.log").start()
    services = {"cloud": cloud, "edge": edge, "central": central, "agent": agent}
    try:
        for s in services.values():
            s.wait_ready()
        yield services
    finally:
        for s in reversed(services.values()):
            s.stop()


def ask(edge: Service, n: int) -> None:
    for i in range(n):
        r = httpx.post(edge.url + "/v1/chat/completions", headers=CLIENT_AUTH, timeout=120, json={
            "messages": [{"role": "user", "content": f"What is {i} plus {i + 3}?"}], "max_tokens": 8,
            "guidance_tokens": 4})
        assert r.status_code == 200, r.text


def wait_for(central: Service, expr: str, value: float, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    res: list[dict] = []
    while time.monotonic() < deadline:
        res = prom_query(central, expr)
        if res and float(res[0]["value"][1]) == value:
            return res
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {res}, never {value}")


def test_edge_series_reach_the_central_prometheus_with_the_edge_label(fleet: dict[str, Service]) -> None:
    ask(fleet["edge"], 2)
    res = wait_for(fleet["central"], f'sum(gkt_edge_requests_total{{edge="{EDGE_NAME}"}})', 2.0)
    assert res
    series = prom_query(fleet["central"], f'gkt_edge_requests_total{{edge="{EDGE_NAME}"}}')
    assert {(s["metric"]["job"], s["metric"]["mode"], s["metric"]["outcome"]) for s in series} == {
        ("gkt-edge", "gkt", "ok")}
    # Every gkt_edge_ series came by push and carries the label; the cloud's were scraped centrally, without it.
    names = prom_query(fleet["central"], 'count by (__name__, edge) ({__name__=~"gkt_edge_.+"})')
    assert names and all(n["metric"].get("edge") == EDGE_NAME for n in names)
    cloud = prom_query(fleet["central"], "gkt_cloud_requests_total")
    assert cloud and all("edge" not in s["metric"] and s["metric"]["job"] == "gkt-cloud" for s in cloud)


def test_samples_scraped_while_the_central_prometheus_was_down_arrive_later(fleet: dict[str, Service]) -> None:
    central = fleet["central"]
    before = float(prom_query(central, f'sum(gkt_edge_requests_total{{edge="{EDGE_NAME}"}})')[0]["value"][1])
    central.stop()
    ask(fleet["edge"], 1)  # counted by the edge and scraped by the agent while nobody receives
    asked = time.time()
    time.sleep(4)
    restarted = Service(central.name, central.argv, central.port, ready_path="/-/ready",
                        log_path=central.log_path).start()  # same port, same data
    fleet["central"] = restarted
    restarted.wait_ready()
    wait_for(restarted, f'sum(gkt_edge_requests_total{{edge="{EDGE_NAME}"}})', before + 1)
    # A sample taken while the central Prometheus was down (2.5 s after the answer, 1.5 s before its restart)
    # is there: pushed late from the agent's WAL, not lost.
    r = httpx.get(f"{restarted.url}/api/v1/query", timeout=10, params={
        "query": f'sum(max_over_time(gkt_edge_requests_total{{edge="{EDGE_NAME}"}}[2s]))',
        "time": f"{asked + 2.5:.3f}"})
    assert r.status_code == 200, r.text
    during = r.json()["data"]["result"]
    assert during and float(during[0]["value"][1]) == before + 1, during
