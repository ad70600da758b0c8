"""Structured output through the split (issue 21 point 2): ``response_format`` ``json_object`` and
``json_schema``. The teacher writes its guidance under the schema's grammar in the cloud, the student continues
under the same grammar from where the guidance left it, so the answer parses and validates whatever k, the mode,
the policy, or a cloud that cannot be reached (the student alone, ``fallback``). Real cloud and edges (SmolLM2
on both sides), answers checked with ``jsonschema``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from gkt.launcher import Service
from tests.conftest import (
    CLIENT_AUTH,
    CLIENT_KEY,
    CLOUD_KEYS,
    EDGE_AUTH,
    EDGE_KEYS,
    edge_service,
    free_port,
    pair_fixture,
)

pytestmark = pytest.mark.models

MODEL = "smollm2-135m-instruct"
ENV = {
    "GKT_CLOUD_MODEL": MODEL, "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
    "GKT_EDGE_MODEL": MODEL, "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
    **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS,
}
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"},
                   "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                       "maxItems": 2}},
    "required": ["colour", "count", "ok", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe the sky as JSON with a colour, a count, ok and tags."}]

services = pair_fixture(ENV, name="services")


@pytest.fixture(scope="module")
def edge(services: tuple[Service, Service]) -> str:
    return services[1].url


@pytest.fixture(scope="module")
def lonely_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An edge whose cloud is not there: every gkt answer falls back to the student alone."""
    logs: Path = tmp_path_factory.mktemp("lonely")
    svc = edge_service(free_port(), f"http://127.0.0.1:{free_port()}", ENV, log_path=logs / "edge.log").start()
    try:
        yield svc.wait_ready().url
    finally:
        svc.stop()


def answer(edge: str, **extra: Any) -> dict[str, Any]:
    body = {"messages": MESSAGES, "max_tokens": 96, "response_format": FORMAT, **extra}
    r = httpx.post(edge + "/v1/chat/completions", json=body, headers=CLIENT_AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def valid(out: dict[str, Any]) -> dict[str, Any]:
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    doc = json.loads(choice["message"]["content"])
    jsonschema.validate(doc, SCHEMA)
    return doc


@pytest.mark.parametrize("extra", [
    {"mode": "student"},
    {"mode": "teacher"},
    {"mode": "gkt", "guidance_tokens": 1},
    {"mode": "gkt", "guidance_tokens": 5},  # the guidance ends inside the document
    {"mode": "gkt", "guidance_tokens": 60},  # the teacher may finish it alone
    {"mode": "gkt", "guidance_policy": "adaptive"},
    {"mode": "gkt", "guidance_tokens": 3,
     "guidance_policy": {"name": "reguide", "threshold": -0.3, "span": 1, "min_gap": 2, "tokens": 4}},
    {"mode": "gkt", "guidance_tokens": 5, "temperature": 1.0, "seed": 7},
], ids=lambda e: ",".join(f"{k}={v if not isinstance(v, dict) else v['name']}" for k, v in e.items()))
def test_every_answer_is_a_valid_document(edge: str, extra: dict[str, Any]) -> None:
    out = answer(edge, **extra)
    valid(out)
    if extra.get("mode") == "gkt" and extra.get("guidance_tokens") == 5:
        info = out["gkt"]
        assert info["guidance"] and not info["guidance_complete"]  # both models wrote part of the document
        assert info["usage"]["student_tokens"] > 0


def test_json_object_and_streaming(edge: str) -> None:
    client = openai.OpenAI(base_url=edge + "/v1", api_key=CLIENT_KEY)
    # Any object: nothing bounds its length but the model (SmolLM2 may list words until the budget), so ask
    # for a small one; a "length" finish would be an incomplete document, as with any server.
    short = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]
    whole = client.chat.completions.create(model="m", messages=short, max_tokens=96,
                                           response_format={"type": "json_object"},
                                           extra_body={"guidance_tokens": 4})
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content or ""), dict)
    stream = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=96, stream=True,
                                            response_format=FORMAT, extra_body={"guidance_tokens": 4})  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_completions_too(edge: str) -> None:
    r = httpx.post(edge + "/v1/completions", headers=CLIENT_AUTH, timeout=300, json={
        "prompt": "The sky as JSON: ", "max_tokens": 96, "response_format": FORMAT, "guidance_tokens": 3})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)


def test_the_student_alone_when_the_cloud_is_away(lonely_edge: str) -> None:
    out = answer(lonely_edge, mode="gkt", guidance_tokens=5)
    assert out["gkt"]["fallback"] is not None
    valid(out)


@pytest.mark.parametrize(("extra", "param"), [
    ({"guidance_policy": "verify"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}},
     "response_format.json_schema.schema.properties.x.pattern"),
])
def test_refusals_name_the_field(edge: str, extra: dict[str, Any], param: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "response_format": FORMAT, **extra}
    r = httpx.post(edge + "/v1/chat/completions", json=body, headers=CLIENT_AUTH, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
