"""The fast path: prefill while the guidance streams, without changing a single answer token.

Engine level (real SmolLM2): a prefill never disturbs a generation, a generation stops a prefill at a chunk
boundary, and greedy output is the same cold, after a prefill, and after a prefill of a diverging sequence.
End to end (real Qwen teacher and student as processes): the same answers with and without the fast path,
with the prompt already in the student's KV cache at the handoff and the handoff gap recorded.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.fastpath import Prefetcher
from edge_agent.student import BACKGROUND_NICE, HOT_PREFIX_MIN, PREFILL_CHUNK, LlamaEngine
from gkt.launcher import Service, edge_service, free_port
from shared.generation import GenerationParams, GenerationResult, Piece
from shared.models import DEFAULT_STUDENT, resolve
from shared.tasks import GSM8K
from tests.conftest import CLIENT_AUTH, EDGE_AUTH, EDGE_KEYS, ONE_THREAD

GREEDY = GenerationParams(max_tokens=24, temperature=0.0)
TIMEOUT = httpx.Timeout(10.0, read=600.0)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    e = LlamaEngine(resolve("smollm2-135m-instruct"), n_ctx=2048, n_threads=1, name="smollm2-135m-instruct")
    yield e
    e.close()


def few_shot(question: str) -> str:
    return GSM8K.build_prompt(question)


async def generate(engine: LlamaEngine, tokens: list[int]) -> tuple[str, GenerationResult]:
    text, result = "", None
    async for item in engine.stream(tokens, GREEDY):
        if isinstance(item, Piece):
            text += item.text
        else:
            result = item
    assert result is not None
    await idle(engine)
    return text, result


async def idle(engine: LlamaEngine) -> None:
    """The result arrives just before the worker returns and releases the context; wait for that (bounded)."""
    for _ in range(6000):
        if not engine.busy:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine stayed busy")


async def cold(engine: LlamaEngine) -> None:
    """Empty the KV cache and forget warm prefixes, so the next generation starts from nothing."""
    await engine.reset_cache()
    assert engine.cached_prefix(engine.tokenize("Q: 1+1?", special=False)) == 0


async def test_prefill_then_generate_matches_cold_generation(engine: LlamaEngine) -> None:
    tokens = engine.tokenize(few_shot("Tom has 3 apples and buys 5 more. How many apples does he have?"), special=False)
    await cold(engine)
    want, _ = await generate(engine, tokens)
    await cold(engine)
    owner = object()
    assert await engine.prefill(tokens[:-1], owner) == len(tokens) - 1
    engine.release_warm(owner)
    got, result = await generate(engine, tokens)
    assert got == want
    assert result.cached_prompt_tokens == len(tokens) - 1  # only the last token was decoded at the handoff
    # A prefill of a sequence that diverges near the end (as a partial guidance can) keeps the common prefix.
    await cold(engine)
    other = engine.tokenize(few_shot("Tom has 3 apples and buys 5 more. How many pears?"), special=False)
    assert await engine.prefill(other, owner) == len(other)
    engine.release_warm(owner)
    got, result = await generate(engine, tokens)
    assert got == want
    assert 0 < result.cached_prompt_tokens < len(tokens)


def _niceness() -> int:
    """The calling thread's niceness (Linux: per thread)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
