"""Cancellation on real processes (C1, C2, C3): a client that leaves stops the work it started, all the way
to the teacher's engine, and nothing else is disturbed, streaming or not. Observed through each service's own
metrics."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx

from gkt.launcher import Service
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, pair_fixture

ENV = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "4096",
       "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "4096",
       **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS}


pair = pair_fixture(ENV)


def metric(svc: Service, name: str, labels: str = "") -> float:
    text = httpx.get(svc.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(cond, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def read_then_leave(url: str, body: dict, chunks: int, headers: dict = AUTH) -> int:
    """Open a stream, read a few events, close the connection; returns how many events were read."""
    seen = 0
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= chunks:
                    break
    return seen


def test_cloud_stream_cancelled_stops_the_engine(pair: tuple[Service, Service]) -> None:
    cloud, _ = pair
    before = metric(cloud, "gkt_cloud_requests_total", '{outcome="cancelled",route="guidance"}')
    read_then_leave(cloud.url + "/v1/guidance", {"prompt": "Once upon a time", "max_tokens": 2000}, 5)
    wait_until(lambda: metric(cloud, "gkt_cloud_requests_in_flight") == 0)
    assert metric(cloud, "gkt_cloud_requests_total", '{outcome="cancelled",route="guidance"}') == before + 1
    # The engine is free at once: a short request is not stuck behind 2000 tokens nobody reads.
    t0 = time.monotonic()
    r = httpx.post(cloud.url + "/v1/guidance", json={"prompt": "Hi", "max_tokens": 2, "stream": False},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["timings"]["queue_s"] < 1.0
    assert time.monotonic() - t0 < 10


def test_cancel_travels_from_the_user_through_the_edge_to_the_teacher(pair: tuple[Service, Service]) -> None:
    """C3: a user leaves during the guidance phase; the edge closes the cloud stream; the teacher stops."""
    cloud, edge = pair
    edge_before = metric(edge, "gkt_edge_requests_total", '{mode="gkt",outcome="cancelled",route="completions"}')
    cloud_before = metric(cloud, "gkt_cloud_requests_total", '{outcome="cancelled",route="guidance"}')
    tokens_before = metric(cloud, "gkt_cloud_guidance_tokens_total")
    read_then_leave(edge.url + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2000,
                                                   "guidance_tokens": 2000, "stream": True}, 5, CLIENT_AUTH)
    wait_until(lambda: metric(cloud, "gkt_cloud_requests_in_flight") == 0 and
               metric(edge, "gkt_edge_requests_in_flight") == 0)
    assert metric(edge, "gkt_edge_requests_total",
                  '{mode="gkt",outcome="cancelled",route="completions"}') == edge_before + 1
    assert metric(cloud, "gkt_cloud_requests_total", '{outcome="cancelled",route="guidance"}') == cloud_before + 1
    # A cancelled generation records no result, so no guidance tokens were counted for it.
    assert metric(cloud, "gkt_cloud_guidance_tokens_total") == tokens_before


def test_cancel_during_student_generation_frees_the_student(pair: tuple[Service, Service]) -> None:
    _, edge = pair
    read_then_leave(edge.url + "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2000,
                                                   "mode": "student", "stream": True}, 5, CLIENT_AUTH)
    wait_until(lambda: metric(edge, "gkt_edge_requests_in_flight") == 0)
    r = httpx.post(edge.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "mode": "student"},
                   headers=CLIENT_AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["gkt"]["timings"]["student_queue_s"] < 1.0


def test_cancelling_a_queued_request_leaves_the_running_one_untouched(pair: tuple[Service, Service]) -> None:
    """C2: the first stream runs; a second one queues behind it and is abandoned; the first completes."""
    cloud, _ = pair
    first: list[str] = []

    def run_first() -> None:
        with httpx.stream("POST", cloud.url + "/v1/guidance", json={"prompt": "Count: 1, 2, 3,", "max_tokens": 120},
                          headers=AUTH, timeout=120) as r:
            first.extend(line for line in r.iter_lines() if line.startswith("data: "))

    t = threading.Thread(target=run_first)
    t.start()
    wait_until(lambda: len(first) > 2)
    try:
        httpx.post(cloud.url + "/v1/guidance", json={"prompt": "Queued", "max_tokens": 50, "stream": False},
                   headers=AUTH, timeout=0.5)
    except httpx.TimeoutException:
        pass  # the client gave up while queued
    t.join(120)
    assert '"type":"done"' in first[-1]
    assert first[-1].count('"completion_tokens":120') == 1


def post_then_leave(svc: Service, path: str, body: dict, headers: dict, busy: str) -> None:
    """Send a non-streaming request on a raw socket, wait until the service is working on it (gauge ``busy``
    is 1) and a little longer, then close the connection without reading anything."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    with socket.create_connection(("127.0.0.1", svc.port)) as s:
        s.sendall(head.encode() + data)
        wait_until(lambda: metric(svc, busy) == 1)
        time.sleep(1.0)  # into the generation (a counting prompt runs to max_tokens, far beyond this)


