"""Edges as tenants, admission, the guidance cache and the ledger, on the real SmolLM2 teacher (llama.cpp).

The cloud app runs in process (``httpx.ASGITransport``) around one real batched engine, so each test can
configure keys, limits and queue bounds; the network paths run on real processes in test_batching/test_e2e.
Scenarios: S1, S2, S3, S5, S6, B1, B2.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from cloud_service.app import create_app
from cloud_service.engines.llama_cpp import LlamaTeacher
from cloud_service.settings import CloudSettings
from edge_agent.settings import EdgeSettings
from shared.auth import KeyRing, key_entry, new_key
from shared.protocol import GuidanceRequest, SSEDecoder, parse_frame
from tests.auth_checks import compared_exactly, deny_by_default, limited_per_key

KEY_A, KEY_B = new_key(), new_key()
KEYS = f"{key_entry('edge-a', KEY_A)},{key_entry('edge-b', KEY_B)}"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
PROMPT = {"prompt": "The three primary colours are", "max_tokens": 8, "stream": False}


@pytest.fixture(scope="module")
def teacher() -> Iterator[LlamaTeacher]:
    settings = CloudSettings(model="smollm2-135m-instruct", n_ctx=1024, max_in_flight=4, n_threads=1, auth=False)
    engine = LlamaTeacher.from_settings(settings)
    yield engine
    engine.close()


@asynccontextmanager
async def cloud(teacher: LlamaTeacher, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = CloudSettings(**{"model": "smollm2-135m-instruct", "n_ctx": 1024, "api_keys": KEYS, **overrides})
    app = create_app(settings, engine=teacher)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://cloud", timeout=120
    ) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def frames(raw: bytes) -> list:
    return [parse_frame(d) for d in SSEDecoder().feed(raw)]


# --- keys (S1, S2, S3, S6) ---------------------------------------------------------------------------


async def test_every_route_but_health_needs_a_key(teacher: LlamaTeacher) -> None:
    async with cloud(teacher) as client:
        await deny_by_default(client, {"/v1/guidance", "/v1/guidance/batch", "/v1/stats", "/v1/usage", "/v1/adapters",
                                      "/v1/adapters/{name}"})


async def test_keys_are_compared_exactly(teacher: LlamaTeacher) -> None:
    async with cloud(teacher) as client:
        await compared_exactly(client, "/v1/guidance", PROMPT, KEY_A, KEY_B)


def test_key_ring_stores_hashes_only() -> None:
    ring = KeyRing(KEYS)
    assert len(ring) == 2 and ring.tenant(KEY_A) == "edge-a" and ring.tenant(KEY_B) == "edge-b"
    assert ring.tenant(KEY_A.swapcase()) is None and KEY_A not in KEYS
    with pytest.raises(ValueError) as err:
        KeyRing(f"edge-a:{KEY_A}")  # a key pasted where its hash belongs
    assert KEY_A not in str(err.value)


def test_secrets_stay_out_of_repr() -> None:
    edge = EdgeSettings(cloud_api_key=KEY_A)
    assert KEY_A not in repr(edge) and KEY_A not in str(edge.model_dump())


def test_refuses_to_start_with_auth_on_and_no_keys() -> None:
    with pytest.raises(RuntimeError, match="GKT_CLOUD_API_KEYS"):
        create_app(CloudSettings(api_keys=""))
    create_app(CloudSettings(api_keys="", auth=False))  # explicitly off: starts


# --- rate limits and usage (S5) ------------------------------------------------------------------------


async def test_rate_limit_per_key(teacher: LlamaTeacher) -> None:
    async with cloud(teacher, rate_limit_burst=2, rate_limit_per_min=0.001) as client:
        await limited_per_key(client, "/v1/guidance", PROMPT, A, B, burst=2)
        # A batch costs one request per item.
        r = await client.post("/v1/guidance/batch", json={"requests": [PROMPT, PROMPT]}, headers=B)
        assert r.status_code == 429
        stats = (await client.get("/v1/stats", headers=A)).json()
        assert stats["rate_limited"] == {"edge-a": 1, "edge-b": 1}


async def test_usage_totals_per_key(teacher: LlamaTeacher) -> None:
    async with cloud(teacher) as client:
        one = (await client.post("/v1/guidance", json=PROMPT, headers=A)).json()
        two = (await client.post("/v1/guidance", json={**PROMPT, "prompt": "Cats are"}, headers=A)).json()
        (await client.post("/v1/guidance", json={**PROMPT, "prompt": "Dogs are"}, headers=B)).json()
        ua = (await client.get("/v1/usage", headers=A)).json()
        ub = (await client.get("/v1/usage", headers=B)).json()
    assert ua["tenant"] == "edge-a" and ua["requests"] == 2 and ub["requests"] == 1
    assert ua["completion_tokens"] == one["usage"]["completion_tokens"] + two["usage"]["completion_tokens"]
    assert ua["prompt_tokens"] == one["usage"]["prompt_tokens"] + two["usage"]["prompt_tokens"]
    assert ua["cost"] == pytest.approx(one["cost"]["amount"] + two["cost"]["amount"])


# --- admission (B1, B2) --------------------------------------------------------------------------------

# Counting runs the whole budget without an end-of-turn; the cache is off so every request is engine work.
LONG = {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 200, "stream": False}


async def test_overflow_is_refused_fast_with_retry_after(teacher: LlamaTeacher) -> None:
    async with cloud(teacher, max_in_flight=1, max_waiting=1, queue_timeout_s=60, cache_max_entries=0) as client:
        running = asyncio.create_task(client.post("/v1/guidance", json=LONG, headers=A))
        while client.app.state.service.admission.stats.in_flight < 1:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(client.post("/v1/guidance", json=LONG, headers=A))
        while client.app.state.service.admission.stats.waiting < 1:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/guidance", json=LONG, headers=A)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert not running.done()  # refused at once, while the first is still generating
        assert (await running).status_code == 200 and (await queued).status_code == 200
        adm = (await client.get("/v1/stats", headers=A)).json()["admission"]
    assert adm["refused_full"] == 1 and adm["admitted"] == 2 and adm["in_flight"] == 0 and adm["waiting"] == 0


async def test_queue_deadline_never_reaches_the_engine(teacher: LlamaTeacher) -> None:
    async with cloud(teacher, max_in_flight=1, max_waiting=4, queue_timeout_s=0.3, cache_max_entries=0) as client:
        running = asyncio.create_task(client.post("/v1/guidance", json=LONG, headers=A))
        while teacher.stats["active"] < 1:  # admitted and running on the engine
            await asyncio.sleep(0.01)
        started = teacher.stats["started"]
        late = await client.post("/v1/guidance", json=LONG, headers=A)
        assert late.status_code == 503 and "retry-after" in late.headers
        assert teacher.stats["started"] == started  # the refused request never became a sequence
        assert (await running).status_code == 200
        adm = (await client.get("/v1/stats", headers=A)).json()["admission"]
    assert adm["refused_deadline"] == 1 and adm["in_flight"] == 0


# --- the guidance cache ---------------------------------------------------------------------------------


async def test_deterministic_requests_reuse_guidance(teacher: LlamaTeacher) -> None:
    async with cloud(teacher) as client:
        first = (await client.post("/v1/guidance", json=PROMPT, headers=A)).json()
        started = teacher.stats["started"]
        again = (await client.post("/v1/guidance", json=PROMPT, headers=A)).json()
        assert teacher.stats["started"] == started  # no engine work
        assert again["cached"] and not first["cached"] and again["text"] == first["text"]
        # The same usage, except that a replay computed none of its prompt: all of it counts as cached (#22).
        assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"]
        assert {**again["usage"], "cached_tokens": 0} == {**first["usage"], "cached_tokens": 0}
        assert again["cost"]["amount"] == 0 < first["cost"]["amount"]
        # Streamed hits replay the same frames.
        r = await client.post("/v1/guidance", json={**PROMPT, "stream": True}, headers=A)
        fs = frames(r.content)
        assert "".join(f.text for f in fs if f.type == "token") == first["text"] and fs[-1].cached
        # A fixed seed is deterministic too; sampling without one is not cached.
        seeded = {**PROMPT, "temperature": 0.8, "seed": 7}
        s1 = (await client.post("/v1/guidance", json=seeded, headers=A)).json()
        s2 = (await client.post("/v1/guidance", json=seeded, headers=A)).json()
        assert s2["cached"] and s2["text"] == s1["text"]
        free = {**PROMPT, "temperature": 0.8}
        assert not (await client.post("/v1/guidance", json=free, headers=A)).json()["cached"]
        assert not (await client.post("/v1/guidance", json=free, headers=A)).json()["cached"]
        cache = (await client.get("/v1/stats", headers=A)).json()["cache"]
        usage = (await client.get("/v1/usage", headers=A)).json()
    assert cache["hits"] == 3 and cache["misses"] == 2 and cache["entries"] == 2
    assert usage["cache_hits"] == 3 and usage["requests"] == 7


async def test_cache_memory_is_bounded(teacher: LlamaTeacher) -> None:
    async with cloud(teacher, cache_max_entries=2) as client:
        for word in ("Cats", "Dogs", "Birds"):
            await client.post("/v1/guidance", json={**PROMPT, "prompt": f"{word} are"}, headers=A)
        assert (await client.post("/v1/guidance", json={**PROMPT, "prompt": "Birds are"}, headers=A)).json()["cached"]
        assert not (await client.post("/v1/guidance", json={**PROMPT, "prompt": "Cats are"},
                                      headers=A)).json()["cached"]
        cache = (await client.get("/v1/stats", headers=A)).json()["cache"]
    assert cache["entries"] == 2 and cache["evictions"] == 2 and 0 < cache["bytes"] <= cache["max_bytes"]


# --- the ledger ------------------------------------------------------------------------------------------


async def test_cost_is_stated_and_ledgered_streamed_or_not(teacher: LlamaTeacher) -> None:
    rates = {"price_input_per_mtok": 2.0, "price_output_per_mtok": 8.0, "price_accelerator_per_hour": 36.0}
    async with cloud(teacher, cache_max_entries=0, **rates) as client:
        whole = (await client.post("/v1/guidance", json=PROMPT, headers=A)).json()
        r = await client.post("/v1/guidance", json={**PROMPT, "stream": True, "prompt": "Cats are"}, headers=A)
        done = frames(r.content)[-1]
        usage = (await client.get("/v1/usage", headers=A)).json()
    for cost, tokens in ((whole["cost"], whole["usage"]), (done.cost.model_dump(), done.usage.model_dump())):
        cached = tokens["cached_tokens"]  # a shared first token or two may be in the slot already (#22)
        expected = ((tokens["prompt_tokens"] - cached) * 2.0 + cached * 0.05 + tokens["completion_tokens"] * 8.0) \
            / 1e6 + cost["accelerator_s"] * 36.0 / 3600
        assert cost["cached_input_tokens"] == cached
        assert cost["input_tokens"] == tokens["prompt_tokens"] and cost["output_tokens"] == tokens["completion_tokens"]
        assert cost["accelerator_s"] > 0 and cost["amount"] == pytest.approx(expected)
        assert cost["rates"]["output_per_mtok"] == 8.0
    assert usage["requests"] == 2, usage
    assert usage["cost"] == pytest.approx(whole["cost"]["amount"] + done.cost.amount)
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"] + done.usage.completion_tokens


async def test_a_prompt_that_extends_the_last_one_is_billed_as_cached_input(teacher: LlamaTeacher) -> None:
    """#22, prices as providers bill: a second call whose prompt extends the first's (the re-guidance and verify
    shape: the answer so far grows) finds the first's tokens in the teacher's KV cache, says so in its usage and
    cost, and costs less than the same call on a cold cache; the ledger's rows and /v1/usage carry the count."""
    first = {"prompt": "List the planets of the solar system in order from the sun: Mercury, Venus,",
             "max_tokens": 4, "temperature": 0, "stream": False}
    second = {**first, "prompt": first["prompt"] + " Earth, Mars,"}
    rates = {"price_input_per_mtok": 1.0, "price_cached_input_per_mtok": 0.1, "price_output_per_mtok": 4.0}
    async with cloud(teacher, cache_max_entries=0, **rates) as client:
        a = (await client.post("/v1/guidance", json=first, headers=A)).json()
        b = (await client.post("/v1/guidance", json=second, headers=A)).json()
        r = await client.post("/v1/guidance", json={**second, "stream": True}, headers=A)  # streamed: done frame
        done = frames(r.content)[-1]
        usage = (await client.get("/v1/usage", headers=A)).json()
        exposition = (await client.get("/metrics")).text
    # The first call's prompt tokens are all reused but the last (its logits give the first sampled token).
    assert b["usage"]["cached_tokens"] >= a["usage"]["prompt_tokens"] - 1 > 0, (a["usage"], b["usage"])
    assert b["usage"]["cached_tokens"] < b["usage"]["prompt_tokens"]
    assert done.usage.cached_tokens > 0 and done.cost.cached_input_tokens == done.usage.cached_tokens
    assert b["cost"]["cached_input_tokens"] == b["usage"]["cached_tokens"]
    assert b["cost"]["rates"]["cached_input_per_mtok"] == 0.1
    p, c, out = b["usage"]["prompt_tokens"], b["usage"]["cached_tokens"], b["usage"]["completion_tokens"]
    assert b["cost"]["amount"] == pytest.approx(((p - c) * 1.0 + c * 0.1 + out * 4.0) / 1e6)
    cold_price = (p * 1.0 + out * 4.0) / 1e6
    assert b["cost"]["amount"] < cold_price  # priced lower than the same call with nothing cached
    assert usage["cached_tokens"] == a["usage"]["cached_tokens"] + c + done.usage.cached_tokens
    counted = next(float(line.split()[1]) for line in exposition.splitlines()
                   if line.startswith("gkt_cloud_cached_prompt_tokens_total "))
    assert counted == usage["cached_tokens"]
    assert usage["cost"] == pytest.approx(a["cost"]["amount"] + b["cost"]["amount"] + done.cost.amount)


