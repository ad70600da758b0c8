"""Teacher top-k log-probabilities on the guidance protocol (``top_logprobs``), for distillation transfer sets.

On the real llama.cpp cloud (SmolLM2 as the teacher, for speed) the numbers are checked against llama.cpp's own
logits for the same tokens (llama-cpp-python with ``logits_all``); streamed and whole answers carry the same
tokens; nothing changes for requests that do not ask. The OpenAI-upstream side parses vLLM's ``logprobs`` with
token ids, and an upstream that names tokens only by text gives the answer without log-probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud_service.engines.openai_upstream import token_choices
from gkt.launcher import Service, cloud_service, free_port
from shared.models import resolve
from tests.conftest import AUTH, CLOUD_KEYS, ONE_THREAD, _run

pytestmark = pytest.mark.models

MODEL = "smollm2-135m-instruct"
PROMPT = "Q: Tom has 3 boxes of 4 pens. How many pens does he have?\nA:"


@pytest.fixture(scope="module")
def smol_cloud(logs: Path) -> Iterator[Service]:
    env = {**ONE_THREAD, **CLOUD_KEYS, "GKT_CLOUD_MODEL": MODEL, "GKT_CLOUD_N_CTX": "1024"}
    yield from _run(cloud_service(free_port(), env, log_path=logs / "cloud_smol_logprobs.log"))


def guidance(cloud: Service, **body: object) -> httpx.Response:
    return httpx.post(cloud.url + "/v1/guidance", json={"prompt": PROMPT, "max_tokens": 12, "stream": False, **body},
                      headers=AUTH, timeout=120)


def test_top_logprobs_are_llama_cpp_s_own_numbers(smol_cloud: Service) -> None:
    result = guidance(smol_cloud, top_logprobs=5).json()
    lps = result["logprobs"]
    assert result["finish_reason"] == "length" and len(lps) == result["usage"]["completion_tokens"] == 12
    import llama_cpp

    ref = llama_cpp.Llama(model_path=str(resolve(MODEL)), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    try:
        prompt = ref.tokenize(PROMPT.encode(), add_bos=True, special=False)
        ids = [t["id"] for t in lps]
        assert ref.detokenize(ids).decode() == result["text"]
        ref.eval(prompt)
        for tok in ids[:-1]:  # one token per step, as the cloud decodes (the batched prompt path rounds otherwise)
            ref.eval([tok])
        scores = np.asarray(ref.scores[len(prompt) - 1 : len(prompt) - 1 + len(ids)], dtype=np.float64)
    finally:
        ref.close()
    logp = scores - np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1, keepdims=True)) - scores.max(
        -1, keepdims=True)
    for i, t in enumerate(lps):
        assert [p[0] for p in t["top"]] == list(np.argsort(-logp[i], kind="stable")[:5])
        assert t["top"][0][0] == t["id"]  # greedy: the sampled token is the most likely one
        assert [p[1] for p in t["top"]] == sorted((p[1] for p in t["top"]), reverse=True)
        assert t["logprob"] == pytest.approx(logp[i, t["id"]], abs=2e-3)
        assert [p[1] for p in t["top"]] == pytest.approx(list(logp[i][[p[0] for p in t["top"]]]), abs=2e-3)


def test_streamed_frames_carry_the_same_tokens_and_plain_requests_none(smol_cloud: Service) -> None:
    whole = guidance(smol_cloud, top_logprobs=3).json()
    frames = []
    with httpx.stream("POST", smol_cloud.url + "/v1/guidance", headers=AUTH, timeout=120,
                      json={"prompt": PROMPT, "max_tokens": 12, "top_logprobs": 3}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                frames.append(json.loads(line[6:]))
    tokens = [f for f in frames if f["type"] == "token"]
    assert frames[-1]["type"] == "done" and "".join(f["text"] for f in tokens) == whole["text"]
    assert [t for f in tokens for t in f["logprobs"]] == whole["logprobs"]
    assert all(len(f["logprobs"]) == f["tokens"] for f in tokens)
    plain = guidance(smol_cloud).json()
    assert plain["text"] == whole["text"] and plain["logprobs"] is None
    again = guidance(smol_cloud, top_logprobs=3).json()  # never a cache replay without its numbers
    assert again["cached"] is False and again["logprobs"] == whole["logprobs"]


def test_top_logprobs_zero_and_bad_values(smol_cloud: Service) -> None:
    zero = guidance(smol_cloud, top_logprobs=0, max_tokens=4).json()
    assert [t["top"] for t in zero["logprobs"]] == [[]] * 4 and all(t["logprob"] <= 0 for t in zero["logprobs"])
    for bad in ({"top_logprobs": 21}, {"top_logprobs": -1}, {"top_logprobs": 2, "draft": " Tom has"}):
        r = guidance(smol_cloud, **bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_stop_sequence_keeps_the_tokens_behind_the_text(smol_cloud: Service) -> None:
    plain = guidance(smol_cloud, max_tokens=24).json()["text"]
    # Greedy: the same text comes again and is cut at a window that first occurs in its middle.
    at = next(i for i in range(len(plain) // 2, len(plain) - 3) if plain.find(plain[i : i + 3]) == i)
    stop = plain[at : at + 3]
    r = guidance(smol_cloud, top_logprobs=2, max_tokens=24, stop=[stop]).json()
    assert r["finish_reason"] == "stop" and r["text"] == plain[:at], (plain, stop, r["text"])
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(resolve(MODEL)), vocab_only=True, verbose=False)
    try:
        # The tokens cover the text; the last ones may hold the stop sequence that the text leaves out.
        written = vocab.detokenize([t["id"] for t in r["logprobs"]]).decode()
    finally:
        vocab.close()
    assert written.startswith(r["text"]) and len(r["logprobs"]) <= r["usage"]["completion_tokens"]


VLLM_CHAT = {"content": [
    {"token": "token_id:791", "logprob": -0.01, "bytes": [84], "top_logprobs": [
        {"token": "token_id:791", "logprob": -0.01}, {"token": "token_id:32", "logprob": -4.7}]},
    {"token": "token_id:3", "logprob": -1.5, "top_logprobs": [
        {"token": "token_id:9", "logprob": -0.3}, {"token": "token_id:3", "logprob": -1.5}]}]}
VLLM_COMPLETION = {"tokens": ["token_id:791", "token_id:3"], "token_logprobs": [-0.01, -1.5], "text_offset": [0, 1],
                   "top_logprobs": [{"token_id:791": -0.01, "token_id:32": -4.7},
                                    {"token_id:3": -1.5, "token_id:9": -0.3}]}


def test_vllm_logprobs_with_token_ids_parse_in_both_apis() -> None:
    for payload, chat in ((VLLM_CHAT, True), (VLLM_COMPLETION, False)):
        got = token_choices(payload, chat=chat)
        assert got is not None and [c.id for c in got] == [791, 3]
        assert got[0].top == [(791, -0.01), (32, -4.7)] and got[1].top == [(9, -0.3), (3, -1.5)]
        assert got[1].logprob == -1.5
    text_only = {"tokens": [" Paris"], "token_logprobs": [-0.1], "top_logprobs": [{" Paris": -0.1}]}
    assert token_choices(text_only, chat=False) is None  # no ids: no numbers rather than wrong ones
    assert token_choices(None, chat=True) is None and token_choices({"content": [{"x": 1}]}, chat=True) is None


def test_upstream_without_token_ids_answers_without_logprobs(cloud_upstream: Service) -> None:
    r = httpx.post(cloud_upstream.url + "/v1/guidance", headers=AUTH, timeout=120,
                   json={"prompt": "The capital of France is", "max_tokens": 5, "stream": False, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    assert r.json()["text"] and r.json()["logprobs"] is None
