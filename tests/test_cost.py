"""The cost ledger's arithmetic, and each answer's cost end to end (streamed and whole) on the real models."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from gkt.launcher import Service
from shared.cost import StudentRates, TeacherRates, answer_cost, teacher_cost
from shared.upstream import cached_tokens
from tests.conftest import AUTH, CLIENT_AUTH, CLIENT_KEY

TIMEOUT = httpx.Timeout(10.0, read=600.0)
RATES = TeacherRates(input_per_mtok=1.0, output_per_mtok=4.0, accelerator_per_hour=3.6)


def test_teacher_cost_arithmetic() -> None:
    c = teacher_cost(RATES, prompt_tokens=1_000, completion_tokens=500, engine_s=2.0)
    # 1000 * 1/1e6 + 500 * 4/1e6 + 2 s * 3.6/3600 = 0.001 + 0.002 + 0.002
    assert c.amount == pytest.approx(0.005)
    assert (c.input_tokens, c.output_tokens, c.accelerator_s) == (1_000, 500, 2.0)
    assert teacher_cost(TeacherRates(), 0, 0, 0.0).amount == 0


def test_answer_cost_and_saving() -> None:
    guidance = teacher_cost(RATES, prompt_tokens=1_000, completion_tokens=40, engine_s=1.0)
    cost = answer_cost(
        student=StudentRates(per_mtok=0.5, cpu_per_hour=36.0), student_tokens=1_200, student_cpu_s=0.5,
        teacher=guidance, teacher_prompt_tokens=1_000, guidance_teacher_tokens=40, guidance_student_tokens=50,
        answer_student_tokens=150,
    )
    student = 1_200 * 0.5 / 1e6 + 0.5 * 36.0 / 3600  # 0.0006 + 0.005
    # The whole answer is 150 student tokens = 120 teacher tokens at the guidance's ratio 40/50;
    # engine time scales from 1 s for 40 tokens to 3 s for 120.
    only = 1_000 * 1.0 / 1e6 + 120 * 4.0 / 1e6 + 3.0 * 3.6 / 3600
    assert cost.student == pytest.approx(student)
    assert cost.teacher == pytest.approx(guidance.amount) == pytest.approx(0.001 + 0.00016 + 0.001)
    assert cost.total == pytest.approx(guidance.amount + student)
    assert cost.teacher_only == pytest.approx(only)
    assert cost.saved == pytest.approx(only - cost.total)
    assert cost.saved_fraction == pytest.approx((only - cost.total) / only)


def test_cached_input_is_billed_at_the_cached_price() -> None:
    """#22: prompt tokens found in the teacher's KV cache cost the cached-input price, the rest the input price;
    the default cached price is a tenth of the default input price."""
    assert TeacherRates().cached_input_per_mtok == pytest.approx(TeacherRates().input_per_mtok / 10)
    rates = TeacherRates(input_per_mtok=1.0, cached_input_per_mtok=0.1, output_per_mtok=4.0)
    c = teacher_cost(rates, prompt_tokens=1_000, completion_tokens=500, engine_s=0.0, cached_tokens=900)
    # 100 computed * 1/1e6 + 900 cached * 0.1/1e6 + 500 * 4/1e6
    assert c.amount == pytest.approx(0.0001 + 0.00009 + 0.002)
    assert (c.input_tokens, c.cached_input_tokens) == (1_000, 900)
    cold = teacher_cost(rates, prompt_tokens=1_000, completion_tokens=500, engine_s=0.0)
    assert cold.amount - c.amount == pytest.approx(900 * 0.9 / 1e6)
    # More cached than read (a miscount upstream) bills at most every input token as cached, never below 0.
    assert teacher_cost(rates, 100, 0, 0.0, cached_tokens=500).cached_input_tokens == 100
    assert teacher_cost(rates, 100, 0, 0.0, cached_tokens=-5).amount == pytest.approx(100 / 1e6)
    # At a cached price equal to the input price, caching changes nothing.
    flat = TeacherRates(input_per_mtok=1.0, cached_input_per_mtok=1.0)
    assert teacher_cost(flat, 1_000, 0, 0.0, 900).amount == pytest.approx(teacher_cost(flat, 1_000, 0, 0.0).amount)


def test_cached_tokens_are_read_from_an_openai_usage_where_reported() -> None:
    """vLLM (``--enable-prompt-tokens-details``) and OpenAI report ``prompt_tokens_details.cached_tokens``;
    an upstream that says nothing, or nonsense, has none cached (billed at the full input price)."""
    assert cached_tokens({"prompt_tokens": 120, "prompt_tokens_details": {"cached_tokens": 96}}) == 96
    for usage in ({}, {"prompt_tokens": 5}, {"prompt_tokens_details": None}, {"prompt_tokens_details": {}},
                  {"prompt_tokens_details": {"cached_tokens": None}}, {"prompt_tokens_details": {"cached_tokens": "x"}},
                  {"prompt_tokens_details": {"cached_tokens": -3}}):
        assert cached_tokens(usage) == 0, usage


def test_counterfactual_finds_cached_what_the_first_call_found() -> None:
    """The teacher-only counterfactual reads the same prompt against the same cache: its cached part is the
    first guidance call's, so caching does not inflate the saving."""
    rates = TeacherRates(input_per_mtok=1.0, cached_input_per_mtok=0.1, output_per_mtok=4.0)
    first = teacher_cost(rates, 1_000, 40, 0.0, cached_tokens=800)
    kw = dict(student=StudentRates(), student_tokens=0, student_cpu_s=0.0, teacher=first, teacher_prompt_tokens=1_000,
              guidance_teacher_tokens=40, guidance_student_tokens=40, answer_student_tokens=100)
    cost = answer_cost(**kw, teacher_cached_prompt_tokens=800)  # type: ignore[arg-type]
    assert cost.teacher_only == pytest.approx((200 * 1.0 + 800 * 0.1 + 100 * 4.0) / 1e6)
    assert answer_cost(**kw).teacher_only == pytest.approx((1_000 + 400) / 1e6)  # type: ignore[arg-type]


