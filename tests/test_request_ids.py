"""Request ids end to end (O2): the id a client gives the edge is in the edge's log lines, in the cloud's
(the edge forwards it) and in error bodies. Real processes (SmolLM2 on both sides); the proof is read from
their log files.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx

from gkt.launcher import Service
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, pair_fixture

ENV = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
       "GKT_CLOUD_MAX_GUIDANCE_TOKENS": "8",
       "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
       **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS}
# shared/logs.py FORMAT: "asctime levelname name [request_id] message"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+ \[(\S+)\] (.*)$")


pair = pair_fixture(ENV)


def lines(svc: Service) -> list[tuple[str, str]]:
    """(request id, message) of every line our logging wrote (llama.cpp's own stderr lines aside)."""
    text = Path(svc.log_path).read_text(errors="replace")  # type: ignore[arg-type]
    return [(m.group(1), m.group(2)) for raw in text.splitlines() if (m := LINE.match(raw))]


def with_id(svc: Service, rid: str) -> list[str]:
    return [msg for got, msg in lines(svc) if got == rid]


def ask(edge: Service, body: dict, rid: str | None, headers: dict | None = None) -> httpx.Response:
    h = {**CLIENT_AUTH, **(headers or {}), **({"X-Request-ID": rid} if rid else {})}
    return httpx.post(edge.url + "/v1/completions", json=body, headers=h, timeout=120)


def test_o2_client_request_id_in_edge_and_cloud_logs(pair: tuple[Service, Service]) -> None:
    cloud, edge = pair
    rid = f"o2-{uuid.uuid4().hex}"
    r = ask(edge, {"prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 6, "guidance_tokens": 4}, rid)
    assert r.status_code == 200 and r.json()["gkt"]["teacher_model"], r.text
    assert r.headers["x-request-id"] == rid
    assert any('"POST /v1/completions HTTP/1.1" 200' in m for m in with_id(edge, rid))
    assert any('"POST /v1/guidance HTTP/1.1" 200' in m for m in with_id(cloud, rid))  # forwarded by the edge


def test_o2_fallback_lines_carry_the_id_on_both_sides(pair: tuple[Service, Service]) -> None:
    """The cloud refuses k above its limit (400); the edge falls back and says so in a log line of the request."""
    cloud, edge = pair
    rid = f"o2-{uuid.uuid4().hex}"
    r = ask(edge, {"prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 12, "guidance_tokens": 12}, rid)  # k > 8
    assert r.status_code == 200 and r.json()["gkt"]["fallback"] == "invalid_request"
    assert any("no guidance (invalid_request)" in m for m in with_id(edge, rid))
    assert any('"POST /v1/guidance HTTP/1.1" 400' in m for m in with_id(cloud, rid))


def test_o2_an_id_the_edge_made_is_the_one_the_cloud_logs(pair: tuple[Service, Service]) -> None:
    cloud, edge = pair
    r = ask(edge, {"prompt": "Q: What is 1 + 1?\nA:", "max_tokens": 3, "guidance_tokens": 2}, None)
    rid = r.headers["x-request-id"]
    assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", rid)
    assert with_id(edge, rid) and with_id(cloud, rid)


def test_o2_error_bodies_carry_the_id(pair: tuple[Service, Service]) -> None:
    cloud, edge = pair
    cases = [
        (ask(edge, {"prompt": "x", "max_tokens": 0}, rid := f"o2-{uuid.uuid4().hex}"), rid, 400),  # validation
        (ask(edge, {"prompt": "x"}, rid2 := f"o2-{uuid.uuid4().hex}", {"Authorization": "Bearer nope"}), rid2, 401),
        (httpx.get(edge.url + "/v1/nothing", headers={**CLIENT_AUTH, "X-Request-ID": (rid3 := "o2-missing")}),
         rid3, 404),
        (httpx.post(cloud.url + "/v1/guidance", json={"prompt": "x", "max_tokens": 99},
                    headers={**AUTH, "X-Request-ID": (rid4 := f"o2-{uuid.uuid4().hex}")}), rid4, 400),
    ]
    for r, want, status in cases:
        assert r.status_code == status and r.json()["error"]["request_id"] == want, r.text
        assert r.headers["x-request-id"] == want


def test_o2_every_request_line_has_an_id(pair: tuple[Service, Service]) -> None:
    """No line written while serving a request lacks its id (the access lines show it for every request)."""
    cloud, edge = pair
    ask(edge, {"prompt": "Hi", "max_tokens": 2, "mode": "student"}, "o2-last")
    for svc in pair:
        served = [(rid, m) for rid, m in lines(svc) if '"POST ' in m or '"GET /v1' in m]
        assert served and all(rid != "-" for rid, _ in served), served
    malformed = "o2 has spaces"  # not a safe id: replaced by one the service makes, never echoed into logs
    r = ask(edge, {"prompt": "Hi", "max_tokens": 2, "mode": "student"}, malformed)
    assert r.headers["x-request-id"] != malformed and with_id(edge, r.headers["x-request-id"])
    assert malformed not in Path(edge.log_path).read_text()  # type: ignore[arg-type]
