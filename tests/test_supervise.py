"""``gkt up`` supervises (G3): a service killed with ``kill -9`` is restarted with backoff and said so, the
other keeps serving, and only the operator's signal ends it (exit 0).

The supervisor is tested on real processes (a stdlib HTTP server stands in for a service, readiness on
``/``); ``test_gkt_up_restarts_a_killed_cloud`` runs the real ``gkt up`` with the models.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gkt.launcher import Service, free_port
from gkt.supervise import Backoff, Supervisor


def test_backoff_doubles_to_its_cap_and_resets_after_a_good_run() -> None:
    b = Backoff(initial_s=1, cap_s=8, reset_after_s=60)
    assert [b.next_delay(uptime_s=0.5) for _ in range(5)] == [1, 2, 4, 8, 8]
    assert b.next_delay(uptime_s=120) == 1


def http_server(name: str) -> Service:
    port = free_port()
    return Service(name, [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port,
                   ready_path="/")


def test_a_killed_service_is_restarted_while_the_other_keeps_serving() -> None:
    a, b = http_server("cloud"), http_server("edge")
    out = io.StringIO()
    sup = Supervisor([a, b], backoff=lambda: Backoff(initial_s=0.2, cap_s=1), out=out)
    try:
        a.start().wait_ready(30)
        b.start().wait_ready(30)
        first = a.pid
        os.kill(first, signal.SIGKILL)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while not (a.pid != first and a.is_ready() and "cloud is ready again" in out.getvalue()):
            assert time.monotonic() < deadline, out.getvalue()
            sup.poll()
            assert b.is_ready() and b.exit_code() is None  # the other one was never touched
            time.sleep(0.05)
        said = out.getvalue()
        assert "cloud exited with -9; restarting it in 0 s" in said and "cloud restarted (restart 1)" in said
        assert sup.restarts == {"cloud": 1, "edge": 0}
    finally:
        a.stop()
        b.stop()


@pytest.mark.models
def test_gkt_up_restarts_a_killed_cloud(tmp_path: Path) -> None:
    """`make run`'s `gkt up`: kill -9 of the cloud leaves the edge serving, the cloud comes back, and Ctrl-C
    (SIGINT) ends it with 0."""
    cloud_port, edge_port = free_port(), free_port()
    env = {**os.environ, "GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1",
           "GKT_EDGE_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024"}
    log = tmp_path / "up.log"  # a file, not a pipe: the services' own logs go there too and must never block
    up = subprocess.Popen([sys.executable, "-m", "gkt", "up", "--cloud-port", str(cloud_port), "--edge-port",
                           str(edge_port), "--key-file", str(tmp_path / "edge.key"), "--client-key-file",
                           str(tmp_path / "client.key")], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    cloud_ready = lambda: _ready(cloud_port)  # noqa: E731

    def until(cond, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            assert up.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.2)

    try:
        until(lambda: "gkt is up" in log.read_text(), 900)  # its own start-up is over: now it supervises
        children = Path(f"/proc/{up.pid}/task/{up.pid}/children").read_text().split()
        cloud_pid = next(int(p) for p in children if b"cloud_service" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(cloud_pid, signal.SIGKILL)
        until(lambda: not cloud_ready(), 30)
        assert _ready(edge_port) and up.poll() is None  # the edge keeps serving (it answers alone, R4)
        until(cloud_ready, 900)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        said = log.read_text()
        assert "cloud exited with -9; restarting it in 1 s" in said and "cloud restarted (restart 1)" in said
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False

