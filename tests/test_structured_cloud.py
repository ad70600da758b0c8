"""The cloud writes guidance under ``response_format`` (real teacher, real scheduler, real OpenAI upstream).

The guidance must be a valid start of a document of the format, whatever k: a whole document when k is
large enough, a prefix the edge's grammar accepts when k cuts it. A sequence without a grammar in the same
batch is unaffected (greedy: the same text as alone). Also ``/tokenize`` and ``/detokenize`` with the
teacher's tokenizer, in vLLM's and llama-server's shapes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from gkt.launcher import Service, cloud_service, free_port
from shared.grammar import GrammarState
from shared.models import resolve
from shared.structured import compile_schema
from tests.conftest import AUTH, CLOUD_KEYS

pytestmark = pytest.mark.models

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer"},
                   "rivers": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["city", "population", "rivers"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Give the capital of France as JSON with its population and rivers."}]


@pytest.fixture(scope="module")
def checker() -> Iterator[GrammarState]:
    """The schema's grammar over SmolLM2's vocabulary: any model's state checks text the same way."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(resolve("smollm2-135m-instruct")), n_ctx=64, n_threads=1, verbose=False)
    with GrammarState(llm, compile_schema(SCHEMA)) as state:
        yield state
    llm.close()


def guidance(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/guidance", json={"stream": False, **body}, headers=AUTH, timeout=300)


def test_guidance_under_the_schema_is_a_whole_valid_document(cloud: Service) -> None:
    r = guidance(cloud.url, messages=ASK, max_tokens=80, response_format=FORMAT)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop"
    jsonschema.validate(json.loads(r.json()["text"]), SCHEMA)


@pytest.mark.parametrize("k", [3, 7, 12])
def test_guidance_cut_at_k_is_a_valid_prefix(cloud: Service, checker: GrammarState, k: int) -> None:
    r = guidance(cloud.url, messages=ASK, max_tokens=k, response_format=FORMAT, temperature=0.8, seed=k)
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    assert r.json()["usage"]["completion_tokens"] == k
    assert checker.valid_prefix(text) == len(text), text


def test_continued_message_is_continued_inside_the_document(cloud: Service) -> None:
    start = '{"city": "Paris", "population": '
    messages = [*ASK, {"role": "assistant", "content": start}]
    r = guidance(cloud.url, messages=messages, max_tokens=80, response_format=FORMAT)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(start + r.json()["text"]), SCHEMA)
    bad = [*ASK, {"role": "assistant", "content": '{"town": '}]
    r = guidance(cloud.url, messages=bad, max_tokens=8, response_format=FORMAT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


async def test_a_sequence_without_grammar_is_unaffected_by_one_with(cloud: Service, checker: GrammarState) -> None:
    plain = {"stream": False, "prompt": "The three largest cities of Italy are", "max_tokens": 24}
    async with httpx.AsyncClient(base_url=cloud.url, headers=AUTH, timeout=300) as client:
        alone = (await client.post("/v1/guidance", json=plain)).json()["text"]
        both = await asyncio.gather(
            client.post("/v1/guidance", json=plain),
            client.post("/v1/guidance", json={"stream": False, "messages": ASK, "max_tokens": 60,
                                              "response_format": FORMAT}),
        )
    assert both[0].json()["text"] == alone
    structured = both[1].json()["text"]
    assert checker.valid_prefix(structured) == len(structured), structured


def test_bad_formats_are_400s_naming_the_field(cloud: Service) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a$"}}}
    r = guidance(cloud.url, messages=ASK, max_tokens=4, response_format=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema.pattern"
    r = guidance(cloud.url, prompt="x", max_tokens=4, response_format=FORMAT, draft="y")
    assert r.status_code == 400 and r.json()["error"]["param"] == "draft"


def test_tokenize_and_detokenize_with_the_teachers_tokenizer(cloud: Service) -> None:
    post = lambda path, body: httpx.post(cloud.url + path, json=body, headers=AUTH, timeout=60)  # noqa: E731
    vllm = post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False, "return_token_strs": True})
    assert vllm.status_code == 200, vllm.text
    body = vllm.json()
    assert body["count"] == len(body["tokens"]) == 2 and body["max_model_len"] == 2048
    assert "".join(body["token_strs"]) == "Hello world"
    assert post("/detokenize", {"tokens": body["tokens"]}).json()["prompt"] == "Hello world"
    server = post("/tokenize", {"content": "Hello world", "with_pieces": True}).json()
    assert [p["id"] for p in server["tokens"]] == body["tokens"]
    chat = post("/tokenize", {"messages": ASK}).json()
    assert chat["count"] > 10
    r = post("/detokenize", {"tokens": [1, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens.1"


@pytest.fixture(scope="module")
def cloud_grammar_upstream(upstream: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The OpenAI backend in front of llama.cpp's server, structured output sent as the grammar itself."""
    env = {**CLOUD_KEYS, "GKT_CLOUD_BACKEND": "openai", "GKT_CLOUD_UPSTREAM_URL": f"{upstream.url}/v1",
           "GKT_CLOUD_UPSTREAM_STRUCTURED": "grammar"}
    log = tmp_path_factory.mktemp("grammar-upstream") / "cloud.log"
    svc = cloud_service(free_port(), env, log_path=log).start()
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def test_openai_backend_sends_the_grammar_to_llama_cpp_servers(
    cloud_grammar_upstream: Service, checker: GrammarState
) -> None:
    """llama.cpp's server writes under the very grammar the edge continues: a valid start, a whole document
    when it ends."""
    r = guidance(cloud_grammar_upstream.url, messages=ASK, max_tokens=100, response_format=FORMAT)
    assert r.status_code == 200, r.text
    text = r.json()["text"]
    assert checker.valid_prefix(text) == len(text), text
    if r.json()["finish_reason"] == "stop":
        jsonschema.validate(json.loads(text), SCHEMA)


def test_openai_backend_passes_response_format_and_relays_a_refusal(cloud_upstream: Service) -> None:
    """The default sends the OpenAI field (vLLM's structured outputs); llama.cpp's server knows only
    json_object and fails on json_schema (HTTP 500 from it): the cloud relays an error in the envelope, never
    an answer written without the schema."""
    r = guidance(cloud_upstream.url, messages=ASK, max_tokens=8, response_format=FORMAT)
    assert r.status_code in (400, 502), r.text
    assert r.json()["error"]["code"] in ("upstream_rejected", "upstream_error")
