"""Bad input on both real services (V1, V2, V3, V5, V6): a clear 4xx in the envelope, never a 5xx, and the
service keeps serving. Models are SmolLM2 with small limits so fuzzed requests stay cheap."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from gkt.launcher import Service
from tests.conftest import CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, auth_for, pair_fixture

LIMITS = {
    "GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "512",
    "GKT_CLOUD_MAX_GUIDANCE_TOKENS": "16", "GKT_CLOUD_MAX_BODY_BYTES": "65536",
    "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "256",
    "GKT_EDGE_MAX_BODY_BYTES": "65536", "GKT_EDGE_DEFAULT_MAX_TOKENS": "8", **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS,
}


services = pair_fixture(LIMITS, name="services")


@pytest.fixture(scope="module")
def cloud_url(services: tuple[Service, Service]) -> str:
    return services[0].url


@pytest.fixture(scope="module")
def edge_url(services: tuple[Service, Service]) -> str:
    return services[1].url


def routes(svc: Service) -> list[str]:
    return ["/v1/guidance", "/v1/guidance/batch"] if svc.name == "cloud" else ["/v1/chat/completions",
                                                                             "/v1/completions"]


def assert_envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"]
    return err


@pytest.mark.parametrize("which", [0, 1])
def test_v1_body_too_large_with_content_length(services: tuple[Service, Service], which: int) -> None:
    svc = services[which]
    for route in routes(svc):
        r = httpx.post(svc.url + route, content=b"x" * 70_000,
                       headers={"content-type": "application/json", **auth_for(svc)})
        assert assert_envelope(r, 413)["code"] == "payload_too_large"


@pytest.mark.parametrize("which", [0, 1])
def test_v1_body_too_large_chunked(services: tuple[Service, Service], which: int) -> None:
    svc = services[which]

    def body() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"a" * 1000
        yield b'"}'

    r = httpx.post(svc.url + routes(svc)[0], content=body(),
                   headers={"content-type": "application/json", **auth_for(svc)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def raw_request(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("which", [0, 1])
def test_v2_header_abuse(services: tuple[Service, Service], which: int) -> None:
    svc = services[which]
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    reply = raw_request(svc.url, huge)
    assert reply == b"" or reply.split(b" ")[1] in (b"400", b"431"), reply[:100]
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n"
    reply = raw_request(svc.url, many + b"")
    assert not reply.startswith(b"HTTP/1.1 5"), reply[:100]
    assert httpx.get(svc.url + "/health").status_code == 200


@pytest.mark.parametrize("which", [0, 1])
def test_v6_invalid_utf8_and_surrogates(services: tuple[Service, Service], which: int) -> None:
    svc = services[which]
    route = routes(svc)[1] if svc.name == "edge" else routes(svc)[0]
    r = httpx.post(svc.url + route, content=b'{"prompt": "caf\xe9"}',
                   headers={"content-type": "application/json", **auth_for(svc)})
    assert_envelope(r, 400)
    r = httpx.post(svc.url + route, content=b'{"prompt": "lone \\ud800 surrogate"}',
                   headers={"content-type": "application/json", **auth_for(svc)})
    assert_envelope(r, 400)


def test_v6_output_is_valid_utf8_when_characters_span_tokens(edge_url: str) -> None:
    r = httpx.post(edge_url + "/v1/completions", headers=CLIENT_AUTH,
                   json={"prompt": "Emoji: 😀🎉🚀 and 日本語:", "max_tokens": 12, "mode": "student"})
    assert r.status_code == 200
    r.content.decode("utf-8")  # raises if any byte sequence is broken
    assert "\ufffd" not in r.json()["choices"][0]["text"]


def envelope_check(ctx, response, case) -> None:  # noqa: ANN001
    """Every 4xx/5xx body is the OpenAI-style envelope."""
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body


def no_5xx_but_the_callers_own_deadline(ctx, response, case) -> None:  # noqa: ANN001
    """No 5xx, except a 504 ``timeout`` for a request that set its own budget (``timeout_ms``, T4): the answer
    to "stop after 1 ms" is that the deadline passed, which is the server keeping its word."""
    body = case.body if isinstance(case.body, dict) else {}
    if response.status_code == 504 and body.get("timeout_ms") is not None:
        assert response.json()["error"]["code"] == "timeout"
        return
    not_a_server_error(ctx, response, case)


NEW_FIELDS = {
    "cloud": {"GuidanceRequest": {"response_format"}},
    "edge": {"ChatCompletionRequest": {"response_format", "tools", "tool_choice", "logprobs", "top_logprobs",
                                       "logit_bias"},
             "CompletionRequest": {"response_format", "logprobs", "echo", "suffix", "best_of"}},
}
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("which", [0, 1])
def test_v3_schema_fuzz_no_5xx_and_envelopes(services: tuple[Service, Service], which: int) -> None:
    """Every operation of the service's own OpenAPI, fuzzed (NUL bytes and all): no 5xx, errors enveloped."""
    svc = services[which]
    schema = schemathesis.openapi.from_url(svc.url + "/openapi.json", headers=auth_for(svc))
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= set(routes(svc)) | {"/tokenize", "/detokenize"}
    # The fields of issue 21 are in the request schemas, so the fuzzer sends them (schemas and all).
    models = httpx.get(svc.url + "/openapi.json", headers=auth_for(svc)).json()["components"]["schemas"]
    for model, fields in NEW_FIELDS[svc.name].items():
        assert fields <= set(models[model]["properties"]), model
    for op in operations:

        @FUZZ
        @given(case=op.as_strategy())
        def fuzz(case) -> None:  # noqa: ANN001
            case.call_and_validate(base_url=svc.url, headers=auth_for(svc),
                                   checks=[no_5xx_but_the_callers_own_deadline, envelope_check], timeout=60)

        fuzz()


def test_still_serving_after_the_fuzzing(services: tuple[Service, Service]) -> None:
    cloud, edge = services
    assert httpx.get(cloud.url + "/ready").status_code == 200 and httpx.get(edge.url + "/ready").status_code == 200
    r = httpx.post(edge.url + "/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 4}, headers=CLIENT_AUTH,
                   timeout=60)
    assert r.status_code == 200 and r.json()["gkt"]["fallback"] is None