COUNTING = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "stream": False}


def test_c1_non_streaming_edge_request_cancelled_when_the_client_leaves(pair: tuple[Service, Service]) -> None:
    """C1 (non-streaming): the edge notices the gone client while the student generates, not when it would
    write the answer; the student stops, gauges return to zero, the next request is served at once."""
    _, edge = pair
    label = '{mode="student",outcome="cancelled",route="completions"}'
    before = metric(edge, "gkt_edge_requests_total", label)
    post_then_leave(edge, "/v1/completions", {**COUNTING, "mode": "student"}, CLIENT_AUTH,
                    "gkt_edge_requests_in_flight")
    wait_until(lambda: metric(edge, "gkt_edge_requests_in_flight") == 0)
    assert metric(edge, "gkt_edge_requests_total", label) == before + 1
    assert metric(edge, "gkt_edge_requests_queued") == 0
    r = httpx.post(edge.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "mode": "student"},
                   headers=CLIENT_AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["gkt"]["timings"]["student_queue_s"] < 1.0


def test_c1_non_streaming_gkt_request_cancels_the_teacher_too(pair: tuple[Service, Service]) -> None:
    """C1 + C3 (non-streaming): a user leaves a non-streaming gkt request during the guidance phase; the edge
    closes the cloud stream and the teacher stops too."""
    cloud, edge = pair
    edge_label = '{mode="gkt",outcome="cancelled",route="completions"}'
    edge_before = metric(edge, "gkt_edge_requests_total", edge_label)
    cloud_before = metric(cloud, "gkt_cloud_requests_total", '{outcome="cancelled",route="guidance"}')
    post_then_leave(edge, "/v1/completions", {**COUNTING, "guidance_tokens": 2000}, CLIENT_AUTH,
                    "gkt_edge_requests_in_flight")
    wait_until(lambda: metric(cloud, "gkt_cloud_requests_in_flight") == 0 and
               metric(edge, "gkt_edge_requests_in_flight") == 0)
    assert metric(edge, "gkt_edge_requests_total", edge_label) == edge_before + 1
    assert metric(cloud, "gkt_cloud_requests_total", '{outcome="cancelled",route="guidance"}') == cloud_before + 1


def test_c1_non_streaming_cloud_guidance_cancelled_when_the_client_leaves(pair: tuple[Service, Service]) -> None:
    """C1 on the cloud's non-streaming /v1/guidance: the teacher stops when its caller leaves."""
    cloud, _ = pair
    label = '{outcome="cancelled",route="guidance"}'
    before = metric(cloud, "gkt_cloud_requests_total", label)
    post_then_leave(cloud, "/v1/guidance", COUNTING, AUTH, "gkt_cloud_requests_in_flight")
    wait_until(lambda: metric(cloud, "gkt_cloud_requests_in_flight") == 0)
    assert metric(cloud, "gkt_cloud_requests_total", label) == before + 1
    r = httpx.post(cloud.url + "/v1/guidance", json={"prompt": "Hi", "max_tokens": 2, "stream": False},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["timings"]["queue_s"] < 1.0
