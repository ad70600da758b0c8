"""The prompt each side reads for a `task` request (GKT_EDGE_TASK_PROMPT, GKT_EDGE_TEACHER_TASK_PROMPT): a student
with an adapter trained on the one-line zero-shot prompt answers from it, while the teacher keeps its exemplars
(docs/DISTILL.md). Real cloud and edge, SmolLM2 on both sides; the prompts are told apart by their token counts
(the 8-shot GSM8K prompt is about 750 tokens, the zero-shot one about 30 plus the question)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS, pair_fixture

pytestmark = pytest.mark.models

ENV = {
    "GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "2048",
    "GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "2048",
    "GKT_EDGE_TASK_PROMPT": "zero_shot", **CLOUD_KEYS, **EDGE_AUTH, **EDGE_KEYS,
}
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"

pair = pair_fixture(ENV)


def ask(edge: str, mode: str) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": QUESTION}], "task": "gsm8k", "mode": mode,
            "max_tokens": 6, "guidance_tokens": 3, "temperature": 0}
    r = httpx.post(edge + "/v1/chat/completions", json=body, headers=CLIENT_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["gkt"]["usage"]


def test_student_reads_the_zero_shot_prompt_and_the_teacher_its_exemplars(pair: Any) -> None:
    usage = ask(pair[1].url, "gkt")
    assert 30 < usage["student_prompt_tokens"] < 120, usage
    assert usage["teacher_prompt_tokens"] > 500, usage  # the 8-shot prompt, the teacher's default


def test_student_mode_reads_the_zero_shot_prompt(pair: Any) -> None:
    usage = ask(pair[1].url, "student")
    assert 30 < usage["student_prompt_tokens"] < 120, usage
    assert usage["teacher_prompt_tokens"] == 0, usage