def test_answer_cost_edge_cases() -> None:
    alone = answer_cost(student=StudentRates(cpu_per_hour=3.6), student_tokens=10, student_cpu_s=1.0, teacher=None,
                        teacher_prompt_tokens=0, guidance_teacher_tokens=0, guidance_student_tokens=0,
                        answer_student_tokens=10)
    assert alone.total == pytest.approx(0.001) and alone.teacher_only is None and alone.saved is None
    t = teacher_cost(RATES, 100, 30, 0.5)
    wrote_all = answer_cost(student=StudentRates(), student_tokens=0, student_cpu_s=0.0, teacher=t,
                            teacher_prompt_tokens=100, guidance_teacher_tokens=30, guidance_student_tokens=0,
                            answer_student_tokens=0, teacher_wrote_all=True)
    assert wrote_all.teacher_only == pytest.approx(t.amount) and wrote_all.saved == pytest.approx(0)


def _check(gkt: dict, cloud_usage: dict) -> None:
    u, c = gkt["usage"], gkt["cost"]
    assert c["teacher"] > 0 and c["student"] > 0
    assert c["total"] == pytest.approx(c["teacher"] + c["student"])
    assert c["saved"] == pytest.approx(c["teacher_only"] - c["total"])
    # The teacher's side is what the cloud's ledger charged this key for the guidance.
    assert cloud_usage["completion_tokens"] == u["teacher_tokens"]
    assert cloud_usage["cost"] == pytest.approx(c["teacher"])
    assert cloud_usage["cached_tokens"] == u["teacher_cached_tokens"]  # #22: the same count on both sides


def usage(cloud: Service) -> dict:
    return httpx.get(cloud.url + "/v1/usage", headers=AUTH, timeout=TIMEOUT).json()


def diff(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("completion_tokens", "cost", "cached_tokens")}


def test_each_answer_states_its_cost_and_saving(edge: Service, cloud: Service) -> None:
    # Sampled (never a cache hit), and long enough that the teacher's 12 tokens cannot be the whole answer: a
    # two-sentence request once ended inside the guidance ("The sky is blue because of the reflection of
    # sunlight."), and with no student work there is no student cost to check.
    body = {"messages": [{"role": "user", "content": "Write a paragraph of at least six sentences on why the "
                                                     "sky is blue."}],
            "guidance_tokens": 12, "max_tokens": 60, "temperature": 0.7}
    before = usage(cloud)
    r = httpx.post(edge.url + "/v1/chat/completions", json=body, headers=CLIENT_AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    _check(r.json()["gkt"], diff(usage(cloud), before))

    # Streamed: the final chunk carries the same accounting, and the ledger agrees.
    before = usage(cloud)
    client = OpenAI(base_url=edge.url + "/v1", api_key=CLIENT_KEY, timeout=600)
    final = None
    for chunk in client.chat.completions.create(model="gkt", stream=True, **{k: v for k, v in body.items()
                                                if k in ("messages", "max_tokens", "temperature")},
                                                extra_body={"guidance_tokens": 12}):
        if chunk.choices and chunk.choices[0].finish_reason:
            final = chunk.model_extra["gkt"]
    assert final is not None
    _check(final, diff(usage(cloud), before))
    # The same prompt again: the teacher found it in its KV cache (all but the last token) and billed it so.
    assert final["usage"]["teacher_cached_tokens"] > 0
    assert final["cost"]["teacher_only"] > final["cost"]["teacher"]
