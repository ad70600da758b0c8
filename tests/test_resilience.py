"""The edge's retry layer, breaker and deadlines (R1, R2, R3, R6, T1, T2, T4, B2, F5)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from edge_agent.cloud import CloudClient
from edge_agent.resilience import CircuitBreaker, RetryPolicy
from gkt.launcher import Service, cloud_service, free_port
from shared.errors import ErrorCode, GKTError, error_body
from shared.protocol import DoneFrame, GuidanceRequest, Timings, TokenFrame, Usage, encode_frame
from tests.conftest import AUTH, CLOUD_KEYS

REQ = GuidanceRequest(prompt="Q: 1+1?\nA:", max_tokens=4)
DONE = DoneFrame(seq=1, finish_reason="length", model="m", usage=Usage(), timings=Timings())


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    b = CircuitBreaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.t = 10.0
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # exactly one probe
    b.failure()  # the probe failed: open again for a full cooldown
    assert b.state == "open"
    clock.t = 20.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    p = RetryPolicy(attempts=5, base_s=0.2, cap_s=1.0)
    rng = random.Random(1)
    waits = [p.delay(n, rng=rng) for n in range(6)]
    for n, w in enumerate(waits):
        d = min(1.0, 0.2 * 2**n)
        assert d / 2 <= w <= d
    assert len({round(p.delay(0, rng=rng), 6) for _ in range(20)}) > 1  # R6: edges do not retry in lockstep
    assert p.delay(0, retry_after=0.9, rng=rng) >= 0.9


def scripted(*responses: Response) -> tuple[httpx.AsyncClient, list[int]]:
    """A cloud that answers the n-th call with the n-th response (the last one repeats)."""
    calls: list[int] = []
    app = FastAPI()

    @app.post("/v1/guidance")
    async def guidance() -> Response:
        calls.append(1)
        return responses[min(len(calls), len(responses)) - 1]

    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cloud"), calls


def busy(retry_after: str = "0") -> Response:
    return JSONResponse(error_body(ErrorCode.overloaded, "busy"), status_code=503, headers={"Retry-After": retry_after})


def stream(*frames) -> Response:
    return Response(b"".join(encode_frame(f) for f in frames), media_type="text/event-stream")


async def collect(client: CloudClient, deadline_s: float = 10.0) -> list:
    return [f async for f in client.guidance(REQ, time.monotonic() + deadline_s)]


FAST = RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05)


async def test_retries_before_first_frame_then_succeeds() -> None:
    http, calls = scripted(busy(), busy(), stream(TokenFrame(seq=0, text="2"), DONE))
    frames = await collect(CloudClient(http, policy=FAST))
    assert len(calls) == 3 and [f.type for f in frames] == ["token", "done"]


async def test_gives_up_after_attempts() -> None:
    http, calls = scripted(busy())
    with pytest.raises(GKTError) as exc:
        await collect(CloudClient(http, policy=FAST))
    assert exc.value.code is ErrorCode.overloaded and len(calls) == 3


async def test_no_retry_after_the_first_frame() -> None:
    """F5: a stream that broke after text is never retried, so no text can be duplicated."""
    http, calls = scripted(stream(TokenFrame(seq=0, text="2")), stream(TokenFrame(seq=0, text="2"), DONE))
    client = CloudClient(http, policy=FAST)
    got = []
    with pytest.raises(GKTError) as exc:
        async for f in client.guidance(REQ, time.monotonic() + 10):
            got.append(f)
    assert exc.value.code is ErrorCode.protocol_error and len(calls) == 1 and len(got) == 1


async def test_no_retry_for_client_errors() -> None:
    http, calls = scripted(JSONResponse(error_body(ErrorCode.invalid_request, "bad"), status_code=400))
    with pytest.raises(GKTError) as exc:
        await collect(CloudClient(http, policy=FAST))
    assert exc.value.code is ErrorCode.invalid_request and len(calls) == 1


async def test_long_retry_after_is_not_waited_for() -> None:
    http, calls = scripted(busy("30"))
    t0 = time.monotonic()
    with pytest.raises(GKTError):
        await collect(CloudClient(http, policy=FAST))
    assert len(calls) == 1 and time.monotonic() - t0 < 5


async def test_retries_stop_at_the_deadline() -> None:
    http, calls = scripted(busy())
    client = CloudClient(http, policy=RetryPolicy(attempts=10, base_s=0.5, cap_s=0.5))
    with pytest.raises(GKTError):
        await collect(client, deadline_s=0.6)
    assert 1 <= len(calls) <= 2


async def test_breaker_opens_on_a_dead_cloud_and_probes_later() -> None:
    """R3 with a real refused connection: after the threshold, calls no longer touch the network."""
    clock = Clock()
    breaker = CircuitBreaker(threshold=2, cooldown_s=5, clock=clock)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}")
    client = CloudClient(http, policy=RetryPolicy(attempts=1), breaker=breaker)
    for _ in range(2):
        with pytest.raises(GKTError) as exc:
            await collect(client)
        assert exc.value.code is ErrorCode.upstream_unavailable
    with pytest.raises(GKTError) as exc:
        await collect(client)
    assert exc.value.code is ErrorCode.circuit_open
    clock.t = 5.0
    with pytest.raises(GKTError) as exc:  # the probe goes out (and fails: still nothing listening)
        await collect(client)
    assert exc.value.code is ErrorCode.upstream_unavailable and breaker.state == "open"
    await http.aclose()


# --- deadlines against a real cloud ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "2048",
           "GKT_CLOUD_HEARTBEAT_S": "0.2", **CLOUD_KEYS}
    svc = cloud_service(free_port(), env, log_path=tmp_path_factory.mktemp("res") / "cloud.log").start()
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def test_cloud_stops_at_the_callers_budget(smol_cloud: Service) -> None:
    """T2/T4: with timeout_ms the cloud ends the stream with a timeout error frame instead of finishing k."""
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "timeout_ms": 400}
    t0 = time.monotonic()
    r = httpx.post(smol_cloud.url + "/v1/guidance", json=body, headers=AUTH, timeout=60)
    elapsed = time.monotonic() - t0
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and '"code":"timeout"' in events[-1]
    assert sum('"type":"done"' in e or '"type":"error"' in e for e in events) == 1  # F1
    assert elapsed < 5
    ok = httpx.post(smol_cloud.url + "/v1/guidance", json={"prompt": "Hi", "max_tokens": 3, "stream": False},
                    headers=AUTH)
    assert ok.status_code == 200  # the context was released: the next request is served


async def test_edge_deadline_ends_guidance_and_tells_the_cloud(smol_cloud: Service) -> None:
    """T1/T4: the edge's guidance deadline cuts a long stream; the cloud was told the remaining budget."""
    http = httpx.AsyncClient(base_url=smol_cloud.url, headers=AUTH, timeout=30)
    client = CloudClient(http, policy=RetryPolicy(attempts=1))
    req = GuidanceRequest(prompt="Once upon a time", max_tokens=1500)
    tokens = 0
    t0 = time.monotonic()
    with pytest.raises(GKTError) as exc:
        async for f in client.guidance(req, time.monotonic() + 1.0):
            tokens += f.type == "token"
    assert exc.value.code is ErrorCode.timeout and tokens > 0
    assert time.monotonic() - t0 < 4
    await http.aclose()


def test_heartbeats_while_idle(smol_cloud: Service) -> None:
    """F4: while the teacher processes a long prompt the stream is silent, so heartbeats come first, then the
    tokens, then exactly one done."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 150
    with httpx.stream("POST", smol_cloud.url + "/v1/guidance", json={"prompt": prompt, "max_tokens": 3},
                      headers=AUTH, timeout=120) as r:
        kinds = [line.split('"type":"')[1].split('"')[0] for line in r.iter_lines() if line.startswith("data: ")]
    assert kinds[0] == "heartbeat" and kinds[-1] == "done" and "token" in kinds
    assert kinds.index("token") > 0 and kinds.count("done") == 1


def test_edge_idle_timeout_is_longer_than_the_cloud_heartbeat() -> None:
    """F4: with the defaults, a live but idle stream never trips the edge's read timeout."""
    from cloud_service.settings import CloudSettings
    from edge_agent.settings import EdgeSettings

    assert EdgeSettings().cloud_read_timeout_s > 2 * CloudSettings().heartbeat_s
