"""Clients as the edge's tenants (S1, S2, S3, S5, S6 on the edge side), with the same ``shared.auth`` the cloud uses.

The edge app runs in process (``httpx.ASGITransport``) around the real SmolLM2 student so each test can set
its own keys and limits; the cloud side is a recorder of what the edge sends (or a closed port). Real
processes: the session's edges (conftest) all run with client keys, and the start-up refusal (S6) is checked
on a real ``python -m edge_agent``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from edge_agent.app import create_app
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine
from gkt.launcher import Service, edge_service, free_port
from shared.auth import KeyRing, key_entry, new_key
from shared.models import resolve
from shared.protocol import DoneFrame, Timings, TokenFrame, Usage, encode_frame
from tests.auth_checks import compared_exactly, deny_by_default, limited_per_key
from tests.conftest import CLIENT_AUTH, CLIENT_KEY, EDGE_KEYS

KEY_A, KEY_B, CLOUD_KEY = new_key(), new_key(), new_key()
KEYS = f"{key_entry('client-a', KEY_A)},{key_entry('client-b', KEY_B)}"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
ASK = {"prompt": "The three primary colours are", "max_tokens": 4, "mode": "student"}


@pytest.fixture(scope="module")
def student() -> Iterator[LlamaEngine]:
    engine = LlamaEngine(resolve("smollm2-135m-instruct"), n_ctx=1024, n_threads=1, name="smollm2-135m-instruct")
    yield engine
    engine.close()


def recording_cloud(seen: list[dict[str, str]]) -> httpx.AsyncClient:
    """A cloud that records each guidance request's headers and answers one token (the edge's own client
    settings, base URL and key, are those ``cloud_http_client`` would build)."""
    app = FastAPI()

    @app.post("/v1/guidance")
    async def guidance(request: Request) -> Response:
        seen.append(dict(request.headers))
        done = DoneFrame(seq=1, finish_reason="length", model="recorder", usage=Usage(prompt_tokens=1,
                         completion_tokens=1), timings=Timings())
        return Response(encode_frame(TokenFrame(seq=0, text=" red")) + encode_frame(done),
                        media_type="text/event-stream")

    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cloud",
                             headers={"Authorization": f"Bearer {CLOUD_KEY}"})


@asynccontextmanager
async def edge(student: LlamaEngine, http: httpx.AsyncClient | None = None,
               **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = EdgeSettings(**{"n_ctx": 1024, "api_keys": KEYS, **overrides})
    http = http or httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    app = create_app(settings, student=student, http=http)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://edge", timeout=120
    ) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client
    await http.aclose()


async def test_s1_every_edge_route_but_probes_needs_a_key(student: LlamaEngine) -> None:
    """S1: walks the app's routes (and its OpenAPI) so a new route is covered without editing this test."""
    async with edge(student) as client:
        await deny_by_default(client, {"/v1/chat/completions", "/v1/completions", "/v1/models"})
        assert (await client.get("/v1/models", headers=A)).status_code == 200


async def test_s2_edge_keys_are_compared_exactly(student: LlamaEngine) -> None:
    async with edge(student) as client:
        await compared_exactly(client, "/v1/completions", ASK, KEY_A, KEY_B)
        r = await client.post("/v1/completions", json=ASK, headers={"Authorization": f"Bearer {CLOUD_KEY}"})
        assert r.status_code == 401  # the edge's own key at the cloud is no client key


async def test_s3_client_keys_stay_out_of_logs_bodies_repr_and_the_cloud(
    student: LlamaEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """S3: neither key appears in a log line, a response body or ``repr(settings)``; the client's key is
    never forwarded to the cloud (the edge calls it with its own key)."""
    settings = EdgeSettings(api_keys=KEYS, cloud_api_key=CLOUD_KEY)
    assert CLOUD_KEY not in repr(settings) and CLOUD_KEY not in str(settings.model_dump())
    seen: list[dict[str, str]] = []
    caplog.set_level(logging.DEBUG)
    async with edge(student, recording_cloud(seen)) as client:
        ok = await client.post("/v1/completions", json={**ASK, "mode": "gkt", "guidance_tokens": 1}, headers=A)
        bad = await client.post("/v1/completions", json=ASK, headers={"Authorization": f"Bearer {KEY_A}x"})
    assert ok.status_code == 200 and ok.json()["gkt"]["teacher_model"] == "recorder"
    assert bad.status_code == 401
    assert [h["authorization"] for h in seen] == [f"Bearer {CLOUD_KEY}"]  # its own key, not the client's
    for text in (ok.text, bad.text, caplog.text):
        assert KEY_A not in text and KEY_B not in text and CLOUD_KEY not in text


async def test_s5_edge_rate_limit_per_key(student: LlamaEngine) -> None:
    # A refill slower than any machine runs the burst: the third request must find the bucket empty.
    async with edge(student, rate_limit_burst=2, rate_limit_per_min=0.001) as client:
        await limited_per_key(client, "/v1/completions", ASK, A, B, burst=2)
        metrics = (await client.get("/metrics")).text
    assert 'gkt_edge_requests_total{mode="student",outcome="refused",route="completions"} 1.0' in metrics


def test_s6_edge_refuses_to_start_with_auth_on_and_no_key() -> None:
    with pytest.raises(RuntimeError, match="GKT_EDGE_API_KEYS"):
        create_app(EdgeSettings(api_keys=""))
    create_app(EdgeSettings(api_keys="", auth=False))  # explicitly off: starts
    with pytest.raises(ValueError, match="GKT_EDGE_API_KEYS") as err:
        create_app(EdgeSettings(api_keys=f"client:{KEY_A}"))  # a key pasted where its hash belongs
    assert KEY_A not in str(err.value)


def test_s6_real_edge_process_exits_with_a_reason() -> None:
    """A real ``python -m edge_agent`` with auth on (the default) and no key exits at once, saying why."""
    env = Service("edge", [], 0, {"GKT_EDGE_PORT": str(free_port()), "GKT_EDGE_API_KEYS": ""}).env
    env.pop("GKT_EDGE_AUTH", None)
    done = subprocess.run([sys.executable, "-m", "edge_agent"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "GKT_EDGE_API_KEYS is empty" in done.stderr


@pytest.fixture(scope="module")
def real_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real edge process with the session's client key; no cloud (student mode needs none)."""
    env = {"GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
           **EDGE_KEYS}
    svc = edge_service(free_port(), f"http://127.0.0.1:{free_port()}", env,
                       log_path=tmp_path_factory.mktemp("edge_auth") / "edge.log")
    svc.start()
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def test_s1_real_edge_refuses_without_a_key(real_edge: Service) -> None:
    """On a real process: no key or a wrong one gets 401 (with the request id), the client key an answer."""
    body = {"prompt": "Hi", "max_tokens": 2, "mode": "student"}
    r = httpx.post(real_edge.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.headers["x-request-id"]
    r = httpx.post(real_edge.url + "/v1/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {new_key()}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert httpx.post(real_edge.url + "/v1/completions", json=body, headers=CLIENT_AUTH,
                      timeout=60).status_code == 200
    assert CLIENT_KEY not in real_edge.log_path.read_text()  # type: ignore[union-attr]


def test_gkt_up_pairs_a_client_key_that_gkt_ask_sends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S6 without friction: `gkt up` gives the edge a client key's hash, keeps the key (0600, reused on the next
    start) and `gkt ask` sends it; configured keys or GKT_EDGE_AUTH=false are left alone."""
    from gkt import ask, launcher

    for var in ("GKT_EDGE_API_KEYS", "GKT_EDGE_API_KEY", "GKT_EDGE_AUTH"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "client.key"
    env = launcher.client_key_env(path)
    key = path.read_text().strip()
    assert KeyRing(env["GKT_EDGE_API_KEYS"]).tenant(key) == "local-client" and key not in env["GKT_EDGE_API_KEYS"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert launcher.client_key_env(path) == env  # the same key next time: clients' scripts keep working
    monkeypatch.setenv("GKT_EDGE_AUTH", "false")
    assert launcher.client_key_env(tmp_path / "other.key") == {}
    monkeypatch.delenv("GKT_EDGE_AUTH")
    monkeypatch.setenv("GKT_EDGE_API_KEYS", KEYS)
    assert launcher.client_key_env(tmp_path / "other.key") == {}

    sent: list[str | None] = []

    class Edge(BaseHTTPRequestHandler):  # a real listener that records what `gkt ask` sends, then refuses
        def do_POST(self) -> None:  # the name http.server dispatches to
            sent.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    monkeypatch.setattr(ask, "CLIENT_KEY_FILE", path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Edge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        parser = argparse.ArgumentParser()
        ask.add_parser(parser.add_subparsers())
        args = parser.parse_args(["ask", "hi", "--edge", f"http://127.0.0.1:{server.server_address[1]}"])
        assert args.func(args) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert sent == [f"Bearer {key}"]