async def test_a_requests_prefill_runs_at_generation_priority_and_rewarming_below_it(
    engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #22: the request's own prefill is on its critical path, so a CPU-bound neighbour must not starve
    it: it runs at the generation's niceness; only idle re-warming of a hot prefix runs BACKGROUND_NICE lower.
    Read in the worker threads themselves, while each kind of work runs (not by thread name)."""
    context = engine._context
    seen: list[tuple[str, list[int], int]] = []  # (kind, tokens, niceness of the thread that ran it)
    prefill, generate_ = context.prefill, context.generate

    def spy_prefill(tokens: list[int], stop: threading.Event) -> int:
        seen.append(("prefill", list(tokens), _niceness()))
        return prefill(tokens, stop)

    def spy_generate(tokens: list[int], *args: object) -> GenerationResult:
        seen.append(("generate", list(tokens), _niceness()))
        return generate_(tokens, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(context, "prefill", spy_prefill)
    monkeypatch.setattr(context, "generate", spy_generate)
    await cold(engine)
    q1 = engine.tokenize(few_shot("Ann reads 4 pages a day. How many pages in a week?"), special=False)
    q2 = engine.tokenize(few_shot("Bob reads 6 pages a day. How many pages in a week?"), special=False)
    for q in (q1, q2):
        owner = object()
        assert await engine.prefill(q[:-1], owner) is not None  # a request's own prefill, then its generation
        engine.release_warm(owner)
        await generate(engine, q)
    hot = list(engine.hot_prefix)  # q1 and q2 share the few-shot block: it is hot now
    assert len(hot) >= HOT_PREFIX_MIN
    await generate(engine, engine.tokenize("Write a haiku about rain.", special=False))  # evicts it
    for _ in range(600):  # re-warming starts once the context is idle; bounded wait
        if not engine.busy and engine.cached_prefix(hot) == len(hot):
            break
        await asyncio.sleep(0.05)
    generation = {n for kind, _, n in seen if kind == "generate"}
    requests = [n for kind, tokens, n in seen if kind == "prefill" and tokens != hot]
    rewarms = [n for kind, tokens, n in seen if kind == "prefill" and tokens == hot]
    assert len(generation) == 1 and len(requests) == 2 and rewarms, seen
    (g,) = generation
    assert requests == [g, g]  # the request's own prefills: the generation's priority
    assert set(rewarms) == {min(g + BACKGROUND_NICE, 19)}  # idle re-warming: below it


async def test_prefill_is_refused_while_a_generation_runs(engine: LlamaEngine) -> None:
    tokens = engine.tokenize("Q: Name three colours.\nA:", special=False)
    await cold(engine)
    want, _ = await generate(engine, tokens)
    await cold(engine)
    gen = engine.stream(tokens, GREEDY)
    first = await anext(gen)  # the generation holds the context now
    assert await engine.prefill(engine.tokenize("Something else entirely", special=False), object()) is None
    text = first.text if isinstance(first, Piece) else ""
    async for item in gen:
        if isinstance(item, Piece):
            text += item.text
    assert text == want


async def test_generation_stops_a_prefill_at_a_chunk_boundary(engine: LlamaEngine) -> None:
    long = engine.tokenize(few_shot("A train travels 60 miles in 2 hours. What is its speed?"), special=False)
    short = engine.tokenize("Q: What is 2 + 2?\nA:", special=False)
    await cold(engine)
    want, _ = await generate(engine, short)
    await cold(engine)
    owner = object()
    prefill = asyncio.create_task(engine.prefill(long, owner))
    await asyncio.sleep(0)  # the prefill has the context
    assert engine.busy
    got, _ = await generate(engine, short)  # must not wait for the whole prefill
    done = await prefill
    engine.release_warm(owner)
    assert got == want
    assert done is not None and done < len(long) and done % PREFILL_CHUNK == 0


async def test_one_owner_at_a_time_and_cancel_frees_the_context(engine: LlamaEngine) -> None:
    tokens = engine.tokenize(few_shot("Sam reads 12 pages a day. How many pages in a week?"), special=False)
    await cold(engine)
    a, b = object(), object()
    task = asyncio.create_task(engine.prefill(tokens, a))
    await asyncio.sleep(0)
    assert await engine.prefill(tokens, b) is None  # a holds the warm sequence
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The context is released only when the worker returns; then a generation runs normally.
    text, _ = await asyncio.wait_for(generate(engine, engine.tokenize("Q: 1+1?\nA:", special=False)), 60)
    assert text
    assert await engine.prefill(tokens, b) is None  # still a's until released
    engine.release_warm(a)
    assert await engine.prefill(tokens[:40], b) == 40
    engine.release_warm(b)


async def test_few_shot_prefix_is_kept_warm_after_an_unrelated_prompt(engine: LlamaEngine) -> None:
    await cold(engine)
    q1 = engine.tokenize(few_shot("Ann has 4 cats. How many legs?"), special=False)
    q2 = engine.tokenize(few_shot("Bob has 7 dogs. How many ears?"), special=False)
    await generate(engine, q1)
    await generate(engine, q2)
    shared = len(engine.hot_prefix)
    assert shared >= HOT_PREFIX_MIN and q1[:shared] == q2[:shared]
    await generate(engine, engine.tokenize("Write a haiku about rain.", special=False))  # evicts the prefix
    for _ in range(600):  # re-warming runs in the background while idle; bounded wait
        if not engine.busy and engine.cached_prefix(engine.hot_prefix) == shared:
            break
        await asyncio.sleep(0.05)
    q3 = engine.tokenize(few_shot("Cid has 2 cows. How many horns?"), special=False)
    _, result = await generate(engine, q3)
    assert result.cached_prompt_tokens >= shared


async def test_greedy_output_does_not_depend_on_what_was_cached_q4_k_m() -> None:
    """The default student (Q4_K_M) is where llama.cpp's numerics depend on the batch split: the same prompt
    reached cold, through a cache of a diverging prompt, and through a partial prefill gives one answer."""
    engine = LlamaEngine(resolve(DEFAULT_STUDENT), n_ctx=2048, n_threads=1, name=DEFAULT_STUDENT)
    try:
        base = ("Q: A farmer has 7 cows and buys twice as many goats. How many animals does he have now?\n"
                "A: He buys 7 * 2 = 14 goats. He has 7 + 14 = 21 animals. The answer is 21.\n\n"
                "Q: A shop sells 7 boxes of 12 pens and 5 single pens. How many pens does it sell?\nA:")
        tokens = engine.tokenize(base + " The shop sells 7 boxes", special=False)
        await cold(engine)
        want, _ = await generate(engine, tokens)
        for other in (base + " First", base[:-40], base + " The shop sells 7 boxes of"):
            await cold(engine)
            await generate(engine, engine.tokenize(other, special=False))
            got, _ = await generate(engine, tokens)
            assert got == want, other[-30:]
        for cut in (1, 2, 3, 5, 13):  # partial prefills ending anywhere, as streaming guidance does
            await cold(engine)
            owner = object()
            await engine.prefill(tokens[:-cut], owner)
            engine.release_warm(owner)
            got, _ = await generate(engine, tokens)
            assert got == want, cut
    finally:
        engine.close()


async def test_concurrent_requests_with_prefetchers_all_finish(engine: LlamaEngine) -> None:
    """Four requests at once, each with a prefetcher fed guidance while the others generate (as in the bench's
    four-user run): every prefetcher closes, every generation completes with its cold answer."""
    prompts = [few_shot(q) for q in ("Ann has 4 cats.", "Bob has 7 dogs.", "Cid has 2 cows.", "Dee has 9 hens.")]
    want = []
    for p in prompts:
        await cold(engine)
        want.append((await generate(engine, engine.tokenize(p + " The answer", special=False)))[0])

    async def request(i: int) -> str:
        prefetch = Prefetcher(engine, prompts[i], special=False)
        prefetch.start(engine.tokenize(prompts[i], special=False))
        try:
            for released in (" The", " The answer"):
                await asyncio.sleep(0.05 * (i + 1))
                prefetch.guidance(released)
        finally:
            await prefetch.close()
        text, _ = await generate(engine, engine.tokenize(prompts[i] + " The answer", special=False))
        return text

    got = await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(4))), 600)  # a hang guard only
    assert got == want
    assert engine.warm_owner is None


# --- end to end on the default models --------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_slow(cloud: Service, logs: Path) -> Iterator[Service]:
    """The default student without the fast path, guided by the same cloud."""
    env = {**ONE_THREAD, **EDGE_AUTH, **EDGE_KEYS, "GKT_EDGE_MODEL": DEFAULT_STUDENT, "GKT_EDGE_N_CTX": "2048",
           "GKT_EDGE_FAST_PATH": "false"}
    service = edge_service(free_port(), cloud.url, env, log_path=logs / "edge_slow.log").start()
    try:
        yield service.wait_ready()
    finally:
        service.stop()


def ask(edge: Service, body: dict) -> dict:
    r = httpx.post(edge.url + "/v1/chat/completions", json=body, headers=CLIENT_AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "A baker makes 24 rolls and sells 3 bags of 6. How many are left?"}],
     "task": "gsm8k", "guidance_tokens": 20, "max_tokens": 60},
    {"messages": [{"role": "user", "content": "Explain in two sentences why the sea is salty."}],
     "guidance_tokens": 10, "max_tokens": 40},
], ids=["gsm8k-k20", "chat-k10"])
def test_same_greedy_answer_with_and_without_fast_path(edge: Service, edge_slow: Service, body: dict) -> None:
    body = {**body, "temperature": 0}
    # Both engines compute prompts in canonical chunks, so the teacher's guidance and the student's answer
    # do not depend on what either cache held before (llama.cpp's numerics vary with the batch split).
    fast, slow = ask(edge, body), ask(edge_slow, body)
    assert fast["gkt"]["guidance"] == slow["gkt"]["guidance"] and fast["gkt"]["fallback"] is None
    assert fast["choices"][0]["message"]["content"] == slow["choices"][0]["message"]["content"]
    for r in (fast, slow):
        assert r["gkt"]["timings"]["handoff_gap_s"] is not None and r["gkt"]["timings"]["handoff_gap_s"] > 0
    # How much the prefetcher got into the cache before the handoff depends on the race between the
    # student's prefill and the teacher's guidance (a loaded machine, a warm teacher): that is measured by
    # the bench (docs/BENCHMARKS.md), not asserted here. The engine-level tests above prove the mechanics.
    u = fast["gkt"]["usage"]
    assert 0 < u["student_cached_tokens"] <= u["student_prompt_tokens"] + u["guidance_student_tokens"]
