"""The teacher tier scaled out: two real vLLM replicas behind vLLM's router (vllm-router), gkt's cloud in front.

Tier ``vllm``: needs ``.venv-vllm`` with vllm-router (``make vllm-setup``) and about 12.5 GiB of free memory
(each replica is about 4.4 GiB); skipped with the reason otherwise. Each replica computes on a core of its
own. The router runs ``round_robin`` here so that consecutive requests land on different replicas: a
verdict's ``/tokenize`` and its completions are then served by different replicas, the case that must work.
The replicas require an API key (``--api-key``), as a production tier would.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gkt import vllm_tier
from gkt.launcher import Service, cloud_service, edge_service, free_port
from shared.auth import new_key
from shared.protocol import SSEDecoder, parse_frame
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, ONE_THREAD, _run

pytestmark = pytest.mark.vllm
TIMEOUT = httpx.Timeout(10.0, read=600.0)
SERVED = "smollm2-tier"
UPSTREAM_KEY = new_key()
UPSTREAM_AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}


@pytest.fixture(scope="module")
def replicas(logs: Path) -> Iterator[list[Service]]:
    if reason := vllm_tier.missing(2):
        pytest.skip(f"vLLM TIER NOT RUN: {reason}")
    started: list[Service] = []
    try:
        for svc in vllm_tier.replica_services("smollm2-135m-instruct", SERVED, 2, api_key=UPSTREAM_KEY, logs=logs):
            started.append(svc.start())
            svc.wait_ready()  # one at a time: two loading at once on two cores thrash
        yield started
    finally:
        for svc in started:
            svc.stop()


@pytest.fixture(scope="module")
def router(replicas: list[Service], logs: Path) -> Iterator[Service]:
    yield from _run(vllm_tier.router_service(free_port(), [r.url for r in replicas], policy="round_robin",
                                             log_path=logs / "vllm-router.log"))


@pytest.fixture(scope="module")
def cloud_tier(router: Service, logs: Path) -> Iterator[Service]:
    env = {**CLOUD_KEYS, "GKT_CLOUD_BACKEND": "openai", "GKT_CLOUD_UPSTREAM_URL": f"{router.url}/v1",
           "GKT_CLOUD_UPSTREAM_API_KEY": UPSTREAM_KEY, "GKT_CLOUD_CACHE_MAX_ENTRIES": "0"}
    yield from _run(cloud_service(free_port(), env, log_path=logs / "cloud_tier.log"))


@pytest.fixture(scope="module")
def edge_tier(cloud_tier: Service, logs: Path) -> Iterator[Service]:
    env = {**ONE_THREAD, **EDGE_AUTH, **EDGE_KEYS, "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_CTX": "2048"}
    yield from _run(edge_service(free_port(), cloud_tier.url, env, log_path=logs / "edge_tier.log"))


def post(service: Service, path: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, headers=UPSTREAM_AUTH if headers is None else headers,
                      timeout=TIMEOUT)


def completion(service: Service, body: dict) -> dict:
    r = post(service, "/v1/completions", {"model": SERVED, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def served(replica: Service) -> float:
    """Requests this replica has finished (vLLM's own counter)."""
    text = httpx.get(f"{replica.url}/metrics", timeout=TIMEOUT).text
    return sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


PROMPT = "The planets of the solar system, in order from the sun, are"


def greedy_pieces(replica: Service) -> list[str]:
    """The teacher's own 12 greedy tokens after PROMPT, as text (a draft made of them is all kept)."""
    ids = post(replica, "/tokenize", {"model": SERVED, "prompt": PROMPT}).json()["tokens"]
    pieces = completion(replica, {"prompt": ids, "max_tokens": 12, "logprobs": 0})["choices"][0]["logprobs"]["tokens"]
    assert len(pieces) == 12
    return pieces


def test_router_forwards_tokenize_and_prompt_logprobs(replicas: list[Service], router: Service) -> None:
    """What verify needs from the upstream, asked of the router: /tokenize (which it forwards without the
    client's headers, and which vLLM does not guard with its key) and prompt_logprobs on /v1/completions."""
    ids = [post(router, "/tokenize", {"model": SERVED, "prompt": PROMPT}, headers={}).json()["tokens"]
           for _ in range(2)]  # round robin: one from each replica
    assert ids[0] == ids[1] == post(replicas[0], "/tokenize", {"model": SERVED, "prompt": PROMPT}).json()["tokens"]
    answer = completion(router, {"prompt": ids[0], "max_tokens": 1, "prompt_logprobs": 1})
    ranks = answer["choices"][0]["prompt_logprobs"]
    assert len(ranks) == len(ids[0]) and ranks[0] is None
    assert all(str(t) in r for t, r in zip(ids[0][1:], ranks[1:], strict=True))
    # The replicas' key still guards generation through the router: it forwards the client's Authorization.
    assert post(router, "/v1/completions", {"model": SERVED, "prompt": PROMPT}, headers={}).status_code == 401


def test_guidance_through_the_router_is_what_vllm_writes(replicas: list[Service], cloud_tier: Service) -> None:
    chat = [{"role": "user", "content": "Name three colours."}]
    with httpx.stream("POST", cloud_tier.url + "/v1/guidance", json={"messages": chat, "max_tokens": 16},
                      headers=AUTH, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        dec = SSEDecoder()
        frames = [parse_frame(d) for chunk in r.iter_raw() for d in dec.feed(chunk)]
    done = frames[-1]
    assert done.type == "done" and done.model == SERVED and [f.seq for f in frames] == list(range(len(frames)))
    ref = post(replicas[1], "/v1/chat/completions", {"model": SERVED, "messages": chat, "max_tokens": 16,
                                                     "temperature": 0}).json()
    assert "".join(f.text for f in frames if f.type == "token") == ref["choices"][0]["message"]["content"]
    assert done.usage.prompt_tokens == ref["usage"]["prompt_tokens"]  # the usage chunk came through the router
    assert done.usage.completion_tokens == ref["usage"]["completion_tokens"]


def test_verify_through_the_router(replicas: list[Service], cloud_tier: Service) -> None:
    """The verify path (cloud_service/engines/openai_verify.py) with its requests spread over both replicas."""
    pieces = greedy_pieces(replicas[0])

    def verify(draft: str) -> dict:
        r = httpx.post(cloud_tier.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT, json={
            "prompt": PROMPT, "draft": draft, "max_tokens": 2, "temperature": 0, "stream": False})
        assert r.status_code == 200, r.text
        return r.json()

    good = "".join(pieces[:6])
    for draft in (good, good + " zebra zebra"):  # all kept; cut after the good part (a second completion)
        out = verify(draft)
        assert out["draft_accepted"] == len(good) and out["text"] == "".join(pieces[6:8]), (draft, out)
        assert out["usage"]["draft_accepted_tokens"] == 6


def test_both_replicas_serve(replicas: list[Service], cloud_tier: Service) -> None:
    before = [served(r) for r in replicas]
    for i in range(4):
        r = httpx.post(cloud_tier.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT,
                       json={"prompt": f"Q: What is {i} + {i}?\nA:", "max_tokens": 4, "stream": False})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10  # vLLM counts a request when its stats are logged: a moment later
    while (done := [served(r) - b for r, b in zip(replicas, before, strict=True)]) != [2, 2]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done == [2, 2]  # round robin, as configured


def test_an_edge_s_drafts_are_checked_through_the_router(edge_tier: Service) -> None:
    body = {"messages": [{"role": "user", "content": "List the numbers from 1 to 30, separated by commas."}],
            "max_tokens": 32, "temperature": 0}
    r = httpx.post(edge_tier.url + "/v1/chat/completions", headers=CLIENT_AUTH, timeout=TIMEOUT, json={
        **body, "guidance_policy": {"name": "verify", "draft_tokens": 6, "max_wait_s": 600}})
    assert r.status_code == 200, r.text
    gkt = r.json()["gkt"]
    assert gkt["fallback"] is None and not gkt["partial"] and len(gkt["calls"]) > 1, gkt
    assert all(c["kind"] == "verify" for c in gkt["calls"]) and gkt["teacher_model"] == SERVED


def test_a_stopped_replica_is_passed_over(replicas: list[Service], router: Service, cloud_tier: Service) -> None:
    """R2 beneath the cloud; last (it stops a replica). Right after a replica dies, before the router's health
    check drops it, the router retries /v1 requests on the other replica but answers 502 for the /tokenize
    calls it sends to the dead one; the cloud's verifier tries those again. Every call is answered."""
    good = "".join(greedy_pieces(replicas[0])[:6])
    replicas[1].stop()
    statuses = [post(router, "/tokenize", {"model": SERVED, "prompt": PROMPT}, headers={}).status_code
                for _ in range(2)]
    assert sorted(statuses) == [200, 502]  # the fault is there: round robin sends one of two to the dead one
    for i in range(4):
        plain = httpx.post(cloud_tier.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT,
                           json={"prompt": f"Q: What is {i} * 3?\nA:", "max_tokens": 4, "stream": False})
        assert plain.status_code == 200 and plain.json()["text"], plain.text
        checked = httpx.post(cloud_tier.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT, json={
            "prompt": PROMPT, "draft": good + " zebra" * i, "max_tokens": 2, "temperature": 0, "stream": False})
        assert checked.status_code == 200 and checked.json()["draft_accepted"] == len(good), checked.text
