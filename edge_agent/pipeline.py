"""One request = one plan, run as a stream of deltas that say who wrote them, then a summary.

gkt mode: the cloud streams the teacher's first k tokens, finishing the last word; the seam releases them as
they arrive (the user sees them at once); the student's own prompt plus the released guidance becomes the start of
the student's answer, and the student finishes it with the user's settings. If the cloud cannot be reached
or refuses, the student answers alone (``fallback``); if the guidance stream breaks, the student continues
from what arrived (``partial``). Either way the answer is not lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from time import perf_counter
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from edge_agent.cloud import CloudClient
from edge_agent.fastpath import Prefetcher
from edge_agent.protocol import ChatCompletionRequest, CompletionRequest, Mode
from edge_agent.seam import GuidanceSeam
from edge_agent.settings import EdgeSettings
from shared.cost import AnswerCost, StudentRates, TeacherCost, answer_cost
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, GenerationResult, Piece
from shared.llama import LlamaEngine
from shared.protocol import ChatMessage, DoneFrame, GuidanceRequest, Timings, TokenFrame
from shared.tasks import TASKS, Task

log = logging.getLogger("gkt.edge")

Source = Literal["teacher", "student"]


class GKTUsage(BaseModel):
    """Token counts on both sides (each in its own model's tokenizer)."""

    teacher_prompt_tokens: int = 0
    teacher_tokens: int = 0
    student_prompt_tokens: int = 0
    guidance_student_tokens: int = 0
    student_tokens: int = 0
    student_cached_tokens: int = 0  # of prompt + guidance, already in the KV cache when the student started


class GKTTimings(BaseModel):
    """Seconds. ``cloud_ttft_s``, ``guidance_last_token_s`` and ``guidance_s`` are measured at the edge from
    the moment the guidance request was sent; ``ttft_s`` and ``total_s`` from the start of the answer;
    ``handoff_gap_s`` from the last guidance token to the student's first token."""

    ttft_s: float | None = None
    cloud_ttft_s: float | None = None
    guidance_last_token_s: float | None = None
    guidance_s: float | None = None
    handoff_gap_s: float | None = None
    student_queue_s: float | None = None
    student_prompt_s: float | None = None
    student_generation_s: float | None = None
    total_s: float = 0.0
    teacher: Timings | None = None


class GKTInfo(BaseModel):
    """The ``gkt`` extension object on every edge response."""

    mode: Mode
    guidance_tokens: int | None = None
    guidance: str = ""
    guidance_complete: bool = False
    partial: bool = False
    partial_reason: str | None = None
    fallback: str | None = None
    cloud_error: str | None = None
    teacher_model: str | None = None
    student_model: str
    task: str | None = None
    answer: str | None = None
    usage: GKTUsage = Field(default_factory=GKTUsage)
    timings: GKTTimings = Field(default_factory=GKTTimings)
    guidance_cached: bool = False
    cost: AnswerCost = Field(default_factory=AnswerCost)


@dataclass
class Delta:
    """Answer text and who wrote it."""

    text: str
    source: Source


@dataclass
class Summary:
    """The end of an answer."""

    finish_reason: Literal["stop", "length"]
    info: GKTInfo
    prompt_tokens: int
    completion_tokens: int


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


class Pipeline:
    """Plans and runs edge requests against the student engine and the cloud."""

    def __init__(self, student: LlamaEngine, cloud: CloudClient, settings: EdgeSettings) -> None:
        self.student = student
        self.cloud = cloud
        self.settings = settings

    # --- planning --------------------------------------------------------------------------------------

    def plan(self, req: ChatCompletionRequest | CompletionRequest) -> Plan:
        mode: Mode = req.mode or self.settings.default_mode
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
        if task is not None:
            question = raw if raw is not None else next(m.content for m in reversed(messages or []) if m.role == "user")
            raw, messages = task.build_prompt(question), None
            stop += [s for s in task.stop if s not in stop]
        special = messages is not None
        prefix = self.student.render_chat([m.model_dump() for m in messages]) if messages else (raw or "")
        tokens = self.student.tokenize(prefix, special=special)
        requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
        # Without an explicit max_tokens the answer gets the default, clamped to the room left (at least 1).
        max_tokens = requested or max(1, min(self.settings.default_max_tokens, self.student.n_ctx - len(tokens)))
        if mode != "teacher":
            self.student.check_fits(len(tokens), max_tokens, param)
        if mode != "teacher" and self.student.busy and self.student.waiting >= self.student.max_waiting:
            raise GKTError(ErrorCode.overloaded, "the student is busy; try again shortly", retry_after=1.0)
        k = max_tokens if mode == "teacher" else min(req.guidance_tokens or self.settings.default_guidance_tokens,
                                                      max_tokens)
        guidance = None
        if mode != "student":
            try:
                guidance = GuidanceRequest(
                    messages=messages, prompt=raw, max_tokens=k, temperature=req.temperature, top_p=req.top_p,
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
            seed=req.seed, stop=stop, task=task, guidance=guidance,
        )

    # --- running ---------------------------------------------------------------------------------------

    async def run(self, plan: Plan) -> AsyncIterator[Delta | Summary]:
        t0 = perf_counter()
        info = GKTInfo(mode=plan.mode, student_model=self.student.name, task=plan.task.name if plan.task else None)
        info.usage.student_prompt_tokens = len(plan.student_tokens)
        # The fast path: the student prefills its prompt, then the guidance, while the guidance streams.
        prefetch = None
        if plan.mode == "gkt" and self.settings.fast_path:
            prefetch = Prefetcher(self.student, plan.student_prefix, plan.special)
            prefetch.start(plan.student_tokens)
        try:
            async with aclosing(self._run(plan, info, t0, prefetch)) as events:
                async for event in events:
                    yield event
        finally:
            if prefetch is not None:
                await prefetch.close()

    async def _run(
        self, plan: Plan, info: GKTInfo, t0: float, prefetch: Prefetcher | None
    ) -> AsyncIterator[Delta | Summary]:
        parts: list[str] = []
        finish: Literal["stop", "length"] | None = None
        t_last_guidance: float | None = None

        def first_token() -> None:
            if info.timings.ttft_s is None:
                info.timings.ttft_s = perf_counter() - t0

        teacher_cost: TeacherCost | None = None

        if plan.mode in ("gkt", "teacher"):
            info.guidance_tokens = plan.k
            done: DoneFrame | None = None
            seam = GuidanceSeam() if plan.mode == "gkt" else None
            async with aclosing(self._guidance(plan, info)) as guidance:
                async for item in guidance:
                    if isinstance(item, DoneFrame):
                        done = item
                        teacher_cost = item.cost
                        continue
                    t_last_guidance = perf_counter()
                    out = seam.feed(item) if seam else item
                    if out:
                        first_token()
                        parts.append(out)
                        if prefetch is not None:
                            prefetch.guidance(seam.kept)  # type: ignore[union-attr]
                        yield Delta(out, "teacher")
            complete = done is not None and done.finish_reason == "stop"
            if seam is not None:
                if tail := seam.finish(complete):
                    first_token()
                    parts.append(tail)
                    yield Delta(tail, "teacher")
                info.guidance = seam.kept
            else:
                info.guidance = "".join(parts)
            info.guidance_complete = complete
            if complete or plan.mode == "teacher":
                finish = "stop" if complete else "length"

        completion_tokens = info.usage.teacher_tokens
        if finish is None:
            tokens = self.student.tokenize(plan.student_prefix + info.guidance, special=plan.special)
            info.usage.guidance_student_tokens = max(0, len(tokens) - len(plan.student_tokens))
            remaining = plan.max_tokens - info.usage.guidance_student_tokens
            finish = "length"
            if prefetch is not None:
                await prefetch.close()  # the handoff: the student's own generation takes the context
            if remaining > 0:
                params = GenerationParams(max_tokens=remaining, temperature=plan.temperature, top_p=plan.top_p,
                                          seed=plan.seed, stop=plan.stop)
                async with aclosing(self.student.stream(tokens, params)) as gen:
                    async for piece in gen:
                        if isinstance(piece, Piece):
                            if info.timings.handoff_gap_s is None and t_last_guidance is not None:
                                info.timings.handoff_gap_s = perf_counter() - t_last_guidance
                            first_token()
                            parts.append(piece.text)
                            yield Delta(piece.text, "student")
                        else:
                            self._student_done(piece, info)
                            finish = "stop" if piece.finish_reason == "stop" else "length"
            completion_tokens = info.usage.guidance_student_tokens + info.usage.student_tokens

        info.timings.total_s = perf_counter() - t0
        info.cost = self._cost(info, teacher_cost, wrote_all=plan.mode == "teacher" or info.guidance_complete)
        if plan.task is not None:
            info.answer = plan.task.extract("".join(parts))
        prompt_tokens = info.usage.teacher_prompt_tokens if plan.mode == "teacher" else len(plan.student_tokens)
        yield Summary(finish, info, prompt_tokens, completion_tokens)

    async def _guidance(self, plan: Plan, info: GKTInfo) -> AsyncIterator[str | DoneFrame]:
        """Guidance text as it arrives, then the done frame; cloud trouble ends it early (gkt) or raises."""
        assert plan.guidance is not None  # planned for every mode that asks the cloud
        request = plan.guidance
        t0 = perf_counter()
        got_text = False
        try:
            deadline = time.monotonic() + self.settings.guidance_timeout_s
            async with aclosing(self.cloud.guidance(request, deadline)) as frames:
                async for frame in frames:
                    if isinstance(frame, TokenFrame):
                        if info.timings.cloud_ttft_s is None:
                            info.timings.cloud_ttft_s = perf_counter() - t0
                        info.usage.teacher_tokens += frame.tokens
                        info.timings.guidance_last_token_s = perf_counter() - t0
                        got_text = True
                        yield frame.text
                    elif isinstance(frame, DoneFrame):
                        info.teacher_model = frame.model
                        info.usage.teacher_prompt_tokens = frame.usage.prompt_tokens
                        info.usage.teacher_tokens = frame.usage.completion_tokens
                        info.timings.teacher = frame.timings
                        info.guidance_cached = frame.cached
                        yield frame
        except GKTError as err:
            if plan.mode == "teacher":
                raise
            # gkt mode never loses the answer: the student goes on from whatever guidance arrived.
            info.cloud_error = err.message
            if got_text:
                info.partial = True
                info.partial_reason = err.code.name
                log.warning("guidance broke off (%s): the student continues from the partial guidance",
                            err.code.name)
            else:
                info.fallback = err.code.name
                log.warning("no guidance (%s): the student answers alone", err.code.name)
        finally:
            info.timings.guidance_s = perf_counter() - t0

    def _cost(self, info: GKTInfo, teacher: TeacherCost | None, *, wrote_all: bool) -> AnswerCost:
        """This answer's cost on both sides and had the teacher written all of it (see shared/cost.py)."""
        u, t = info.usage, info.timings
        rates = StudentRates(per_mtok=self.settings.price_student_per_mtok,
                             cpu_per_hour=self.settings.price_cpu_per_hour)
        # Core-seconds: the student's engine time times the threads it computes with.
        cpu_s = ((t.student_prompt_s or 0.0) + (t.student_generation_s or 0.0)) * self.settings.n_threads
        ran = u.student_tokens > 0 or t.student_generation_s is not None
        return answer_cost(
            student=rates,
            student_tokens=(u.student_prompt_tokens + u.guidance_student_tokens + u.student_tokens) if ran else 0,
            student_cpu_s=cpu_s, teacher=teacher, teacher_prompt_tokens=u.teacher_prompt_tokens,
            guidance_teacher_tokens=u.teacher_tokens, guidance_student_tokens=u.guidance_student_tokens,
            answer_student_tokens=u.guidance_student_tokens + u.student_tokens, teacher_wrote_all=wrote_all,
        )

    @staticmethod
    def _student_done(result: GenerationResult, info: GKTInfo) -> None:
        info.usage.student_tokens = result.completion_tokens
        info.usage.student_cached_tokens = result.cached_prompt_tokens
        info.timings.student_queue_s = result.queue_s
        info.timings.student_prompt_s = result.prompt_s
        info.timings.student_generation_s = result.generation_s
