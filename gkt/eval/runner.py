"""Ask the live edge API every (question, config) pair that the result store does not hold yet.

Configs are the outer loop: each runs over the whole sample before the next starts. Asking one question in
every mode back to back would let the second and later modes find that question already in llama.cpp's
prompt cache and look faster than they are; one config at a time, every request meets a cache holding the
shared few-shot prefix but not its own question, as in deployment. A cut-short run leaves later configs on
fewer questions; the tables compare rows only on the questions both answered. Wall time is measured here,
around the whole HTTP request, as a user would see it; the edge's own timings (queue waits included) are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from gkt.eval.progress import Progress
from gkt.eval.records import ResultStore, RunConfig, model_label, policy_body
from shared.tasks import TASKS, Example


class EvalError(RuntimeError):
    """The evaluation cannot go on (the edge refused a request, or serves other models than asked)."""


class EdgeClient:
    """Non-streaming ``/v1/completions`` calls with the task, mode and k extension fields."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, retries: int = 5, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers)
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def ask(self, question: str, config: RunConfig) -> tuple[dict[str, Any], float]:
        body: dict[str, Any] = {"prompt": question, "task": config.task, "mode": config.mode,
                                "max_tokens": config.max_tokens, "temperature": 0.0, "seed": 0}
        if config.mode == "gkt" and config.k is not None:
            body["guidance_tokens"] = config.k
        if config.mode == "gkt" and config.policy:
            body["guidance_policy"] = policy_body(config.policy)
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            resp = self.http.post(f"{self.base_url}/v1/completions", json=body)
            wall = time.perf_counter() - t0
            if resp.status_code == 200:
                return resp.json(), wall
            # Busy (503) or a gateway hiccup: wait as told and ask again; anything else is a real error.
            if resp.status_code in (502, 503, 504) and attempt < self.retries:
                time.sleep(float(resp.headers.get("retry-after", 1.0)) * (attempt + 1))
                continue
            raise EvalError(f"edge answered {resp.status_code} for {config.label}: {resp.text[:300]}")
        raise AssertionError("unreachable")


def warm_up(client: EdgeClient, config: RunConfig) -> None:
    """One unrecorded gkt request (an exemplar question, k=1) so both engines hold the few-shot prefix.

    Without it the first recorded question pays for processing the whole few-shot prompt (tens of seconds
    on one thread), which a long-running service pays once, not per question.
    """
    task = TASKS[config.task]
    warm = RunConfig(config.task, "gkt", 1, 2, config.teacher, config.student)
    client.ask(task.shots[0][0], warm)


def check_models(config: RunConfig, info: dict[str, Any]) -> None:
    """Refuse to mix results: the edge must serve the pair the config names."""
    if info.get("student_model") != model_label(config.student):
        raise EvalError(f"the edge runs student {info.get('student_model')!r}, not {config.student!r}: "
                        "pass --student to match (results are keyed by the model pair)")
    if config.mode != "student" and info.get("teacher_model") not in (None, model_label(config.teacher)):
        raise EvalError(f"the cloud runs teacher {info.get('teacher_model')!r}, not {config.teacher!r}: "
                        "pass --teacher to match")


def make_record(example: Example, config: RunConfig, resp: dict[str, Any], wall: float, timing: str
                ) -> dict[str, Any]:
    task = TASKS[config.task]
    info = resp["gkt"]
    text = resp["choices"][0]["text"]
    answer = task.extract(text)
    guidance = info.get("guidance") or ""
    # Everything the teacher wrote into the answer (re-guidance adds segments after the first guidance).
    teacher_text = "".join(c.get("text", "") for c in info.get("calls") or []) or guidance
    stated = task.stated_answer(teacher_text) if config.mode == "gkt" else None
    return {
        "key": config.key, "qid": example.id, "config": config.as_dict(), "timing": timing,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "gold": example.gold, "answer": answer, "correct": answer == example.gold,
        "edge_answer": info.get("answer"), "text": text, "finish_reason": resp["choices"][0]["finish_reason"],
        "guidance": guidance if config.mode == "gkt" else "",
        "teacher_text": teacher_text if config.mode == "gkt" else "",
        "guidance_calls": info.get("guidance_calls", 1 if config.mode != "student" else 0),
        # Each call to the cloud as the edge reported it (kind, reason, offset, tokens, finish, cost): where
        # re-guidance fired and what each call cost, for analysing a policy after the run.
        "calls": info.get("calls") or [],
        "guidance_answer": stated, "guidance_answer_correct": stated is not None and stated == example.gold,
        "guidance_complete": info.get("guidance_complete", False), "fallback": info.get("fallback"),
        "partial": info.get("partial", False), "cloud_error": info.get("cloud_error"),
        "teacher_model": info.get("teacher_model"), "student_model": info.get("student_model"),
        "adapter": info.get("adapter"),  # the student's LoRA adapter (name, sha256, scale), None for the base
        "usage": info["usage"], "timings": info["timings"], "wall_s": wall,
    }


def run(examples: list[Example], configs: list[RunConfig], client: EdgeClient, store: ResultStore, timing: str,
        on_record: Callable[[dict[str, Any]], None] | None = None, progress: Progress | None = None) -> int:
    """Answer what is missing; returns how many new results were written."""
    todo = [(e, c) for c in configs for e in examples if not store.done(c, e.id)]
    total = len(examples) * len(configs)
    bar = progress or Progress(total, done=total - len(todo))
    written = 0
    checked: set[str] = set()
    if todo:
        warm_up(client, todo[0][1])
    for example, config in todo:
        resp, wall = client.ask(example.question, config)
        if config.mode not in checked:
            check_models(config, resp["gkt"])
            checked.add(config.mode)
        record = make_record(example, config, resp, wall, timing)
        store.append(record)
        written += 1
        bar.advance(f"{config.label}: {'right' if record['correct'] else 'wrong'} in {wall:.1f}s")
        if on_record:
            on_record(record)
    return written
