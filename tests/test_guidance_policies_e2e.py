"""Guidance policies end to end: real cloud (Qwen 1.5B teacher) and edge processes on loopback.

Re-guidance: more than one guidance call in one answer, each counted in the response, the cloud's ledger
and the edge's metrics, with the text continuous at every seam (each teacher segment is exactly what the
teacher writes for the answer as it stood, and every seam lies at a safe boundary). Adaptive: the first
guidance ends at a step boundary before its maximum, and the closed stream is charged at the cloud (C3).
"""

from __future__ import annotations

import json
import re
import time

import httpx

from gkt.launcher import Service
from shared.protocol import ChatMessage
from shared.words import WORD_ALLOWANCE
from tests.conftest import AUTH, CLIENT_AUTH

TIMEOUT = httpx.Timeout(10.0, read=600.0)
# Forced re-guidance: every student token counts as unsure (threshold 0), so after min_gap student tokens
# the teacher is called again, twice (max_calls), m = 6 tokens each time.
# max_wait_s: a slow (shared) machine must not end re-guidance by its round-trip rule.
FORCED = {"name": "reguide", "threshold": 0.0, "span": 1, "min_gap": 4, "tokens": 6, "max_calls": 2,
          "max_wait_s": 600.0}
COUNT = [{"role": "user", "content": "List the numbers from 1 to 40, separated by commas."}]


