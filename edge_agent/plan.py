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
from edge_agent.policies import FixedPolicy, Policy, VerifyPolicy, first_stop
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
    grammar: str | None = None  # the response format's grammar: the whole answer is one such document
    logprobs: int | None = None  # log-probabilities with this many alternatives per token (None: none)
    echo: bool = False  # the prompt comes first in the answer (completions), scored when ``logprobs`` is set
    ignore_eos: bool = False  # student mode: the student writes to max_tokens (vLLM's extension)


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
    # Without an explicit max_tokens the answer gets the default, clamped to the room left (at least 1). 0 (only
    # with echo, protocol.py) is the prompt alone: nothing is generated and the cloud is not asked.
    if requested is None:
        requested = max(1, min(settings.default_max_tokens, student.n_ctx - len(tokens)))
    max_tokens = requested
    if mode != "teacher":
        student.check_fits(len(tokens), max_tokens, param)
    if mode != "teacher" and student.busy and student.waiting >= student.max_waiting:
        raise GKTError(ErrorCode.overloaded, "the student is busy; try again shortly", retry_after=1.0)
    policy = req.guidance_policy or FixedPolicy()
    top, echo = _logprobs(req), bool(getattr(req, "echo", False))
    if req.ignore_eos and mode != "student":
        raise GKTError(ErrorCode.invalid_request, "ignore_eos is available in student mode only: the teacher's "
                       "end of answer does not reach the edge as such", param="ignore_eos")
    if mode == "teacher" and echo:  # echo scores the prompt with the student
        raise GKTError(ErrorCode.invalid_request, "echo is not available in teacher mode: the teacher's prompt "
                       "log-probabilities do not reach the edge (student and gkt modes have the student's)",
                       param="echo")
    fmt = req.response_format if req.response_format is not None and req.response_format.grammar else None
    if fmt is not None and mode == "gkt" and isinstance(policy, VerifyPolicy):
        raise GKTError(ErrorCode.invalid_request, "response_format is not available under the verify policy yet "
                       "(the teacher cannot check a draft under a grammar); fixed, adaptive and reguide have it",
                       param="response_format")
    if max_tokens == 0:
        mode = "student"  # the echoed prompt alone: the student scores it, nobody writes
    k = max_tokens if mode == "teacher" else min(req.guidance_tokens or settings.default_guidance_tokens, max_tokens)
    if mode == "gkt" and (stopper := first_stop(policy)) is not None:
        k = min(stopper.request_tokens(), max_tokens)
    guidance = None
    if mode != "student":
        try:
            guidance = GuidanceRequest(
                messages=messages, prompt=teacher_raw, max_tokens=k, temperature=req.temperature, top_p=req.top_p,
                seed=req.seed, stop=stop, stream=True, whole_words=mode == "gkt", response_format=fmt,
                top_logprobs=top if mode == "teacher" else None,
            )
        except ValidationError as exc:  # e.g. a teacher-mode answer longer than the wire protocol allows
            first = exc.errors()[0]
            field_name = "max_tokens" if first["loc"][:1] == ("max_tokens",) else param
            raise GKTError(ErrorCode.invalid_request, f"{field_name}: {first['msg']} (guidance request)",
                           param=field_name) from exc
    return Plan(
        mode=mode, messages=messages, raw_prompt=raw, student_prefix=prefix, student_tokens=tokens,
        special=special, max_tokens=max_tokens, k=k, temperature=req.temperature, top_p=req.top_p,
        seed=req.seed, stop=stop, task=task, guidance=guidance, policy=policy, grammar=fmt.grammar if fmt else None,
        logprobs=top, echo=echo, ignore_eos=req.ignore_eos,
    )


def _logprobs(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """Alternatives per token the request asks for with its log-probabilities; None when it asks for none."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs
