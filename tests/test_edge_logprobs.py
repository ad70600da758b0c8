"""Log-probabilities through the edge's OpenAI API (issue 21 point 1): ``logprobs``/``top_logprobs`` on chat,
``logprobs`` and ``echo`` (prompt log-probabilities, ``max_tokens`` 0) on completions, in student and gkt modes,
streamed and whole, through the ``openai`` SDK too. The numbers are checked against llama-cpp-python's own
(``Llama(logits_all=True)``: ``eval`` then ``logits_to_logprobs`` over the same tokens). Real cloud and edge,
SmolLM2 on both sides (one vocabulary: the guidance's tokens can be named either way)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from gkt.launcher import Service
from shared.models import resolve
from tests.conftest import CLIENT_AUTH, CLIENT_KEY, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, pair_fixture

pytestmark = pytest.mark.models

MODEL = "smollm2-135m-instruct"
ENV = {
    "GKT_CLOUD_MODEL": MODEL, "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "512",
    "GKT_EDGE_MODEL": MODEL, "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "512",
    **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS,
}
PROMPT = "Question: Where do fish live?\nAnswer: in the river, and"
# The reference decodes as the edge does (the prompt in batches, generated tokens one at a time): only float
# noise from the batch shapes is left (canonical padding at the edge). A one-row and a long batch differ by up
# to 0.16 on SmolLM2's Q4_1 (measured), so the reference must decode the same way.
PROMPT_TOL = GEN_TOL = 1e-3

services = pair_fixture(ENV, name="services")


@pytest.fixture(scope="module")
def edge(services: tuple[Service, Service]) -> str:
    return services[1].url


@pytest.fixture(scope="module")
def reference() -> Iterator[Any]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(resolve(MODEL)), n_ctx=512, n_threads=1, n_threads_batch=1,
                          logits_all=True, verbose=False)
    yield llm
    llm.close()


def scores(llm: Any, tokens: list[int]) -> list[np.ndarray]:
    """llama-cpp-python's own log-probabilities after each of ``tokens`` (row i scores token i + 1)."""
    import llama_cpp

    llm.reset()
    llm.eval(tokens)
    return list(llama_cpp.Llama.logits_to_logprobs(np.array(llm.scores[: len(tokens)])))


def generation_scores(llm: Any, prompt: list[int], answer: list[int]) -> list[float]:
    """llama-cpp-python's own log-probabilities of ``answer`` after ``prompt``, decoded a token at a time as a
    generation decodes them (a one-row batch computes a token's logits a little differently from a long one)."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt)
    out = []
    for tok in answer:
        row = llama_cpp.Llama.logits_to_logprobs(np.array(llm.scores[llm.n_tokens - 1]))
        out.append(float(row[tok]))
        llm.eval([tok])
    return out


def post(edge: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(edge + path, json=body, headers=CLIENT_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(edge: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of one streamed chat completion."""
    chunks = []
    with httpx.stream("POST", edge + "/v1/chat/completions", json=body, headers=CLIENT_AUTH, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return chunks


def test_echo_scores_the_prompt_as_llama_cpp_does(edge: str, reference: Any) -> None:
    out = post(edge, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 3})
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT and "".join(lp["tokens"]) == PROMPT
    assert out["usage"]["completion_tokens"] == 0 and out["gkt"]["guidance_calls"] == 0  # nobody wrote
    tokens = reference.tokenize(PROMPT.encode(), add_bos=False)
    assert len(lp["token_logprobs"]) == len(tokens) == out["usage"]["prompt_tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing comes before it
    ref = scores(reference, tokens)
    expected = [float(ref[i][tokens[i + 1]]) for i in range(len(tokens) - 1)]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=PROMPT_TOL)
    for i in range(1, len(tokens)):
        top = lp["top_logprobs"][i]
        best = sorted(ref[i - 1], reverse=True)[:3]
        assert len(top) in (3, 4)  # the three most likely, plus the prompt's own token when it is not one
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best, abs=PROMPT_TOL)
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]


@pytest.mark.parametrize("mode", ["student", "gkt"])
def test_echo_with_an_answer_as_lm_eval_asks(edge: str, mode: str) -> None:
    """lm-evaluation-harness's multiple-choice request: echo, one token, one alternative."""
    out = post(edge, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1,
                                         "temperature": 0, "mode": mode})
    choice, n = out["choices"][0], out["usage"]["prompt_tokens"]
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and "".join(lp["tokens"]) == choice["text"]
    assert all(x is not None for x in lp["token_logprobs"][1:n])
    assert all(t[lp["tokens"][i]] == lp["token_logprobs"][i] for i, t in enumerate(lp["top_logprobs"][1:n], 1))


