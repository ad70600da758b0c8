"""Shared fixtures: real services as separate processes on loopback ports, models loaded once a session.

Models come from the local cache (`gkt models fetch`, run by `make test`); a missing model is an error,
not a skip, so a broken setup cannot pass quietly.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gkt.launcher import Service, cloud_service, edge_service, free_port
from shared.auth import key_entry, new_key
from shared.models import DEFAULT_STUDENT, DEFAULT_TEACHER, resolve

ONE_THREAD = {"GKT_CLOUD_N_THREADS": "1", "GKT_EDGE_N_THREADS": "1"}
# One edge key for the session: clouds store its hash, edges send it, tests call clouds with AUTH.
EDGE_KEY = new_key()
CLOUD_KEYS = {"GKT_CLOUD_API_KEYS": key_entry("tests", EDGE_KEY)}
EDGE_AUTH = {"GKT_EDGE_CLOUD_API_KEY": EDGE_KEY}  # the edge's key at the cloud
AUTH = {"Authorization": f"Bearer {EDGE_KEY}"}
# And one client key: edges store its hash (EDGE_KEYS), tests call edges with CLIENT_AUTH.
CLIENT_KEY = new_key()
EDGE_KEYS = {"GKT_EDGE_API_KEYS": key_entry("tests", CLIENT_KEY)}
CLIENT_AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


# The cloud's ledger is durable (a SQLite file by default, in ~/.cache/gkt): tests never write the user's.
# Processes started by session or module fixtures share this session's file; a test gets a file of its own
# (``_own_ledger``), so the exact usage totals one test asserts never include another test's rows.
_LEDGERS = Path(tempfile.mkdtemp(prefix="gkt-test-ledgers-"))
os.environ["GKT_CLOUD_DATABASE_URL"] = f"sqlite:///{_LEDGERS / 'session.sqlite3'}"
# Likewise the edges' telemetry outboxes (one file per edge port) never go to the user's cache.
os.environ["GKT_EDGE_TELEMETRY_DIR"] = str(_LEDGERS / "telemetry")


@pytest.fixture(autouse=True)
def _own_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GKT_CLOUD_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.sqlite3'}")


def auth_for(service: Service) -> dict[str, str]:
    """The header a client needs to call ``service`` (the cloud's tenants are edges; the edge's, clients)."""
    return CLIENT_AUTH if service.name == "edge" else AUTH


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


def _run(service: Service) -> Iterator[Service]:
    service.start()
    try:
        yield service.wait_ready()
    finally:
        service.stop()


@contextmanager
def running_pair(logs: Path, env: dict[str, str]) -> Iterator[tuple[Service, Service]]:
    """A cloud and an edge it guides, both from ``env``, logging to ``logs``; stopped on leaving the block."""
    cloud = cloud_service(free_port(), env, log_path=logs / "cloud.log").start()
    edge = edge_service(free_port(), cloud.url, env, log_path=logs / "edge.log").start()
    try:
        yield cloud.wait_ready(), edge.wait_ready()
    finally:
        edge.stop()
        cloud.stop()


def pair_fixture(env: dict[str, str], *, name: str = "pair") -> Any:
    """A module-scoped fixture ``name``: a cloud and an edge it guides, both from ``env``, each logging into
    the module's own temporary folder. A test module assigns it: ``pair = pair_fixture(ENV)``."""

    @pytest.fixture(scope="module", name=name)
    def _pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
        with running_pair(tmp_path_factory.mktemp(name), env) as pair:
            yield pair

    return _pair


@pytest.fixture(scope="session")
def cloud(logs: Path) -> Iterator[Service]:
    """The default teacher (Qwen2.5-Coder-1.5B) on llama.cpp, one thread."""
    env = {**ONE_THREAD, **CLOUD_KEYS, "GKT_CLOUD_MODEL": DEFAULT_TEACHER, "GKT_CLOUD_N_CTX": "2048"}
    yield from _run(cloud_service(free_port(), env, log_path=logs / "cloud.log"))


@pytest.fixture(scope="session")
def edge(cloud: Service, logs: Path) -> Iterator[Service]:
    """The default student (Qwen2.5-Coder-0.5B) guided by ``cloud``."""
    env = {**ONE_THREAD, **EDGE_AUTH, **EDGE_KEYS, "GKT_EDGE_MODEL": DEFAULT_STUDENT, "GKT_EDGE_N_CTX": "2048"}
    yield from _run(edge_service(free_port(), cloud.url, env, log_path=logs / "edge.log"))


@pytest.fixture(scope="session")
def edge_smol(cloud: Service, logs: Path) -> Iterator[Service]:
    """SmolLM2-135M (a different vocabulary) guided by the Qwen teacher."""
    env = {**ONE_THREAD, **EDGE_AUTH, **EDGE_KEYS, "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_CTX": "2048"}
    yield from _run(edge_service(free_port(), cloud.url, env, log_path=logs / "edge_smol.log"))


@pytest.fixture(scope="session")
def upstream(logs: Path) -> Iterator[Service]:
    """llama-cpp-python's own OpenAI-compatible server: a real upstream for the cloud's OpenAI backend."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(resolve("smollm2-135m-instruct")),
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
            "--n_threads_batch", "1", "--model_alias", "smollm2-upstream"]
    yield from _run(Service("upstream", argv, port, ready_path="/v1/models", log_path=logs / "upstream.log"))


@pytest.fixture(scope="session")
def cloud_upstream(upstream: Service, logs: Path) -> Iterator[Service]:
    env = {**CLOUD_KEYS, "GKT_CLOUD_BACKEND": "openai", "GKT_CLOUD_UPSTREAM_URL": f"{upstream.url}/v1"}
    yield from _run(cloud_service(free_port(), env, log_path=logs / "cloud_upstream.log"))


@pytest.fixture(scope="session")
def edge_upstream(cloud_upstream: Service, logs: Path) -> Iterator[Service]:
    env = {**ONE_THREAD, **EDGE_AUTH, **EDGE_KEYS, "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_CTX": "2048"}
    yield from _run(edge_service(free_port(), cloud_upstream.url, env, log_path=logs / "edge_upstream.log"))
