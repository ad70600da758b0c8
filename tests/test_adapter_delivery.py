"""The cloud hands a LoRA adapter to an edge that follows it: real cloud and edge processes over HTTP, SmolLM2
on both sides, tiny adapters written in the test (``tests/lora_gguf.py``).

One module-scoped pair; the test walks an adapter's life in order: a first version is fetched and served; a
second one published while an answer streams is swapped in after that answer, which finishes on the first
(nothing dropped); a corrupt file, an adapter of another base and a cloud gone away each leave the current
adapter serving, counted by reason and shown in ``/ready`` without making the edge unready.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gkt.launcher import Service, cloud_service, edge_service, free_port
from shared.adapters import sha256_file
from shared.models import REGISTRY, resolve
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, ONE_THREAD
from tests.lora_gguf import publish, write_lora

MODEL = "smollm2-135m-instruct"
BASE_SHA = REGISTRY[MODEL].sha256
NAME = "tutor"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service, Path, Path]]:
    shelf = tmp_path_factory.mktemp("shelf")
    logs = tmp_path_factory.mktemp("logs")
    env = {**ONE_THREAD, **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS, "GKT_CLOUD_MODEL": MODEL, "GKT_EDGE_MODEL": MODEL,
           "GKT_CLOUD_N_CTX": "1024", "GKT_EDGE_N_CTX": "1024", "GKT_CLOUD_ADAPTER_DIR": str(shelf),
           "GKT_EDGE_FOLLOW_ADAPTER": NAME, "GKT_EDGE_ADAPTER_POLL_S": "0.3",
           "GKT_EDGE_ADAPTER_DIR": str(tmp_path_factory.mktemp("edge-adapters"))}
    cloud = cloud_service(free_port(), env, log_path=logs / "cloud.log").start()
    edge = edge_service(free_port(), cloud.url, env, log_path=logs / "edge.log").start()
    try:
        yield cloud.wait_ready(), edge.wait_ready(), shelf, logs / "edge.log"
    finally:
        edge.stop()
        cloud.stop()


def version(shelf: Path, seed: int, *, base_sha: str = BASE_SHA, claim: str | None = None) -> str:
    """Publish version ``seed`` of the adapter (written aside, then renamed over the served one, manifest
    last, as ``gkt distill export`` does); returns its sha256."""
    staged = write_lora(resolve(MODEL), shelf / f".staged-{seed}.gguf", seed=seed)
    digest = sha256_file(staged)
    staged.replace(shelf / f"{NAME}.gguf")
    publish(shelf / f"{NAME}.gguf", NAME, MODEL, base_sha, sha256=claim)
    return digest


def serving(edge: Service) -> dict[str, Any] | None:
    return httpx.get(f"{edge.url}/v1/models", headers=CLIENT_AUTH).json()["data"][0]["adapter"]


def updates(edge: Service, result: str) -> float:
    text = httpx.get(f"{edge.url}/metrics").text
    m = re.search(rf'^gkt_edge_adapter_updates_total{{result="{result}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def until(check: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def answer(edge: Service, max_tokens: int = 6) -> dict[str, Any]:
    r = httpx.post(f"{edge.url}/v1/completions", headers=CLIENT_AUTH, timeout=300,
                   json={"prompt": "The three primary colours are", "max_tokens": max_tokens, "mode": "student"})
    assert r.status_code == 200, r.text
    return r.json()


def test_an_adapter_reaches_the_edge_and_is_swapped_without_dropping_an_answer(
    pair: tuple[Service, Service, Path, Path],
) -> None:
    cloud, edge, shelf, log = pair
    assert serving(edge) is None  # nothing published yet: the base model serves, and the edge is ready
    ready = until(lambda: (r := httpx.get(f"{edge.url}/ready").json())["adapter_problem"] and r, "a first poll")
    assert ready["status"] == "ready" and "missing: the cloud does not serve it" in ready["adapter_problem"]

    # The cloud's routes need the edge's key over real HTTP too.
    first = version(shelf, seed=1)
    assert httpx.get(f"{cloud.url}/v1/adapters").status_code == 401
    assert httpx.get(f"{cloud.url}/v1/adapters/{NAME}").status_code == 401
    assert [a["sha256"] for a in httpx.get(f"{cloud.url}/v1/adapters", headers=AUTH).json()["data"]] == [first]

    until(lambda: (serving(edge) or {}).get("sha256") == first, "the first version to serve")
    assert answer(edge)["gkt"]["adapter"]["sha256"] == first
    assert httpx.get(f"{edge.url}/ready").json()["adapter_problem"] is None
    swapped = updates(edge, "swapped")

    # A second version published while a long answer streams: that answer finishes whole on the first.
    events: list[dict[str, Any]] = []
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 120, "mode": "student",
                "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{edge.url}/v1/completions", headers=CLIENT_AUTH, json=body,
                          timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    started.set()
                elif line == "data: [DONE]":
                    events.append({"done": True})

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(120)
    second = version(shelf, seed=2)
    reader.join(300)
    assert events[-1] == {"done": True}
    finish = [c["choices"][0]["finish_reason"] for c in events[:-1] if c.get("choices")]
    assert finish[-1] in ("length", "stop")
    gkt = next(c["gkt"] for c in reversed(events[:-1]) if "gkt" in c)
    text = "".join(c["choices"][0]["text"] for c in events[:-1] if c.get("choices"))
    assert gkt["adapter"]["sha256"] == first and len(text) > 20, (text, gkt)
    until(lambda: (serving(edge) or {}).get("sha256") == second, "the second version to serve")
    assert updates(edge, "swapped") == swapped + 1
    assert answer(edge)["gkt"]["adapter"]["sha256"] == second

    # A corrupt file (its manifest claims another sha256) and an adapter of another base are refused.
    for reason, kwargs in (("corrupt", {"claim": "0" * 64}),
                           ("mismatch", {"base_sha": REGISTRY["qwen2.5-coder-0.5b-instruct"].sha256})):
        before = updates(edge, reason)
        version(shelf, seed=3, **kwargs)
        until(lambda reason=reason, before=before: updates(edge, reason) > before, f"a {reason} refusal")
        ready = httpx.get(f"{edge.url}/ready")
        assert ready.status_code == 200 and reason in ready.json()["adapter_problem"]
        assert serving(edge)["sha256"] == second  # type: ignore[index]
        assert answer(edge)["gkt"]["adapter"]["sha256"] == second
        assert f"adapter {NAME}: {reason}: " in log.read_text()
    assert f"still serving adapter {NAME} (sha256 {second[:12]})" in log.read_text()

    # The cloud gone: the edge keeps serving its adapter, ready, and says why it cannot update.
    cloud.stop()
    until(lambda: updates(edge, "unreachable") > 0, "an unreachable refusal")
    ready = httpx.get(f"{edge.url}/ready")
    assert ready.status_code == 200 and "unreachable" in ready.json()["adapter_problem"]
    assert answer(edge)["gkt"]["adapter"]["sha256"] == second
