"""Continuous batching on the real llama.cpp teacher.

Sharing is read from the engine's own counters at ``/v1/stats`` (sequences sampled per decode step), never
from timing. Each phase uses its own never-matching stop sequence so that the guidance cache (which would
answer a repeated greedy request without the engine) cannot stand in for the engine. Scenarios: C1, C2.

Greedy equality: llama.cpp does not promise bit-identical logits across batch shapes (its server docs say so
for prompt caching; here Qwen's Q4_K_M kernels flip near-ties after 20-40 tokens, measured with and without
weight repacking). So exact equality is tested on SmolLM2 (Q4_1), whose kernels are batch-invariant here,
which proves the rows, sequence ids and samplers never mix; on Qwen the batched answers must agree with the
single-sequence ones on their opening.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cloud_service.engines.llama_cpp import LlamaTeacher
from cloud_service.settings import CloudSettings
from gkt.launcher import Service
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, Piece
from shared.logs import REQUEST_ID, RequestIdFilter
from shared.protocol import GuidanceRequest, SSEDecoder, parse_frame
from tests.conftest import AUTH

TIMEOUT = httpx.Timeout(10.0, read=600.0)
PROMPTS = [
    "Q: What is 15 + 27?\nA:",
    "Q: Name the largest planet in the solar system.\nA:",
    "Q: Write a haiku about rain.\nA:",
    "Q: Why is the sea salty?\nA:",
]


def stats(cloud: Service) -> dict:
    r = httpx.get(cloud.url + "/v1/stats", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200
    return r.json()["engine"]


async def guidance(client: httpx.AsyncClient, prompt: str, marker: str, k: int = 24) -> str:
    r = await client.post("/v1/guidance", json={"prompt": prompt, "max_tokens": k, "stream": False,
                                                "stop": [marker]})
    assert r.status_code == 200, r.text
    return r.json()["text"]


def delta(after: dict, before: dict) -> dict[int, int]:
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    return {k: v for k, v in sizes.items() if v}


async def test_concurrent_requests_share_decode_steps(cloud: Service) -> None:
    async with httpx.AsyncClient(base_url=cloud.url, headers=AUTH, timeout=TIMEOUT) as client:
        alone = [await guidance(client, p, "<<alone>>") for p in PROMPTS]
        before = stats(cloud)
        together = await asyncio.gather(*(guidance(client, p, "<<together>>") for p in PROMPTS))
        after = stats(cloud)
    sizes = delta(after, before)
    sampled = after["sampled_tokens"] - before["sampled_tokens"]
    steps = after["sampling_steps"] - before["sampling_steps"]
    assert sum(k * v for k, v in sizes.items()) == sampled
    assert max(sizes) >= 2 and after["max_batch"] >= 2, sizes  # several sequences in one decode step
    assert steps < sampled  # fewer decode steps than tokens: steps were shared
    for a, b in zip(alone, together, strict=True):  # each answer is its own prompt's, not a neighbour's
        assert len(a) >= 20 and a[:20] == b[:20], (a, b)


@pytest.fixture(scope="module")
def smol() -> Iterator[LlamaTeacher]:
    engine = LlamaTeacher.from_settings(CloudSettings(model="smollm2-135m-instruct", n_ctx=1024, max_in_flight=8,
                                              n_threads=1, auth=False))
    yield engine
    engine.close()


async def test_greedy_outputs_under_batching_equal_single_sequence(smol: LlamaTeacher) -> None:
    prompts = [*PROMPTS, "The capital of France is", "def fib(n):", "Once upon a time", "1, 2, 3,"]

    async def run(prompt: str) -> str:
        parts = []
        async for item in await smol.open(GuidanceRequest(prompt=prompt, max_tokens=32)):
            parts.append(item.text if isinstance(item, Piece) else "")
        return "".join(parts)

    alone = [await run(p) for p in prompts]
    before = smol.stats
    together = await asyncio.gather(*(run(p) for p in prompts))
    after = smol.stats
    assert together == alone and all(alone)
    assert after["max_batch"] == len(prompts)  # all eight shared steps
    assert after["sampling_steps"] - before["sampling_steps"] < after["sampled_tokens"] - before["sampled_tokens"]


async def test_a_failed_step_fails_each_sequence_and_its_log_line_names_them(
    smol: LlamaTeacher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A decode step that fails (injected through the scheduler's ``decode`` seam: llama.cpp does not fail on
    demand) ends every sequence in it with an engine error, nobody waits forever, and the worker thread's log
    line carries their request ids (O2)."""
    def failing_decode(ctx: Any, batch: Any) -> int:
        return -1  # as llama_decode reports an error

    monkeypatch.setattr(smol.scheduler, "decode", failing_decode)
    caplog.handler.addFilter(RequestIdFilter())

    async def one(request_id: str) -> GKTError:
        REQUEST_ID.set(request_id)  # this task's own context, as the request middleware does
        tokens = smol.text.tokenize("Q: 1 + 1?\nA:", special=False)
        with pytest.raises(GKTError) as err:
            async for _ in smol.scheduler.stream(tokens, GenerationParams(max_tokens=8, temperature=0)):
                pass
        return err.value

    errors = await asyncio.wait_for(asyncio.gather(one("req-a"), one("req-b")), 60)
    assert all(e.code is ErrorCode.engine_error for e in errors)
    lines = [r for r in caplog.records if r.getMessage() == "batched decode failed"]
    assert lines and all(r.exc_info for r in lines)
    named = {i for r in lines for i in r.request_id.split(",")}  # type: ignore[attr-defined]
    assert named == {"req-a", "req-b"}, [r.request_id for r in lines]  # type: ignore[attr-defined]


