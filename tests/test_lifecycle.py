"""Lifecycle on real processes: drain on SIGTERM (G1, G2), readiness reasons (H2), exits (H3), liveness (H1, B3)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cloud_service.app import create_app as create_cloud
from cloud_service.settings import CloudSettings
from gkt.launcher import Service, cloud_service, edge_service, free_port
from shared.generation import GenerationResult, Piece
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_KEYS

SMOL_EDGE = {"GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "2048",
             "GKT_EDGE_DRAIN_TIMEOUT_S": "2", **EDGE_KEYS}
SMOL_CLOUD = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "2048",
              "GKT_CLOUD_DRAIN_TIMEOUT_S": "2", **CLOUD_KEYS}
@pytest.fixture
def stop_later() -> Iterator[Callable[[Service], Service]]:
    """Services a test started are stopped even when the test fails halfway."""
    started: list[Service] = []
    yield lambda s: started.append(s) or s
    for s in started:
        s.stop()


LONG = {"prompt": "Once upon a time", "max_tokens": 1800, "mode": "student", "stream": True}


def stream_in_thread(url: str, body: dict, out: list, headers: dict = CLIENT_AUTH) -> threading.Thread:
    def run() -> None:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
            out.append(r.status_code)
            out.extend(line for line in r.iter_lines() if line.startswith("data: "))
    t = threading.Thread(target=run)
    t.start()
    return t


def wait_for_data(out: list, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(out) >= 3, "the stream never started"


def test_edge_drains_on_sigterm(tmp_path: Path, stop_later) -> None:
    edge = stop_later(edge_service(free_port(), f"http://127.0.0.1:{free_port()}", SMOL_EDGE,
                        log_path=tmp_path / "edge.log")).start().wait_ready()
    long_out: list = []
    t_long = stream_in_thread(edge.url + "/v1/completions", LONG, long_out)
    wait_for_data(long_out)
    t0 = time.monotonic()
    edge.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(edge.url + "/ready", timeout=5)
    assert ready.status_code == 503 and ready.json()["reasons"] == ["draining"]  # G1: at once
    refused = httpx.post(edge.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=CLIENT_AUTH,
                         timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert refused.headers["retry-after"]
    assert httpx.get(edge.url + "/health", timeout=5).status_code == 200  # H1: liveness unaffected
    code = edge.proc.wait(timeout=30)
    t_long.join(10)
    elapsed = time.monotonic() - t0
    assert code == 0 and elapsed < 2 + 5  # drain timeout plus a little
    # G2: the stream still running at the drain deadline ended with an error event, then [DONE].
    assert long_out[0] == 200 and long_out[-1] == "data: [DONE]"
    assert json.loads(long_out[-2][6:])["error"]["code"] == "draining"


def test_short_requests_finish_during_drain(tmp_path: Path, stop_later) -> None:
    env = {**SMOL_EDGE, "GKT_EDGE_DRAIN_TIMEOUT_S": "20"}
    edge = stop_later(edge_service(free_port(), f"http://127.0.0.1:{free_port()}", env,
                                   log_path=tmp_path / "edge.log")).start().wait_ready()
    out: list = []
    t = stream_in_thread(edge.url + "/v1/completions", {**LONG, "max_tokens": 150}, out)
    wait_for_data(out)
    edge.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert edge.proc.wait(timeout=30) == 0
    assert out[-1] == "data: [DONE]" and "finish_reason" in out[-2] and '"error"' not in out[-2]


def test_cloud_drain_ends_open_streams_with_an_error_frame(tmp_path: Path, stop_later) -> None:
    cloud = stop_later(cloud_service(free_port(), SMOL_CLOUD, log_path=tmp_path / "cloud.log")).start().wait_ready()
    out: list = []
    t = stream_in_thread(cloud.url + "/v1/guidance", {"prompt": "Once upon a time", "max_tokens": 1800}, out, AUTH)
    wait_for_data(out)
    cloud.proc.send_signal(signal.SIGTERM)
    assert cloud.proc.wait(timeout=30) == 0
    t.join(10)
    last = json.loads(out[-1][6:])
    assert last["type"] == "error" and last["error"]["code"] == "draining"
    assert sum(json.loads(x[6:])["type"] in ("done", "error") for x in out[1:]) == 1  # F1


def test_unloadable_model_exits_non_zero(tmp_path: Path, stop_later) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    env = {"GKT_CLOUD_MODEL": str(bad), **CLOUD_KEYS}
    svc = stop_later(cloud_service(free_port(), env, log_path=tmp_path / "cloud.log")).start()
    assert svc.proc.wait(timeout=60) != 0


def test_liveness_answers_while_the_engine_works(tmp_path: Path, stop_later) -> None:
    edge = stop_later(edge_service(free_port(), f"http://127.0.0.1:{free_port()}", SMOL_EDGE,
                                   log_path=tmp_path / "edge.log")).start().wait_ready()
    out: list = []
    t = stream_in_thread(edge.url + "/v1/completions", {**LONG, "max_tokens": 400}, out)
    wait_for_data(out)
    worst = 0.0
    for _ in range(10):
        t0 = time.monotonic()
        assert httpx.get(edge.url + "/health", timeout=5).status_code == 200
        worst = max(worst, time.monotonic() - t0)
    # A blocked event loop would answer only after the generation (seconds); allow for a loaded machine.
    assert worst < 1.0
    t.join(60)


class DyingTeacher:
    """Fault injection: a teacher whose engine reports itself dead after one request."""

    model_name = "dying"

    def __init__(self) -> None:
        self.dead: str | None = None

    stats: dict = {}

    async def open(self, request, on_result=None):  # noqa: ANN001, ANN201
        self.dead = "engine dead: injected"

        async def gen():  # noqa: ANN202
            yield Piece("x")
            yield GenerationResult("length", 1, 1)
        return gen()

    async def aclose(self) -> None:
        pass


async def test_dead_engine_fails_readiness_and_requests_exit() -> None:
    """H2/H3: the watchdog turns a dead engine into readiness 503 with the reason and exit code 1."""
    app = create_cloud(CloudSettings(auth=False), engine=DyingTeacher())
    stopped = []
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://cloud") as client:
        app.state.lifecycle.on_fatal = lambda: stopped.append(True)
        assert (await client.get("/ready")).status_code == 200
        await client.post("/v1/guidance", json={"prompt": "a", "max_tokens": 1, "stream": False})
        for _ in range(40):
            if stopped:
                break
            await asyncio.sleep(0.1)
        r = await client.get("/ready")
        assert stopped and r.status_code == 503 and r.json()["reasons"] == ["engine dead: injected"]
        assert app.state.lifecycle.exit_code == 1
        assert (await client.get("/health")).status_code == 200
        refused = await client.post("/v1/guidance", json={"prompt": "a", "max_tokens": 1})
        assert refused.status_code == 500 and refused.json()["error"]["code"] == "engine_error"