async def test_slot_is_freed_when_a_response_never_starts(teacher: LlamaTeacher) -> None:
    """A client that leaves before the first byte: the body never starts, its admission slot still returns."""
    async with cloud(teacher, max_in_flight=1) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        started = teacher.stats["started"]
        generation = await service.open(GuidanceRequest(prompt="Hello", max_tokens=4), "edge-a")
        assert service.admission.stats.in_flight == 1
        await generation.aclose()  # what the response's background task does after a disconnect
        await generation.aclose()  # idempotent
        assert service.admission.stats.in_flight == 0 and teacher.stats["started"] == started
        assert (await client.post("/v1/guidance", json=PROMPT, headers=A)).status_code == 200


def test_gkt_up_pairs_the_local_cloud_and_edge(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gkt.launcher import local_key_env

    monkeypatch.delenv("GKT_CLOUD_API_KEYS", raising=False)
    monkeypatch.delenv("GKT_EDGE_CLOUD_API_KEY", raising=False)
    cloud_env, edge_env = local_key_env(tmp_path / "local.key")
    key = edge_env["GKT_EDGE_CLOUD_API_KEY"]
    assert KeyRing(cloud_env["GKT_CLOUD_API_KEYS"]).tenant(key) == "local-edge"
    assert key not in cloud_env["GKT_CLOUD_API_KEYS"]  # the cloud gets the hash only
    assert (tmp_path / "local.key").read_text().strip() == key
    assert (tmp_path / "local.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("GKT_CLOUD_API_KEYS", KEYS)  # keys configured already: left alone
    assert local_key_env(tmp_path / "other.key") == ({}, {})