def metric(svc: Service, name: str, labels: str = "") -> float:
    text = httpx.get(svc.url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def cloud_usage(cloud: Service) -> dict:
    r = httpx.get(cloud.url + "/v1/usage", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def stream_answer(edge: Service, body: dict) -> tuple[list[tuple[str, str]], dict]:
    """(text, source) of every streamed delta, and the final gkt object."""
    deltas, summary = [], None
    with httpx.stream("POST", edge.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=CLIENT_AUTH, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    deltas.append((choice["delta"]["content"], chunk["gkt"]["source"]))
                if choice.get("finish_reason"):
                    summary = chunk["gkt"]
    assert summary is not None
    return deltas, summary


def test_reguidance_calls_the_teacher_again_with_continuous_text_at_every_seam(
        edge_smol: Service, cloud: Service) -> None:
    before_usage = cloud_usage(cloud)
    before_calls = metric(edge_smol, "gkt_edge_guidance_calls_total", '{kind="reguide"}')
    deltas, gkt = stream_answer(edge_smol, {"messages": COUNT, "max_tokens": 60, "guidance_tokens": 6,
                                            "guidance_policy": FORCED})
    text = "".join(t for t, _ in deltas)
    calls = gkt["calls"]

    # More than one guidance call in one answer, counted in the response ...
    assert gkt["policy"]["name"] == "reguide" and gkt["policy"]["tokens"] == 6
    assert [c["kind"] for c in calls] == ["first", "reguide", "reguide"] and gkt["guidance_calls"] == 3
    assert all(c["finish"] == "length" and c["text"] for c in calls), calls
    # Each call: its 6 tokens, then to the end of the word (shared/words.py), plus the token that opened the next.
    assert gkt["usage"]["teacher_tokens"] == sum(c["teacher_tokens"] for c in calls)
    assert all(6 <= c["teacher_tokens"] <= 6 + WORD_ALLOWANCE + 1 for c in calls), calls
    assert gkt["usage"]["teacher_prompt_tokens"] == sum(c["prompt_tokens"] for c in calls)
    assert not gkt["usage"]["teacher_prompt_tokens_estimated"]
    # ... in the cloud's ledger (three guidance requests, each charged) ...
    after_usage = cloud_usage(cloud)
    assert after_usage["requests"] - before_usage["requests"] == 3
    assert after_usage["completion_tokens"] - before_usage["completion_tokens"] == gkt["usage"]["teacher_tokens"]
    # ... and in the edge's metrics.
    assert metric(edge_smol, "gkt_edge_guidance_calls_total", '{kind="reguide"}') - before_calls == 2

    # The stream is the answer: teacher and student segments alternate where the calls say.
    assert text.startswith(gkt["guidance"]) and gkt["guidance"] == calls[0]["text"]
    expected_sources = []
    for call, nxt in zip(calls, [*calls[1:], None], strict=True):
        assert text[call["offset"]: call["offset"] + len(call["text"])] == call["text"]
        segment = "".join(t for t, s in deltas if s == "teacher")
        assert call["text"] in segment
        student_end = nxt["offset"] if nxt else len(text)
        expected_sources += ["teacher"] + (["student"] if student_end > call["offset"] + len(call["text"]) else [])
    merged = [s for i, (_, s) in enumerate(deltas) if i == 0 or deltas[i - 1][1] != s]
    assert merged == expected_sources
    teacher_text = "".join(t for t, s in deltas if s == "teacher")
    assert teacher_text == "".join(c["text"] for c in calls)

    # Every seam is at a safe boundary: the answer never ends in whitespace or mid-word where the teacher
    # takes over, and each re-guidance is exactly what the teacher writes for the answer so far.
    for call in calls[1:]:
        before = text[: call["offset"]]
        assert before and not before[-1].isspace()
        assert call["text"][:1].isspace() or not call["text"][:1].isalnum() or not before[-1].isalnum()
        alone = httpx.post(cloud.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT, json={
            "messages": [*COUNT, ChatMessage(role="assistant", content=before).model_dump()],
            "max_tokens": call["max_tokens"], "stream": False,
        })
        assert alone.status_code == 200, alone.text
        assert alone.json()["text"].startswith(call["text"])

    u = gkt["usage"]
    assert u["student_tokens"] > 0 and u["guidance_student_tokens"] > 0
    assert gkt["timings"]["reguide_s"] > 0


def test_the_default_policy_is_fixed_with_one_call(edge_smol: Service) -> None:
    r = httpx.post(edge_smol.url + "/v1/chat/completions", headers=CLIENT_AUTH, timeout=TIMEOUT, json={
        "messages": COUNT, "max_tokens": 16, "guidance_tokens": 4})
    assert r.status_code == 200, r.text
    gkt = r.json()["gkt"]
    assert gkt["policy"] == {"name": "fixed"} and gkt["guidance_calls"] == 1 and gkt["calls"][0]["kind"] == "first"
    assert gkt["usage"]["student_discarded_tokens"] == 0


def test_adaptive_ends_the_first_guidance_at_a_step_boundary(edge_smol: Service, cloud: Service) -> None:
    before = cloud_usage(cloud)
    r = httpx.post(edge_smol.url + "/v1/completions", headers=CLIENT_AUTH, timeout=TIMEOUT, json={
        "prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                  "How many clips did Natalia sell altogether in April and May?",
        "task": "gsm8k", "max_tokens": 120,
        "guidance_policy": {"name": "adaptive", "min_tokens": 6, "max_tokens": 60}})
    assert r.status_code == 200, r.text
    body = r.json()
    text, gkt = body["choices"][0]["text"], body["gkt"]
    first = gkt["calls"][0]
    assert gkt["guidance_tokens"] == 60 and first["finish"] == "early"
    assert 6 <= first["teacher_tokens"] < 60
    # The kept guidance ends at the step boundary (the edge saw the next word begin, then closed).
    assert re.search(r"[.!?:]$", gkt["guidance"].rstrip("\n")) or gkt["guidance"].endswith("\n"), gkt["guidance"]
    assert text.startswith(gkt["guidance"]) and len(text) > len(gkt["guidance"])
    assert gkt["usage"]["teacher_prompt_tokens_estimated"] and gkt["usage"]["teacher_prompt_tokens"] > 0
    # The cloud charged the closed stream for what it generated (it may have run a token or two further).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = cloud_usage(cloud)
        if after["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.2)
    assert after["requests"] - before["requests"] == 1 and after["cancelled"] - before["cancelled"] == 1
    assert after["completion_tokens"] - before["completion_tokens"] >= first["teacher_tokens"]
