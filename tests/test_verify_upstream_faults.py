"""Faults injected under verify's upstream calls (cloud_service/engines/openai_verify.py).

vllm-router forwards ``/tokenize`` to one replica without trying another (tests/test_vllm_router.py shows it
against real vLLM replicas, where the same path runs end to end); a replica that just died answers 502
there. These scripted upstreams inject exactly that fault, and a client error that must not be retried.
"""

from __future__ import annotations

import json

import httpx
import pytest

from cloud_service.engines.openai_verify import UpstreamVerifier
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult
from shared.protocol import GuidanceRequest

REQUEST = GuidanceRequest(prompt="Two and two make", draft=" four", max_tokens=1, temperature=0)


def upstream(tokenize_faults: list[int]) -> tuple[httpx.AsyncClient, list[str]]:
    """An upstream whose first /tokenize calls answer the given statuses, then what vLLM answers."""
    calls: list[str] = []
    faults = list(tokenize_faults)

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        body = json.loads(request.content)
        if request.url.path == "/tokenize":
            if faults:
                return httpx.Response(faults.pop(0), text="Backend request failed")
            return httpx.Response(200, json={"tokens": [7] if body["prompt"] == " four" else [1, 2, 3]})
        assert request.url.path == "/v1/completions" and body["prompt"] == [1, 2, 3, 7]
        ranks = [None, {"2": {"rank": 1}}, {"3": {"rank": 1}}, {"7": {"rank": 1, "decoded_token": " four"}}]
        choice = {"text": ".", "finish_reason": "length", "prompt_logprobs": ranks}
        return httpx.Response(200, json={"choices": [choice], "usage": {"completion_tokens": 1}})

    return httpx.AsyncClient(base_url="http://router/v1/", transport=httpx.MockTransport(handle)), calls


async def run(client: httpx.AsyncClient) -> GenerationResult:
    verifier = UpstreamVerifier(client, "teacher", "http://router")
    out = [item async for item in await verifier.open(REQUEST)]
    assert isinstance(out[-1], GenerationResult)
    return out[-1]


async def test_a_replica_gone_under_tokenize_is_passed_over() -> None:
    client, calls = upstream([502, 502])
    result = await run(client)
    assert result.draft_accepted_tokens == 1 and result.draft_accepted_text == " four"
    assert calls.count("/tokenize") == 4  # two failed, then the prompt and the draft


async def test_a_replica_that_stays_gone_fails_after_three_tries() -> None:
    client, calls = upstream([502, 502, 502])
    with pytest.raises(GKTError) as exc:
        await run(client)
    assert exc.value.code == ErrorCode.upstream_error and exc.value.code.retryable  # the edge may try again
    assert calls == ["/tokenize"] * 3


async def test_a_rejected_request_is_not_retried() -> None:
    client, calls = upstream([400])
    with pytest.raises(GKTError) as exc:
        await run(client)
    assert exc.value.code == ErrorCode.upstream_rejected and calls == ["/tokenize"]
