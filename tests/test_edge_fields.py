"""Fields that change what the answer means are never silently ignored by the edge (issue 21, V3), and the
small endpoints clients probe (``/tokenize``, ``/detokenize``) answer with the student's tokenizer, or the
teacher's through the cloud. Real cloud and edge (SmolLM2 on both sides: refusals cost no generation)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from edge_agent.protocol import NOT_YET_HONOURED
from gkt.launcher import Service
from tests.conftest import CLIENT_AUTH, CLIENT_KEY, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, pair_fixture

pytestmark = pytest.mark.models

ENV = {
    "GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "512",
    "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "512",
    **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS,
}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "mode": "student"}
COMPLETION = {"prompt": "1, 2, 3,", "max_tokens": 2, "mode": "student"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
# One value per refused field that puts it in effect, and the route it belongs to.
IN_EFFECT: dict[str, tuple[str, Any]] = {
    "tools": ("chat", [TOOL]),
    "tool_choice": ("chat", "auto"),
    "functions": ("chat", [TOOL["function"]]),
    "function_call": ("chat", {"name": "f"}),
    "logit_bias": ("completion", {"42": 5}),
    "frequency_penalty": ("chat", 0.5),
    "presence_penalty": ("completion", 0.5),
    "suffix": ("completion", " end"),
    "best_of": ("completion", 2),
    "audio": ("chat", {"voice": "alloy", "format": "wav"}),
    "modalities": ("chat", ["text", "audio"]),
    "web_search_options": ("chat", {}),
    "prediction": ("chat", {"type": "content", "content": "x"}),
}


services = pair_fixture(ENV, name="services")


@pytest.fixture(scope="module")
def edge(services: tuple[Service, Service]) -> str:
    return services[1].url


def post(edge: str, kind: str, extra: dict[str, Any]) -> httpx.Response:
    path, base = ("/v1/chat/completions", CHAT) if kind == "chat" else ("/v1/completions", COMPLETION)
    return httpx.post(edge + path, json={**base, **extra}, headers=CLIENT_AUTH, timeout=60)


def error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_every_refused_field_has_a_case() -> None:
    assert set(IN_EFFECT) == set(NOT_YET_HONOURED)


@pytest.mark.parametrize("field", sorted(IN_EFFECT))
def test_a_field_that_changes_the_answer_is_refused_naming_it(edge: str, field: str) -> None:
    kind, value = IN_EFFECT[field]
    err = error(post(edge, kind, {field: value}))
    assert err["param"] == field, err
    assert err["code"] == "invalid_request"


@pytest.mark.parametrize(("kind", "extra"), [
    ("chat", {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
              "parallel_tool_calls": True, "reasoning_effort": "low", "prompt_cache_key": "x"}),
    ("chat", {"tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False,
              "frequency_penalty": 0, "modalities": ["text"]}),
    ("completion", {"user": "u1", "echo": False, "best_of": 1, "presence_penalty": 0.0}),
])
def test_harmless_fields_are_accepted(edge: str, kind: str, extra: dict[str, Any]) -> None:
    assert post(edge, kind, extra).status_code == 200


@pytest.mark.parametrize(("kind", "extra", "param"), [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"echo": True, "mode": "teacher"}, "echo"),
    ("completion", {"ignore_eos": True, "mode": "gkt"}, "ignore_eos"),  # student mode only
    ("completion", {"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ("chat", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("chat", {"frequency_penalty": 3}, "frequency_penalty"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 1}}}}}},
     "response_format.json_schema.schema.properties.x.minimum"),
])
def test_values_are_validated_before_any_refusal(edge: str, kind: str, extra: dict[str, Any], param: str) -> None:
    """The checks that stay when the edge implements these fields: ranges, combinations, schemas."""
    assert error(post(edge, kind, extra))["param"] == param


def test_the_openai_sdk_sees_a_400_for_tools(edge: str) -> None:
    client = openai.OpenAI(base_url=edge + "/v1", api_key=CLIENT_KEY)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], tools=[TOOL])
    assert "tools" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                       logit_bias={"42": 5})


def test_tokenize_with_the_student_and_the_teacher(services: tuple[Service, Service]) -> None:
    cloud, edge = services

    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(edge.url + path, json=body, headers=CLIENT_AUTH, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    student = call("/tokenize", {"prompt": "Hello there", "add_special_tokens": False})
    assert student["count"] == len(student["tokens"]) > 0 and student["max_model_len"] == 512
    assert call("/detokenize", {"tokens": student["tokens"]})["prompt"] == "Hello there"
    assert call("/tokenize", {"content": "Hello there"})["tokens"] == student["tokens"]  # llama-server's shape
    teacher = call("/teacher/tokenize", {"prompt": "Hello there", "add_special_tokens": False})
    assert teacher["tokens"] == student["tokens"]  # the same SmolLM2 on both sides here
    assert call("/teacher/detokenize", {"tokens": teacher["tokens"]})["prompt"] == "Hello there"
    chat = call("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["count"] > 3
    info = httpx.get(edge.url + "/tokenizer_info", headers=CLIENT_AUTH).json()  # lm-eval's remote tokenizer
    assert info["eos_token"] and info["chat_template"] and info["model_max_length"] == 512
    r = httpx.post(edge.url + "/detokenize", json={"tokens": [-1]}, headers=CLIENT_AUTH)
    assert error(r)["param"] == "tokens.0"
    r = httpx.post(edge.url + "/teacher/detokenize", json={"tokens": [10**9]}, headers=CLIENT_AUTH)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]  # the cloud's refusal
