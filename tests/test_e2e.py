"""GKT end to end: real cloud and edge processes on loopback with the real models."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from gkt.launcher import Service
from shared.protocol import SSEDecoder, parse_frame
from shared.tasks import GSM8K
from shared.words import WORD_ALLOWANCE, boundary_between
from tests.conftest import AUTH, CLIENT_AUTH, CLIENT_KEY, auth_for

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TIMEOUT = httpx.Timeout(10.0, read=600.0)


def first_gsm8k():
    return next(GSM8K.load(DATA / "gsm8k" / "train.jsonl"))


def post(service: Service, path: str, body: dict) -> httpx.Response:
    return httpx.post(service.url + path, json=body, timeout=TIMEOUT, headers=auth_for(service))


def teacher_alone(cloud: Service, prompt: str, k: int) -> dict:
    r = post(cloud, "/v1/guidance", {"prompt": prompt, "max_tokens": k, "stream": False, "stop": list(GSM8K.stop)})
    assert r.status_code == 200, r.text
    return r.json()


def wrote(gkt: dict, k: int) -> bool:
    """The teacher wrote k tokens, then at most the word allowance to end its word, plus the one token that
    opened the next word (generated and billed, not sent)."""
    return k <= gkt["usage"]["teacher_tokens"] <= k + WORD_ALLOWANCE + 1


def test_cloud_whole_words_end_guidance_at_a_word_boundary(cloud: Service) -> None:
    """#7: the cloud finishes the word its k-th token is in, so the edge can show every token at once."""
    prompt = GSM8K.build_prompt(first_gsm8k().question)
    longer = teacher_alone(cloud, prompt, 40)["text"]
    ends = set()
    for k in (3, 5, 7, 9, 11):
        plain = teacher_alone(cloud, prompt, k)["text"]
        r = post(cloud, "/v1/guidance", {"prompt": prompt, "max_tokens": k, "stream": False,
                                         "stop": list(GSM8K.stop), "whole_words": True})
        assert r.status_code == 200, r.text
        text = r.json()["text"]
        assert text.startswith(plain) and longer.startswith(text)
        assert boundary_between(text, longer[len(text):])
        assert k <= r.json()["usage"]["completion_tokens"] <= k + WORD_ALLOWANCE + 1
        ends.add(len(text) > len(plain))
    assert True in ends  # at least one k fell inside a word and was carried to its end