def test_chat_logprobs_are_the_students_own(edge: str, reference: Any) -> None:
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12, "mode": "student",
            "logprobs": True, "top_logprobs": 2}
    out = post(edge, "/v1/chat/completions", body)
    content = out["choices"][0]["logprobs"]["content"]
    text = out["choices"][0]["message"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] > 0
    assert bytes(b for e in content for b in e["bytes"]).decode() == text
    for e in content:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy: the chosen token is the most likely
    # The same numbers from llama-cpp-python over the chat prompt and the tokens the edge chose.
    toks = post(edge, "/tokenize", {"messages": body["messages"], "add_generation_prompt": True})["tokens"]
    answer = reference.tokenize(text.encode(), add_bos=False, special=False)
    expected = generation_scores(reference, toks, answer)
    assert [e["logprob"] for e in content] == pytest.approx(expected, abs=GEN_TOL)


def test_gkt_mode_marks_the_guidance_as_given(edge: str) -> None:
    body = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 16, "mode": "gkt",
            "guidance_tokens": 4, "logprobs": True, "stream": True}
    chunks = streamed(edge, body)
    parts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    sources = {c["gkt"]["source"] for c in parts}
    assert "teacher" in sources, "the cloud wrote no guidance"
    for c in parts:
        entries = c["choices"][0]["logprobs"]["content"]
        assert "".join(e["token"] for e in entries) == c["choices"][0]["delta"]["content"]
        if c["gkt"]["source"] == "teacher":
            assert all(e["logprob"] is None and e["top_logprobs"] == [] for e in entries)
        else:
            assert all(e["logprob"] <= 0 for e in entries)


@pytest.mark.parametrize("policy", [
    {"name": "reguide", "threshold": -0.3, "span": 1, "min_gap": 2, "tokens": 3},
    {"name": "verify", "draft_tokens": 4},
], ids=["reguide", "verify"])
def test_policies_that_cut_the_students_text_keep_its_tokens(edge: str, policy: dict[str, Any]) -> None:
    """Under reguide (the student's unsure span taken back) and verify (each draft kept up to the teacher's
    first different token) the student's chunks carry the tokens behind their text and the teacher's are
    given; a token the cut goes through is listed whole (its text starts in the answer)."""
    body = {"messages": [{"role": "user", "content": "Count from one to twenty in words."}], "max_tokens": 40,
            "mode": "gkt", "guidance_tokens": 2, "guidance_policy": policy, "logprobs": True, "stream": True}
    chunks = streamed(edge, body)
    parts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(parts) > 2 and chunks[-1]["gkt"]["guidance_calls"] >= 2  # the policy called the teacher again
    student = teacher = 0
    for c in parts:
        entries, text = c["choices"][0]["logprobs"]["content"], c["choices"][0]["delta"]["content"]
        joined = "".join(e["token"] for e in entries)
        if c["gkt"]["source"] == "teacher":
            teacher += 1
            assert joined == text and all(e["logprob"] is None for e in entries)
        else:
            student += 1
            assert joined.startswith(text) or text.startswith(joined), (text, joined)
            assert all(e["logprob"] <= 0 for e in entries)
    assert student and teacher


def test_teacher_mode_carries_the_teachers_own(edge: str, reference: Any) -> None:
    """The cloud sends the teacher's log-probabilities; the edge names them with the student's vocabulary
    (the same model on both sides here, so the numbers are also the reference's)."""
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 10, "mode": "teacher",
            "logprobs": True, "top_logprobs": 2}
    out = post(edge, "/v1/chat/completions", body)
    content, text = out["choices"][0]["logprobs"]["content"], out["choices"][0]["message"]["content"]
    assert content and bytes(b for e in content for b in e["bytes"]).decode() == text
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
    toks = post(edge, "/tokenize", {"messages": body["messages"]})["tokens"]
    answer = reference.tokenize(text.encode(), add_bos=False, special=False)
    # The cloud's batch decodes a step at a time too, in a batch of one here (nothing else is running).
    assert [e["logprob"] for e in content] == pytest.approx(generation_scores(reference, toks, answer), abs=GEN_TOL)


def test_the_openai_sdk_reads_them(edge: str) -> None:
    client = openai.OpenAI(base_url=edge + "/v1", api_key=CLIENT_KEY)
    msgs = [{"role": "user", "content": "Say hello."}]
    whole = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, logprobs=True, top_logprobs=1,
                                           extra_body={"mode": "student"})
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content
    streamed = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, logprobs=True, stream=True,
                                              extra_body={"mode": "student"})
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in whole.choices[0].logprobs.content]
    echo = client.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert echo.choices[0].text == PROMPT and echo.choices[0].logprobs.token_logprobs[0] is None
