"""Planning: everything about a request decided before any work starts.

The route calls ``make_plan`` first, so every refusal that depends only on the request (a prompt that does not
fit, a busy student, a guidance request the wire protocol would reject) is an HTTP 4xx/503 before a byte of
the answer exists. The plan says who answers (mode), with which prompt, how long (``max_tokens``, k), how the
user samples, and under which guidance policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from edge_agent.answer import Mode
from edge_agent.policies import FixedPolicy, Policy, first_stop
from edge_agent.protocol import ChatCompletionRequest, CompletionRequest
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine
from shared.errors import ErrorCode, GKTError
from shared.protocol import ChatMessage, GuidanceRequest
from shared.tasks import TASKS, Task


@dataclass
class Plan:
    """Everything decided before any work starts (validation errors surface here, as HTTP 4xx)."""

    mode: Mode
    messages: list[ChatMessage] | None
    raw_prompt: str | None
    student_prefix: str
    student_tokens: list[int]
    special: bool
    max_tokens: int
    k: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    task: Task | None = None
    guidance: GuidanceRequest | None = None  # what the cloud will be asked (gkt and teacher modes)
    policy: Policy = field(default_factory=FixedPolicy)  # how much of the teacher a gkt answer gets


def make_plan(req: ChatCompletionRequest | CompletionRequest, student: LlamaEngine, settings: EdgeSettings) -> Plan:
    """The plan for ``req``; raises ``GKTError`` for anything the request asks that cannot be done."""
    mode: Mode = req.mode or settings.default_mode
    task = TASKS[req.task] if req.task else None
    messages: list[ChatMessage] | None = None
    raw: str | None = None
    if isinstance(req, ChatCompletionRequest):
        messages = req.chat_messages()
        if messages[-1].role == "assistant":
            raise GKTError(ErrorCode.invalid_request, "the last message must not be from the assistant",
                           param="messages")
        param = "messages"
    else:
        raw = req.prompt
        param = "prompt"
    stop = list(req.stop)
    teacher_raw = raw
    if task is not None:
        question = raw if raw is not None else next(m.content for m in reversed(messages or []) if m.role == "user")
        raw, messages = task.build_prompt(question, settings.task_prompt), None
        teacher_raw = task.build_prompt(question, settings.teacher_task_prompt)
        stop += [s for s in task.stop if s not in stop]
    special = messages is not None
    prefix = student.render_chat([m.model_dump() for m in messages]) if messages else (raw or "")
    tokens = student.tokenize(prefix, special=special)
    requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
    # Without an explicit max_tokens the answer gets the default, clamped to the room left (at least 1).
    max_tokens = requested or max(1, min(settings.default_max_tokens, student.n_ctx - len(tokens)))
    if mode != "teacher":
        student.check_fits(len(tokens), max_tokens, param)
    if mode != "teacher" and student.busy and student.waiting >= student.max_waiting:
        raise GKTError(ErrorCode.overloaded, "the student is busy; try again shortly", retry_after=1.0)
    policy = req.guidance_policy or FixedPolicy()
    k = max_tokens if mode == "teacher" else min(req.guidance_tokens or settings.default_guidance_tokens, max_tokens)
    if mode == "gkt" and (stopper := first_stop(policy)) is not None:
        k = min(stopper.request_tokens(), max_tokens)
    guidance = None
    if mode != "student":
        try:
            guidance = GuidanceRequest(
                messages=messages, prompt=teacher_raw, max_tokens=k, temperature=req.temperature, top_p=req.top_p,
                seed=req.seed, stop=stop, stream=True, whole_words=mode == "gkt",
            )
        except ValidationError as exc:  # e.g. a teacher-mode answer longer than the wire protocol allows
            first = exc.errors()[0]
            field_name = "max_tokens" if first["loc"][:1] == ("max_tokens",) else param
            raise GKTError(ErrorCode.invalid_request, f"{field_name}: {first['msg']} (guidance request)",
                           param=field_name) from exc
    return Plan(
        mode=mode, messages=messages, raw_prompt=raw, student_prefix=prefix, student_tokens=tokens,
        special=special, max_tokens=max_tokens, k=k, temperature=req.temperature, top_p=req.top_p,
        seed=req.seed, stop=stop, task=task, guidance=guidance, policy=policy,
    )