def test_gsm8k_in_gkt_mode_starts_with_teacher_guidance(edge: Service, cloud: Service) -> None:
    ex = first_gsm8k()
    r = post(edge, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": ex.question}], "task": "gsm8k",
        "guidance_tokens": 40, "max_tokens": 200,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    text, gkt = body["choices"][0]["message"]["content"], body["gkt"]
    assert gkt["mode"] == "gkt" and gkt["fallback"] is None and not gkt["partial"]
    assert gkt["teacher_model"] == "qwen2.5-coder-1.5b-instruct"
    assert gkt["student_model"] == "qwen2.5-coder-0.5b-instruct"
    assert wrote(gkt, 40) and gkt["usage"]["student_tokens"] > 0
    # The answer begins with the guidance, and the guidance is what the teacher writes for this prompt,
    # to the end of the word its 40th token is in.
    guidance = gkt["guidance"]
    assert len(guidance) > 20 and text.startswith(guidance) and len(text) > len(guidance)
    alone = teacher_alone(cloud, GSM8K.build_prompt(ex.question), 40 + WORD_ALLOWANCE + 1)["text"]
    assert alone.startswith(guidance) and boundary_between(guidance, alone[len(guidance):])
    assert gkt["answer"] is not None and gkt["answer"] == GSM8K.extract(text)
    t = gkt["timings"]
    assert 0 < t["cloud_ttft_s"] <= t["guidance_s"] < t["total_s"]
    assert t["student_prompt_s"] > 0 and t["student_generation_s"] > 0
    u = gkt["usage"]
    assert body["usage"]["completion_tokens"] == u["guidance_student_tokens"] + u["student_tokens"]


def test_cross_vocabulary_teacher_qwen_student_smollm2(edge_smol: Service) -> None:
    ex = first_gsm8k()
    r = post(edge_smol, "/v1/completions", {
        "prompt": ex.question, "task": "gsm8k", "guidance_tokens": 30, "max_tokens": 120,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    text, gkt = body["choices"][0]["text"], body["gkt"]
    assert gkt["student_model"] == "smollm2-135m-instruct"
    assert gkt["teacher_model"] == "qwen2.5-coder-1.5b-instruct"
    assert gkt["guidance"] and text.startswith(gkt["guidance"])
    assert gkt["usage"]["student_tokens"] > 0 and wrote(gkt, 30)
    # The same text is a different number of tokens in each vocabulary.
    assert gkt["usage"]["guidance_student_tokens"] > 0


def test_chat_gkt_uses_each_models_own_template(edge: Service) -> None:
    r = post(edge, "/v1/chat/completions", {
        "messages": [{"role": "system", "content": "Answer in one short sentence."},
                     {"role": "user", "content": "Why do leaves change colour in autumn?"}],
        "guidance_tokens": 12, "max_tokens": 40,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    text, gkt = body["choices"][0]["message"]["content"], body["gkt"]
    assert "<|im_start|>" not in text and "<|im_end|>" not in text
    assert text.startswith(gkt["guidance"]) and wrote(gkt, 12)


def test_student_mode(edge: Service) -> None:
    r = post(edge, "/v1/completions", {"prompt": "Q: What is 2 + 2?\nA:", "mode": "student", "max_tokens": 12,
                                       "stop": ["\n"]})
    assert r.status_code == 200, r.text
    gkt = r.json()["gkt"]
    assert gkt["mode"] == "student" and gkt["guidance"] == "" and gkt["teacher_model"] is None
    assert gkt["usage"]["teacher_tokens"] == 0 and gkt["usage"]["student_tokens"] > 0
    assert gkt["timings"]["cloud_ttft_s"] is None


def test_teacher_mode_is_the_teacher_alone(edge: Service, cloud: Service) -> None:
    prompt = "Q: Tom has 3 boxes of 4 pens. How many pens does he have?\nA:"
    r = post(edge, "/v1/completions", {"prompt": prompt, "mode": "teacher", "max_tokens": 30, "stop": ["\nQ:"]})
    assert r.status_code == 200, r.text
    body = r.json()
    gkt = body["gkt"]
    assert gkt["usage"]["student_tokens"] == 0 and gkt["usage"]["teacher_tokens"] > 0
    alone = post(cloud, "/v1/guidance", {"prompt": prompt, "max_tokens": 30, "stream": False, "stop": ["\nQ:"]})
    assert body["choices"][0]["text"] == alone.json()["text"]


def test_teacher_mode_logprobs_are_the_teachers_own_when_the_vocabularies_match(
    edge: Service, edge_smol: Service, edge_upstream: Service
) -> None:
    """The default pair shares Qwen's vocabulary (one fingerprint in both ``/tokenizer_info``s): the edge names
    the teacher's token ids with the student's. SmolLM2 under the Qwen teacher, or a teacher upstream that does
    not describe its vocabulary: a 400 naming ``logprobs``, never numbers under the wrong names."""
    body = {"prompt": "Q: Tom has 3 boxes of 4 pens. How many pens does he have?\nA:", "mode": "teacher",
            "max_tokens": 12, "logprobs": 2}
    r = post(edge, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]).startswith(choice["text"]) and len(lp["tokens"]) >= len(choice["text"].split())
    assert all(x <= 0 for x in lp["token_logprobs"]) and all(len(t) >= 2 for t in lp["top_logprobs"])
    for other in (edge_smol, edge_upstream):
        bad = post(other, "/v1/completions", body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs", bad.text


def test_openai_client_streams_guidance_then_student(edge: Service) -> None:
    client = OpenAI(base_url=edge.url + "/v1", api_key=CLIENT_KEY, timeout=600)
    stream = client.chat.completions.create(
        model="gkt", messages=[{"role": "user", "content": first_gsm8k().question}], stream=True,
        max_tokens=80, stream_options={"include_usage": True}, extra_body={"task": "gsm8k", "guidance_tokens": 20},
    )
    sources, texts, summary, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                texts.append(choice.delta.content)
                sources.append(chunk.model_extra["gkt"]["source"])
            if choice.finish_reason:
                summary = chunk.model_extra["gkt"]
    assert summary is not None and usage is not None
    assert sources[0] == "teacher" and sources[-1] == "student"
    first_student = sources.index("student")
    assert set(sources[:first_student]) == {"teacher"} and set(sources[first_student:]) == {"student"}
    assert "".join(texts[:first_student]) == summary["guidance"]
    assert usage.completion_tokens == summary["usage"]["guidance_student_tokens"] + summary["usage"]["student_tokens"]


def test_cloud_streams_frames_with_usage_and_timings(cloud: Service) -> None:
    with httpx.stream("POST", cloud.url + "/v1/guidance", json={
        "messages": [{"role": "user", "content": "Count from one to ten in words."}], "max_tokens": 8,
    }, timeout=TIMEOUT, headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["x-gkt-protocol"] == "1"
        dec = SSEDecoder()
        frames = [parse_frame(d) for chunk in r.iter_raw() for d in dec.feed(chunk)]
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert frames[-1].type == "done" and all(f.type in ("token", "heartbeat") for f in frames[:-1])
    done = frames[-1]
    assert done.usage.completion_tokens == 8 == sum(f.tokens for f in frames if f.type == "token")
    assert done.usage.prompt_tokens > 10 and done.timings.prompt_s > 0 and done.timings.generation_s > 0


def test_cloud_batch(cloud: Service) -> None:
    r = post(cloud, "/v1/guidance/batch", {"requests": [
        {"prompt": "1, 2, 3, 4,", "max_tokens": 4},
        {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3},
        {"prompt": "word " * 2500, "max_tokens": 4},
    ]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert results[0]["result"]["usage"]["completion_tokens"] == 4 and results[0]["result"]["text"]
    assert results[1]["result"]["text"]
    assert results[2]["error"]["code"] == "context_length_exceeded" and results[2]["result"] is None


def test_openai_upstream_backend(cloud_upstream: Service, edge_upstream: Service) -> None:
    """The cloud's OpenAI backend against a real OpenAI-compatible server (llama_cpp.server)."""
    with httpx.stream("POST", cloud_upstream.url + "/v1/guidance", json={
        "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 10,
    }, timeout=TIMEOUT, headers=AUTH) as r:
        assert r.status_code == 200
        dec = SSEDecoder()
        frames = [parse_frame(d) for chunk in r.iter_raw() for d in dec.feed(chunk)]
    assert frames[-1].type == "done" and frames[-1].model == "smollm2-upstream"
    assert "".join(f.text for f in frames if f.type == "token")
    raw = post(cloud_upstream, "/v1/guidance", {"prompt": "The capital of France is", "max_tokens": 5,
                                                "stream": False})
    assert raw.status_code == 200 and raw.json()["text"]
    answer = post(edge_upstream, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is 3 + 4? Explain."}], "guidance_tokens": 10,
        "max_tokens": 40,
    })
    assert answer.status_code == 200, answer.text
    gkt = answer.json()["gkt"]
    assert gkt["teacher_model"] == "smollm2-upstream" and gkt["fallback"] is None
    assert answer.json()["choices"][0]["message"]["content"].startswith(gkt["guidance"])


def envelope(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    return err


EDGE_BAD = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "guidance_tokens": -1}, "guidance_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "mode": "wizard"}, "mode"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "task": "chess"}, "task"),
    ({"messages": [{"role": "user", "content": "nul\u0000"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hello " * 3000}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2040}, "messages"),
]


@pytest.mark.parametrize("body, param", EDGE_BAD)
def test_edge_bad_requests_get_4xx_envelopes(edge: Service, body: dict, param: str) -> None:
    r = post(edge, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = envelope(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].startswith(param), err


def test_edge_context_error_states_counts(edge: Service) -> None:
    r = post(edge, "/v1/completions", {"prompt": "hello " * 3000, "max_tokens": 10})
    err = envelope(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "2048 tokens" in err["message"] and "10 more were requested" in err["message"]


def test_edge_malformed_json_and_unknown_route(edge: Service) -> None:
    r = httpx.post(edge.url + "/v1/chat/completions", content=b"{not json", timeout=TIMEOUT,
                   headers={"content-type": "application/json", **CLIENT_AUTH})
    assert r.status_code == 400 and envelope(r)["code"] == "invalid_request"
    r = httpx.get(edge.url + "/v1/nothing", timeout=TIMEOUT, headers=CLIENT_AUTH)
    assert r.status_code == 404 and envelope(r)["code"] == "not_found"


CLOUD_BAD = [
    ({"max_tokens": 4}, None),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 4000}, "max_tokens"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "word " * 2500, "max_tokens": 4}, "prompt"),
    ({"messages": [{"role": "user", "content": "word " * 2500}], "max_tokens": 4}, "messages"),
]


@pytest.mark.parametrize("body, param", CLOUD_BAD)
def test_cloud_bad_requests_get_4xx_envelopes(cloud: Service, body: dict, param: str | None) -> None:
    r = post(cloud, "/v1/guidance", body)
    assert r.status_code == 400, r.text
    err = envelope(r)
    if param:
        assert err["param"] is not None and err["param"].startswith(param), err


def test_services_keep_serving_after_bad_input(edge: Service, cloud: Service) -> None:
    for _ in range(3):
        post(edge, "/v1/chat/completions", {"messages": "garbage"})
        post(cloud, "/v1/guidance", {"prompt": 5})
    assert httpx.get(edge.url + "/health").status_code == 200
    assert httpx.get(cloud.url + "/ready").status_code == 200
    r = post(edge, "/v1/completions", {"prompt": "One, two,", "max_tokens": 3, "guidance_tokens": 2})
    assert r.status_code == 200 and json.loads(r.text)["choices"][0]["text"]


def test_teacher_mode_longer_than_the_wire_allows_is_a_400(edge: Service) -> None:
    """Found by fuzzing: a teacher-mode answer beyond the guidance protocol's k limit is the caller's error."""
    r = post(edge, "/v1/completions", {"prompt": "Hi", "mode": "teacher", "max_tokens": 13221})
    err = envelope(r)
    assert r.status_code == 400 and err["param"] == "max_tokens"
