"""Draft verification end to end: the cloud keeps a student's draft up to the first token the teacher would not
have chosen, and the edge's ``verify`` policy builds answers from drafts and the teacher's corrections.

Real processes on loopback: the Qwen 1.5B teacher (llama.cpp, batched scheduler) judges drafts; the SmolLM2
student drafts (a different tokenizer: only text crosses). The property that makes the policy worth having:
with greedy decoding the answer is the teacher's own answer, while the teacher writes only its corrections.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from gkt.launcher import Service
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, ONE_THREAD, running_pair
from tests.test_guidance_policies_e2e import COUNT, cloud_usage, metric, stream_answer

TIMEOUT = httpx.Timeout(10.0, read=600.0)
PROMPT = "The planets of the solar system, in order from the sun, are"


def guidance(cloud: Service, **body: object) -> dict:
    r = httpx.post(cloud.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT,
                   json={"prompt": PROMPT, "temperature": 0, "stream": False, **body})
    assert r.status_code == 200, r.text
    return r.json()


def teacher_tokens_text(cloud: Service, n: int) -> list[str]:
    """The teacher's greedy continuation of PROMPT, one string per token frame."""
    pieces = []
    with httpx.stream("POST", cloud.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT,
                      json={"prompt": PROMPT, "temperature": 0, "max_tokens": n}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                frame = json.loads(line[6:])
                if frame["type"] == "token":
                    assert frame["tokens"] == 1, frame  # plain ASCII: one token per frame
                    pieces.append(frame["text"])
    assert len(pieces) == n
    return pieces


def test_the_cloud_keeps_a_draft_the_teacher_would_have_written_and_cuts_a_wrong_one(cloud: Service) -> None:
    pieces = teacher_tokens_text(cloud, 12)
    good = "".join(pieces[:8])

    kept = guidance(cloud, draft=good, max_tokens=2)
    # All of it kept; the teacher's own text goes on exactly where its greedy answer goes on.
    assert kept["draft_accepted"] == len(good)
    assert kept["text"] == "".join(pieces[8:10])
    assert kept["usage"]["draft_tokens"] == kept["usage"]["draft_accepted_tokens"] == 8
    assert kept["usage"]["completion_tokens"] == 2
    # The draft is input the teacher read: priced with the prompt, not as output.
    assert kept["cost"]["input_tokens"] == kept["usage"]["prompt_tokens"] + 8
    assert kept["cost"]["output_tokens"] == 2

    wrong = "".join(pieces[:5]) + " zebra zebra"
    cut = guidance(cloud, draft=wrong, max_tokens=1)
    # Kept up to the first token the teacher would not have written; its own token replaces it.
    assert cut["draft_accepted"] == len("".join(pieces[:5]))
    assert cut["text"] == pieces[5]
    assert cut["usage"]["draft_accepted_tokens"] == 5 and cut["usage"]["draft_tokens"] >= 6

    # The cut draft left nothing behind in the teacher's cache: the same prompt answers as before.
    assert guidance(cloud, max_tokens=12)["text"] == "".join(pieces)
    # And a wrong first token keeps nothing.
    none = guidance(cloud, draft=" zebra" + good, max_tokens=1)
    assert none["draft_accepted"] == 0 and none["text"] == pieces[0]


def test_drafts_share_the_batch_with_plain_guidance(cloud: Service) -> None:
    """Several verifications and a plain request at once: each gets its own verdict (one shared decode)."""
    import asyncio

    pieces = teacher_tokens_text(cloud, 10)

    async def both() -> list[dict]:
        async with httpx.AsyncClient(base_url=cloud.url, headers=AUTH, timeout=TIMEOUT) as client:
            bodies = [{"draft": "".join(pieces[:n]) + " zebra", "max_tokens": 1} for n in (2, 4, 6)]
            bodies.append({"max_tokens": 10})
            rs = await asyncio.gather(*(client.post("/v1/guidance", json={
                "prompt": PROMPT, "temperature": 0, "stream": False, **b}) for b in bodies))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            return [r.json() for r in rs]

    *verdicts, plain = asyncio.run(both())
    for n, v in zip((2, 4, 6), verdicts, strict=True):
        assert v["draft_accepted"] == len("".join(pieces[:n])) and v["text"] == pieces[n], (n, v)
    assert plain["text"] == "".join(pieces) and plain["draft_accepted"] is None


LENGTHS = [{"draft_tokens": 6}, {"draft_tokens": 1}, {"draft_tokens": "auto", "max_draft_tokens": 12}]


def test_a_draft_with_no_whole_character_yet_is_written_on_not_sent_empty(edge_smol: Service) -> None:
    """One-token drafts of emoji: a byte-level tokenizer spells one emoji in several tokens, so a one-token draft
    holds part of a character and no text. The cloud refuses an empty draft (which would end the checks and leave
    the student alone); the runner writes on until the draft shows text."""
    body = {"messages": [{"role": "user", "content": "Repeat exactly: 🙂🙂🙂🙂🙂🙂🙂🙂"}], "max_tokens": 40,
            "temperature": 0, "guidance_policy": {"name": "verify", "draft_tokens": 1, "max_wait_s": 600.0}}
    deltas, gkt = stream_answer(edge_smol, body)
    calls = gkt["calls"]
    assert not gkt["partial"] and gkt["fallback"] is None, gkt
    assert all(c["draft"] and c["finish"] in ("length", "stop") for c in calls), calls
    assert any(c["draft_student_tokens"] > 1 for c in calls), calls  # a one-token draft was written on


@pytest.mark.parametrize("lengths", LENGTHS, ids=["fixed", "one-token", "auto"])
def test_verify_answers_as_the_teacher_would_with_the_teacher_writing_only_corrections(
        edge_smol: Service, cloud: Service, lengths: dict) -> None:
    body = {"messages": COUNT, "max_tokens": 64, "temperature": 0}
    alone = httpx.post(edge_smol.url + "/v1/chat/completions", headers=CLIENT_AUTH, timeout=TIMEOUT,
                       json={**body, "mode": "teacher"})
    assert alone.status_code == 200, alone.text
    teacher_text = alone.json()["choices"][0]["message"]["content"]

    before_usage = cloud_usage(cloud)
    before_calls = metric(edge_smol, "gkt_edge_guidance_calls_total", '{kind="verify"}')
    policy = {"name": "verify", **lengths, "max_wait_s": 600.0}
    deltas, gkt = stream_answer(edge_smol, {**body, "guidance_policy": policy})
    text = "".join(t for t, _ in deltas)
    calls, u = gkt["calls"], gkt["usage"]

    # The teacher's own greedy answer (the token budgets differ by tokenizer, so compare the common part) ...
    common = min(len(text), len(teacher_text)) - 8
    assert common > 50 and text[:common] == teacher_text[:common], (text, teacher_text)
    # ... built from student drafts and the teacher's corrections: both wrote, the student most of it (with
    # one-token drafts as much: each check keeps a student token, then the teacher writes one).
    assert {s for _, s in deltas} == {"student", "teacher"}
    assert all(c["kind"] == "verify" and c["draft"] for c in calls) and gkt["guidance_calls"] == len(calls) > 1
    assert u["teacher_tokens"] == sum(c["teacher_tokens"] for c in calls) <= len(calls)
    assert u["teacher_draft_tokens"] == sum(c["draft_teacher_tokens"] for c in calls)
    if lengths["draft_tokens"] == 1:
        assert u["student_tokens"] >= u["teacher_tokens"] > 0 and u["teacher_draft_tokens"] >= u["teacher_tokens"]
    else:
        assert u["student_tokens"] > u["teacher_tokens"] > 0 and u["teacher_draft_tokens"] > u["teacher_tokens"]
    assert u["student_discarded_tokens"] >= 0
    # Each draft as long as the policy says: fixed, or (auto) 8 until a check was timed, then the answer's own
    # best length within max_draft_tokens. Any length leaves the answer the teacher's.
    drafted = [c["draft_student_tokens"] for c in calls]
    assert gkt["policy"]["draft_tokens"] == lengths["draft_tokens"]
    # Never an empty draft, which the cloud refuses (a one-token draft written ahead held only the teacher's token
    # before ahead drafts got one token more): every check answered, none left the student alone.
    assert not gkt["partial"] and all(c["draft"] and c["finish"] in ("length", "stop") for c in calls), calls
    if lengths["draft_tokens"] != "auto":
        assert all(1 <= n <= lengths["draft_tokens"] for n in drafted), drafted
    else:  # counting: a student the teacher keeps, so the drafts grow past the first 8
        assert drafted[0] <= 8 and all(1 <= n <= 12 for n in drafted) and max(drafted) > 8, drafted
    # Each call's teacher text sits where it says, right after the part of the draft the teacher kept.
    for c in calls:
        assert text[c["offset"] - c["draft_accepted"]: c["offset"]] == c["draft"][: c["draft_accepted"]]
        assert text[c["offset"]: c["offset"] + len(c["text"])] == c["text"]
    assert "".join(t for t, s in deltas if s == "teacher") == "".join(c["text"] for c in calls)
    # Counted in the cloud's ledger (drafts as input) and in the edge's metrics.
    after_usage = cloud_usage(cloud)
    assert after_usage["requests"] - before_usage["requests"] == len(calls)
    assert after_usage["completion_tokens"] - before_usage["completion_tokens"] == u["teacher_tokens"]
    assert metric(edge_smol, "gkt_edge_guidance_calls_total", '{kind="verify"}') - before_calls == len(calls)
    assert gkt["cost"]["teacher"] > 0 and gkt["cost"]["teacher_only"] is not None


def test_verify_with_a_teacher_that_cannot_check_drafts_still_answers(edge_upstream: Service) -> None:
    """An upstream that cannot verify drafts (llama_cpp.server: no /tokenize, no prompt_logprobs) makes the
    cloud answer 400: the student answers alone, and says why (R4)."""
    r = httpx.post(edge_upstream.url + "/v1/chat/completions", headers=CLIENT_AUTH, timeout=TIMEOUT, json={
        "messages": COUNT, "max_tokens": 16, "guidance_policy": {"name": "verify", "draft_tokens": 4}})
    assert r.status_code == 200, r.text
    body = r.json()
    gkt = body["gkt"]
    assert body["choices"][0]["message"]["content"]
    assert gkt["fallback"] == "invalid_request" and "draft" in gkt["cloud_error"]
    assert [c["kind"] for c in gkt["calls"]] == ["verify"] and gkt["usage"]["teacher_tokens"] == 0
    assert gkt["usage"]["student_tokens"] > 0


@pytest.mark.parametrize("draft", ["", "x" * 8193, "a\x00b"])
def test_bad_drafts_get_a_400(cloud: Service, draft: str) -> None:
    r = httpx.post(cloud.url + "/v1/guidance", headers=AUTH, timeout=TIMEOUT,
                   json={"prompt": PROMPT, "draft": draft, "stream": False})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "draft"


def test_a_cloud_lost_mid_answer_leaves_the_student_to_finish(logs: Path) -> None:
    """R5 under verify: the cloud dies (SIGKILL) after the first checked draft reached the user; the next
    check fails, the student finishes the answer alone from the text so far, marked partial; nothing is lost."""
    env = {**ONE_THREAD, **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS, "GKT_CLOUD_MODEL": "smollm2-135m-instruct",
           "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_CTX": "1024", "GKT_EDGE_N_CTX": "1024"}
    with running_pair(logs / "verify-lost", env) as (cloud, edge):
        deltas, gkt = [], None
        body = {"messages": COUNT, "max_tokens": 60, "stream": True,
                "guidance_policy": {"name": "verify", "draft_tokens": 4, "max_wait_s": 600}}
        with httpx.stream("POST", edge.url + "/v1/chat/completions", json=body, headers=CLIENT_AUTH,
                          timeout=TIMEOUT) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        deltas.append(choice["delta"]["content"])
                        if cloud.proc is not None and cloud.proc.poll() is None:
                            cloud.proc.kill()  # the first checked text is out: the cloud goes away
                    if choice.get("finish_reason"):
                        gkt = chunk["gkt"]
        assert gkt is not None
        calls = gkt["calls"]
        assert gkt["partial"] and gkt["fallback"] is None and gkt["partial_reason"] == calls[-1]["finish"]
        assert calls[0]["finish"] in ("length", "stop") and calls[-1]["finish"] not in ("length", "stop")
        text = "".join(deltas)
        # The student went on past what the teacher had checked: the answer is complete, not cut off.
        checked = max(c["offset"] + len(c["text"]) for c in calls if c["finish"] in ("length", "stop"))
        assert len(text) > checked and gkt["usage"]["student_tokens"] > 0