async def test_disconnect_stops_its_sequence_without_disturbing_others(cloud: Service) -> None:
    """C1/C2: a client that goes away mid-stream is dropped at the next step; the other stream is intact."""
    async with httpx.AsyncClient(base_url=cloud.url, headers=AUTH, timeout=TIMEOUT) as client:
        expected = await guidance(client, PROMPTS[3], "<<ref>>", k=40)
        before = stats(cloud)

        async def leave_early() -> int:
            body = {"prompt": "Q: Tell me a very long story.\nA:", "max_tokens": 200, "stop": ["<<gone>>"]}
            async with client.stream("POST", "/v1/guidance", json=body) as r:
                dec, tokens = SSEDecoder(), 0
                async for chunk in r.aiter_raw():
                    for data in dec.feed(chunk):
                        frame = parse_frame(data)
                        tokens += frame.tokens if frame.type == "token" else 0
                    if tokens >= 3:
                        return tokens  # closing the response disconnects
            raise AssertionError("stream ended before the client left")

        left, kept = await asyncio.gather(leave_early(), guidance(client, PROMPTS[3], "<<kept>>", k=40))
        for _ in range(100):  # the engine notices at its next step
            after = stats(cloud)
            if after["cancelled"] > before["cancelled"] and after["active"] == 0:
                break
            await asyncio.sleep(0.1)
        usage = (await client.get("/v1/usage")).json()
    assert kept == expected and left >= 3
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0
    # The abandoned stream generated far fewer than its 200 tokens, and what it did generate is charged.
    assert after["sampled_tokens"] - before["sampled_tokens"] < 200
    assert usage["cancelled"] >= 1


async def test_continues_a_final_assistant_message(cloud: Service) -> None:
    """The partial answer's trailing space is cut from the prompt and from the continuation."""
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "The capital of France is "}],
            "max_tokens": 4, "stream": False}
    r = httpx.post(cloud.url + "/v1/guidance", json=body, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    assert text.startswith("Paris"), text


async def test_a_draft_is_judged_across_chunked_prefill_steps() -> None:
    """A draft that does not fit in one decode step (n_batch 16, prompt + draft about 40 tokens): its verdict
    spans steps and still cuts at the first token the teacher would not have chosen; the cut leaves the
    slot's cache as if the rejected tokens had never been there."""
    engine = LlamaTeacher.from_settings(CloudSettings(model="smollm2-135m-instruct", n_ctx=512, n_batch=16,
                                              max_in_flight=2, n_threads=1, auth=False))
    try:
        prompt = GuidanceRequest(prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0)

        async def run(request: GuidanceRequest) -> tuple[list[str], Any]:
            pieces, result = [], None
            async for item in await engine.open(request):
                if isinstance(item, Piece):
                    pieces.append(item.text)
                else:
                    result = item
            return pieces, result

        pieces, _ = await run(prompt)
        assert len(pieces) == 30 and all(pieces)
        good = "".join(pieces[:24])
        kept, result = await run(prompt.model_copy(update={"draft": good, "max_tokens": 3}))
        assert result.prompt_tokens < 16 < result.prompt_tokens + result.draft_tokens - 16  # three steps
        assert result.draft_accepted_text == good and result.draft_accepted_tokens == 24
        assert kept == pieces[24:27]
        bad = "".join(pieces[:20]) + " zebra zebra zebra"
        cut, result = await run(prompt.model_copy(update={"draft": bad, "max_tokens": 2}))
        assert result.draft_accepted_text == "".join(pieces[:20]) and cut == pieces[20:22]
        again, _ = await run(prompt)
        assert again == pieces
    finally:
        engine.close()
