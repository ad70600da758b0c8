"""One request = one plan, run as a stream of deltas that say who wrote them, then a summary.

gkt mode: the cloud streams the teacher's first k tokens, finishing the last word; the seam releases them as
they arrive (the user sees them at once); the student's own prompt plus the released guidance becomes the start of
the student's answer, and the student finishes it with the user's settings. If the cloud cannot be reached
or refuses, the student answers alone (``fallback``); if the guidance stream breaks, the student continues
from what arrived (``partial``). Either way the answer is not lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from edge_agent.cloud import CloudClient
from edge_agent.fastpath import Prefetcher
from edge_agent.policies import (
    FirstStop,
    FixedPolicy,
    ReguidePolicy,
    Reguider,
    Trigger,
    VerifyPolicy,
    first_stop,
    kept_tokens,
)
from edge_agent.protocol import ChatCompletionRequest, CompletionRequest, Mode
from edge_agent.rollback import StudentRound
from edge_agent.seam import GuidanceSeam
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine
from shared.cost import AnswerCost, StudentRates, TeacherCost, answer_cost
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, GenerationResult, StopMatcher
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
    # Tokens the student generated and then gave back to the teacher (re-guidance takes back an unsure span);
    # ``student_tokens`` counts only those in the answer. Both cost student time.
    student_discarded_tokens: int = 0
    # The teacher's prompt tokens of a guidance call the edge ended early (adaptive) are not reported by the
    # cloud; they are counted with the student's tokenizer instead, and this says so.
    teacher_prompt_tokens_estimated: bool = False
    # Student drafts the teacher read to verify them (verify policy), in the teacher's tokens: input, not output.
    teacher_draft_tokens: int = 0


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
    reguide_s: float | None = None  # the student stopped until it went on, summed over re-guidance calls
    total_s: float = 0.0
    teacher: Timings | None = None


class GuidanceCall(BaseModel):
    """One guidance call of an answer: the first, or a re-guidance in the middle of the student's text."""

    kind: Literal["first", "reguide", "verify"]
    reason: str | None = None  # re-guidance: low_confidence or decision_point
    offset: int = 0  # where its text starts in the answer, in characters
    draft: str | None = None  # verify: the student's draft the teacher checked
    draft_accepted: int | None = None  # verify: characters of the draft the teacher kept (before ``offset``)
    draft_teacher_tokens: int = 0  # verify: the draft in the teacher's tokens (input it read)
    text: str = ""  # the guidance kept in the answer (cut at a safe boundary)
    max_tokens: int = 0  # teacher tokens asked for
    teacher_tokens: int = 0  # teacher tokens received
    prompt_tokens: int | None = None  # the teacher's prompt tokens (None: ended early, the cloud did not say)
    finish: str | None = None  # length, stop (teacher ended the answer), early (the edge ended it), or error code
    cloud_ttft_s: float | None = None
    s: float | None = None  # request sent to its end
    cost: TeacherCost | None = None  # as the cloud stated it in the done frame
    last_token_at: float | None = Field(None, exclude=True)  # perf_counter() of the last token (handoff gap)


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
    policy: dict[str, Any] | None = None  # the guidance policy with all its parameters (gkt mode)
    guidance_calls: int = 0  # calls to the cloud for this answer (first guidance and re-guidance)
    calls: list[GuidanceCall] = Field(default_factory=list)


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
    policy: Any = field(default_factory=FixedPolicy)  # gkt mode: FixedPolicy | AdaptivePolicy | ReguidePolicy


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
        policy = req.guidance_policy or FixedPolicy()
        k = max_tokens if mode == "teacher" else min(req.guidance_tokens or self.settings.default_guidance_tokens,
                                                      max_tokens)
        if mode == "gkt" and (stopper := first_stop(policy)) is not None:
            k = min(stopper.request_tokens(), max_tokens)
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
            seed=req.seed, stop=stop, task=task, guidance=guidance, policy=policy,
        )

    # --- running ---------------------------------------------------------------------------------------

    async def run(self, plan: Plan) -> AsyncIterator[Delta | Summary]:
        t0 = perf_counter()
        info = GKTInfo(mode=plan.mode, student_model=self.student.name, task=plan.task.name if plan.task else None)
        info.usage.student_prompt_tokens = len(plan.student_tokens)
        # The fast path: the student prefills its prompt, then the guidance, while the guidance streams.
        prefetch = None
        if plan.mode == "gkt" and self.settings.fast_path and not isinstance(plan.policy, VerifyPolicy):
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

        def first_token() -> None:
            if info.timings.ttft_s is None:
                info.timings.ttft_s = perf_counter() - t0

        if plan.mode == "gkt":
            info.policy = plan.policy.model_dump()
        first: GuidanceCall | None = None
        if plan.mode == "teacher":
            info.guidance_tokens = plan.k
            first = GuidanceCall(kind="first", max_tokens=plan.k)
            info.calls.append(first)
            async with aclosing(self._guidance(plan, plan.guidance, info, first)) as guidance:  # type: ignore[arg-type]
                async for item in guidance:
                    if isinstance(item, str):
                        first_token()
                        parts.append(item)
                        yield Delta(item, "teacher")
            first.text = info.guidance = "".join(parts)
            info.guidance_complete = first.finish == "stop"
            finish = "stop" if info.guidance_complete else "length"
        elif plan.mode == "gkt" and not isinstance(plan.policy, VerifyPolicy):
            info.guidance_tokens = plan.k
            first = GuidanceCall(kind="first", max_tokens=plan.k)
            info.calls.append(first)
            async with aclosing(self._guide(plan, info, first, "", prefetch, first_stop(plan.policy))) as texts:
                async for out in texts:
                    first_token()
                    parts.append(out)
                    yield Delta(out, "teacher")
            info.guidance = first.text
            info.guidance_complete = first.finish == "stop"
            if info.guidance_complete:
                finish = "stop"

        # The student, in rounds: under the reguide policy a round may end with a call for more guidance.
        reguider: Reguider | None = None
        if plan.mode == "gkt" and isinstance(plan.policy, ReguidePolicy):
            reguider = Reguider(plan.policy, first.teacher_tokens if first else 0)
            reguider.guided(0, first.cloud_ttft_s if first else None, reguide=False)
            if info.fallback or info.partial:
                reguider.stop()  # the cloud is in trouble: do not make this answer wait on it again
        answer = "".join(parts)
        student_ran = False
        generated = kept = 0
        if plan.mode == "gkt" and isinstance(plan.policy, VerifyPolicy):
            drafting = _Drafting()
            async with aclosing(self._drafts(plan, plan.policy, info, drafting)) as deltas:
                async for delta in deltas:
                    first_token()
                    parts.append(delta.text)
                    yield delta
            answer = "".join(parts)
            finish, generated, kept, student_ran = drafting.finish, drafting.generated, drafting.kept, True
        while finish is None:
            tokens = self.student.tokenize(plan.student_prefix + answer, special=plan.special)
            remaining = plan.max_tokens - (len(tokens) - len(plan.student_tokens))
            if prefetch is not None:
                await prefetch.close()  # the handoff: the student's own generation takes the context
                prefetch = None
            if remaining <= 0:
                finish = "length"
                break
            watch = reguider is not None and reguider.budget_left()
            params = GenerationParams(max_tokens=remaining, temperature=plan.temperature, top_p=plan.top_p,
                                      seed=plan.seed, stop=plan.stop, logprobs=watch)
            halt = threading.Event()
            rnd = StudentRound()
            trigger: Trigger | None = None
            if reguider is not None:
                reguider.new_round()
            student_ran = True
            async with aclosing(self.student.stream(tokens, params, halt)) as gen:
                async for piece in gen:
                    if isinstance(piece, GenerationResult):
                        self._student_done(piece, info)
                        generated += piece.completion_tokens
                        if trigger is None:
                            kept += piece.completion_tokens
                            finish = "stop" if piece.finish_reason == "stop" else "length"
                            out = rnd.finish()
                        else:
                            kept += rnd.kept_tokens
                            out = ""
                    elif trigger is not None:
                        continue  # decoded after the stop was asked for: generated, not used
                    else:
                        if info.timings.handoff_gap_s is None and first is not None and first.last_token_at:
                            info.timings.handoff_gap_s = perf_counter() - first.last_token_at
                        if reguider is None or not watch:
                            out = piece.text
                        else:
                            trigger = reguider.observe(answer + rnd.pending, piece.text, piece.logprobs or [])
                            out = rnd.add(piece, trigger.drop_from if trigger else reguider.holding_from)
                            if trigger is not None:
                                halt.set()  # the student stops at its next token; its result still arrives
                    if out:
                        first_token()
                        parts.append(out)
                        answer += out
                        yield Delta(out, "student")
            if trigger is None or reguider is None:
                continue
            # Re-guidance: the teacher continues the answer as it stands (ending at a safe boundary).
            t_stop = perf_counter()
            used = len(self.student.tokenize(plan.student_prefix + answer, special=plan.special))
            m = reguider.next_tokens(plan.max_tokens - (used - len(plan.student_tokens)))
            if m <= 0:
                reguider.stop()
                continue
            call = GuidanceCall(kind="reguide", reason=trigger.reason, offset=len(answer), max_tokens=m)
            info.calls.append(call)
            warm = None
            if self.settings.fast_path:
                warm = Prefetcher(self.student, plan.student_prefix, plan.special)
                warm.start(self.student.tokenize(plan.student_prefix + answer, special=plan.special))
            try:
                async with aclosing(self._guide(plan, info, call, answer, warm, None)) as texts:
                    async for out in texts:
                        first_token()
                        parts.append(out)
                        answer += out
                        yield Delta(out, "teacher")
            finally:
                if warm is not None:
                    await warm.close()
            reguider.guided(call.teacher_tokens, call.cloud_ttft_s, reguide=True)
            if call.finish not in ("length", "stop"):
                reguider.stop()  # the cloud failed this call: the student finishes alone
            if call.finish == "stop":
                finish = "stop"  # the teacher ended the answer itself
            info.timings.reguide_s = (info.timings.reguide_s or 0.0) + perf_counter() - t_stop

        self._totals(plan, info, answer)
        info.usage.student_tokens = kept
        info.usage.student_discarded_tokens = generated - kept
        if student_ran:
            completion_tokens = info.usage.guidance_student_tokens + info.usage.student_tokens
        else:
            completion_tokens = info.usage.teacher_tokens
        info.timings.total_s = perf_counter() - t0
        counterfactual = first or (info.calls[0] if info.calls else None)  # verify: the first call's prompt
        info.cost = self._cost(info, counterfactual, wrote_all=plan.mode == "teacher" or info.guidance_complete)
        if plan.task is not None:
            info.answer = plan.task.extract("".join(parts))
        prompt_tokens = info.usage.teacher_prompt_tokens if plan.mode == "teacher" else len(plan.student_tokens)
        yield Summary(finish, info, prompt_tokens, completion_tokens)

    async def _guide(
        self, plan: Plan, info: GKTInfo, call: GuidanceCall, answer: str, prefetch: Prefetcher | None,
        stopper: FirstStop | None,
    ) -> AsyncIterator[str]:
        """One guidance call in gkt mode: the teacher continues ``answer`` (empty: starts it); yields the text
        the seam releases. ``stopper`` (adaptive) may end the stream before its k tokens."""
        request = plan.guidance
        assert request is not None  # planned for every mode that asks the cloud
        if answer:
            request = self._continuation(plan, request, answer, call.max_tokens)
        seam = GuidanceSeam()
        at_min: int | None = None
        async with aclosing(self._guidance(plan, request, info, call)) as guidance:
            async for item in guidance:
                if not isinstance(item, str):
                    continue
                early = False
                if stopper is not None:
                    # Decided before the text is shown: whole-word guidance releases each token at once, so
                    # the text after a step end ("April. In") must not reach the seam.
                    text = seam.received + item
                    if at_min is None and call.teacher_tokens >= stopper.min_tokens:
                        at_min = len(text)
                    if (end := stopper.step_end(text, at_min)) is not None:
                        item = item[: max(0, end - len(seam.received))]
                        early = True
                if out := seam.feed(item):
                    yield out  # first to the user; the prefetcher's tokenizing (ms) comes after
                    if prefetch is not None:
                        prefetch.guidance(answer + seam.kept)
                if early:
                    call.finish = "early"  # closing the stream cancels the teacher's work (C3)
                    break
        if tail := seam.finish(call.finish == "stop"):
            yield tail
        call.text = seam.kept

    async def _drafts(self, plan: Plan, policy: VerifyPolicy, info: GKTInfo, state: _Drafting) -> AsyncIterator[Delta]:
        """The verify policy: the student drafts, the teacher keeps each draft up to its first wrong token and
        writes from there, until the answer ends. The user sees each draft's kept part and the teacher's tokens.

        The student runs one draft ahead: while the teacher checks a draft, the student writes the next one as
        if the check will keep it whole; that draft is used when it was (and the teacher's token after it is
        where the new draft starts), dropped otherwise. Stop sequences are matched over the whole answer here
        (a stop may span student and teacher text). A student that stops after a draft the teacher kept whole
        ends the answer; a failed call leaves the student to finish alone (the draft stands): ``fallback`` if
        no call had succeeded, else ``partial``."""
        assert plan.guidance is not None
        guard = StopMatcher(plan.stop)
        answer = ""
        calls = 0
        ahead: _Draft | None = None  # written while the previous draft was being checked

        def show(text: str, source: Source) -> tuple[Delta | None, bool]:
            nonlocal answer
            safe, hit = guard.feed(text)
            answer += text
            return (Delta(safe, source) if safe else None), hit

        def room(text: str) -> int:
            used = len(self.student.tokenize(plan.student_prefix + text, special=plan.special))
            return plan.max_tokens - (used - len(plan.student_tokens))

        while calls < policy.max_calls:
            if ahead is not None:
                draft, ahead = ahead, None
            else:
                left = room(answer)
                if left <= 0:
                    state.finish = "length"
                    break
                draft = await self._draft(plan, answer, min(policy.draft_tokens, left), info, state)
            if draft.stopped and not draft.text:
                state.finish = "stop"  # the student ends the answer where the teacher's last check left it
                return
            call = GuidanceCall(kind="verify", offset=len(answer), max_tokens=policy.tokens, draft=draft.text)
            info.calls.append(call)
            calls += 1
            request = self._continuation(plan, plan.guidance, answer, policy.tokens).model_copy(
                update={"draft": draft.text, "whole_words": False})
            check = asyncio.ensure_future(self._written(plan, request, info, call))
            halt = threading.Event()
            nxt: asyncio.Future[_Draft] | None = None
            left = room(answer + draft.text)
            if not draft.stopped and left > 0 and calls < policy.max_calls:
                nxt = asyncio.ensure_future(self._draft(plan, answer + draft.text, min(policy.draft_tokens, left),
                                                        info, state, halt))
            try:
                written = await check
                if call.finish not in ("length", "stop"):  # the cloud failed: the draft stands, the student goes on
                    if calls == 1:
                        info.fallback = call.finish
                    else:
                        info.partial, info.partial_reason = True, call.finish
                    if nxt is not None:
                        ahead = await nxt  # written after this draft: it goes out too
                    state.kept += draft.generated
                    delta, hit = show(draft.text, "student")
                    if delta is not None:
                        yield delta
                    if draft.stopped or hit:
                        state.finish = "stop"
                        return
                    break
                accepted = min(call.draft_accepted or 0, len(draft.text))
                whole = accepted == len(draft.text)
                if nxt is not None:
                    if not whole:
                        halt.set()  # the student wrote on from text the teacher did not keep
                    ahead = (await nxt).after(written) if whole else None
                state.kept += kept_tokens(draft.pieces, accepted)
                call.offset, call.text = len(answer) + accepted, written
                hit = False
                for text, source in ((draft.text[:accepted], "student"), (written, "teacher")):
                    if text and not hit:
                        delta, hit = show(text, source)  # type: ignore[arg-type]
                        if delta is not None:
                            yield delta
                if hit or call.finish == "stop" or (draft.stopped and whole):
                    state.finish = "stop"  # a stop sequence, the teacher's end, or a student end the teacher agreed to
                    return
                if ahead is not None and ahead.stopped and not ahead.text:
                    state.finish = "stop"  # the student stops right after the teacher's token, which it also wrote
                    return
                if (call.cloud_ttft_s or 0.0) > policy.max_wait_s:
                    break
            finally:  # however this round ended (also closed or cancelled): neither task outlives it
                check.cancel()
                if nxt is not None and not nxt.done():
                    halt.set()
                    nxt.cancel()
        # No more checking (budget, a slow or failed cloud): the student's text goes out as it comes.
        if ahead is not None:
            state.kept += ahead.generated
            delta, hit = show(ahead.text, "student")
            if delta is not None:
                yield delta
            if hit or ahead.stopped:
                state.finish = "stop"
                return
        left = room(answer)
        if left <= 0:
            state.finish = "length"
        else:
            halt = threading.Event()
            params = GenerationParams(max_tokens=left, temperature=plan.temperature, top_p=plan.top_p,
                                      seed=plan.seed, stop=plan.stop)
            tokens = self.student.tokenize(plan.student_prefix + answer, special=plan.special)
            hit = False
            async with aclosing(self.student.stream(tokens, params, halt)) as gen:
                async for item in gen:
                    if isinstance(item, GenerationResult):
                        self._student_done(item, info)
                        state.generated += item.completion_tokens
                        state.kept += item.completion_tokens
                        state.finish = "stop" if item.finish_reason != "length" or hit else "length"
                    elif not hit:
                        delta, hit = show(item.text, "student")
                        if hit:
                            halt.set()  # a stop sequence across the seam: the student stops at its next token
                        if delta is not None:
                            yield delta
        if state.finish == "length" and (tail := guard.flush()):
            yield Delta(tail, "student")

    async def _draft(self, plan: Plan, answer: str, n: int, info: GKTInfo, state: _Drafting,
                     halt: threading.Event | None = None) -> _Draft:
        """Up to ``n`` student tokens after ``answer`` (``halt`` ends it early: the tokens so far stand)."""
        tokens = self.student.tokenize(plan.student_prefix + answer, special=plan.special)
        params = GenerationParams(max_tokens=n, temperature=plan.temperature, top_p=plan.top_p, seed=plan.seed,
                                  stop=plan.stop)
        draft = _Draft()
        async with aclosing(self.student.stream(tokens, params, halt)) as gen:
            async for item in gen:
                if isinstance(item, GenerationResult):
                    self._student_done(item, info)
                    state.generated += item.completion_tokens
                    draft.generated = item.completion_tokens
                    draft.stopped = item.finish_reason == "stop"
                else:
                    draft.pieces.append((item.text, item.tokens))
        return draft

    async def _written(self, plan: Plan, request: GuidanceRequest, info: GKTInfo, call: GuidanceCall) -> str:
        """What the teacher wrote in one guidance call (its frames collected; failures end up in ``call``)."""
        written = ""
        async with aclosing(self._guidance(plan, request, info, call)) as guidance:
            async for item in guidance:
                if isinstance(item, str):
                    written += item
        return written

    @staticmethod
    def _continuation(plan: Plan, request: GuidanceRequest, answer: str, max_tokens: int) -> GuidanceRequest:
        """The guidance request for the next tokens after ``answer``: the raw prompt with the answer appended,
        or the chat with the answer as a final assistant message, which the cloud continues (``continues``)."""
        if request.messages is not None:
            messages = [*request.messages, ChatMessage(role="assistant", content=answer)]
            return request.model_copy(update={"messages": messages, "max_tokens": max_tokens})
        return request.model_copy(update={"prompt": (request.prompt or "") + answer, "max_tokens": max_tokens})

    async def _guidance(
        self, plan: Plan, request: GuidanceRequest, info: GKTInfo, call: GuidanceCall
    ) -> AsyncIterator[str | DoneFrame]:
        """Guidance text as it arrives, then the done frame; cloud trouble ends it early (gkt) or raises."""
        t0 = perf_counter()
        is_first = call.kind == "first"
        got_text = False
        try:
            deadline = time.monotonic() + self.settings.guidance_timeout_s
            async with aclosing(self.cloud.guidance(request, deadline)) as frames:
                async for frame in frames:
                    if isinstance(frame, TokenFrame):
                        if call.cloud_ttft_s is None:
                            call.cloud_ttft_s = perf_counter() - t0
                        call.teacher_tokens += frame.tokens
                        call.last_token_at = perf_counter()
                        if is_first:
                            info.timings.guidance_last_token_s = call.last_token_at - t0
                        got_text = True
                        yield frame.text
                    elif isinstance(frame, DoneFrame):
                        info.teacher_model = frame.model
                        call.prompt_tokens = frame.usage.prompt_tokens
                        call.teacher_tokens = frame.usage.completion_tokens
                        call.finish = frame.finish_reason
                        call.cost = frame.cost
                        call.draft_accepted = frame.draft_accepted
                        call.draft_teacher_tokens = frame.usage.draft_tokens
                        if is_first:
                            info.timings.teacher = frame.timings
                            info.guidance_cached = frame.cached
                        yield frame
        except GKTError as err:
            if plan.mode == "teacher":
                raise
            # gkt mode never loses the answer: the student goes on from whatever guidance arrived.
            info.cloud_error = err.message
            call.finish = err.code.name
            if is_first:
                if got_text:
                    info.partial = True
                    info.partial_reason = err.code.name
                    log.warning("guidance broke off (%s): the student continues from the partial guidance",
                                err.code.name)
                else:
                    info.fallback = err.code.name
                    log.warning("no guidance (%s): the student answers alone", err.code.name)
            else:
                log.warning("%s call failed (%s): the student finishes alone", call.kind, err.code.name)
        finally:
            call.s = perf_counter() - t0
            if is_first:
                info.timings.cloud_ttft_s = call.cloud_ttft_s
                info.timings.guidance_s = call.s

    def _totals(self, plan: Plan, info: GKTInfo, answer: str) -> None:
        """Usage summed over the guidance calls; each call's text counted in the student's tokens where it
        sits in the answer."""
        u = info.usage
        info.guidance_calls = len(info.calls)
        u.teacher_tokens = sum(c.teacher_tokens for c in info.calls)
        u.teacher_draft_tokens = sum(c.draft_teacher_tokens for c in info.calls)
        u.teacher_prompt_tokens = 0
        u.guidance_student_tokens = 0
        for c in info.calls:
            if c.prompt_tokens is not None:
                u.teacher_prompt_tokens += c.prompt_tokens
            elif c.finish == "early":
                # Ended by the edge: no done frame. The same prompt, counted with the student's tokenizer.
                u.teacher_prompt_tokens += len(self.student.tokenize(plan.student_prefix + answer[: c.offset],
                                                                     special=plan.special))
                u.teacher_prompt_tokens_estimated = True
            if plan.mode == "gkt" and c.text:
                before = plan.student_prefix + answer[: c.offset]
                u.guidance_student_tokens += (
                    len(self.student.tokenize(before + c.text, special=plan.special))
                    - len(self.student.tokenize(before, special=plan.special)))

    def _cost(self, info: GKTInfo, first: GuidanceCall | None, *, wrote_all: bool) -> AnswerCost:
        """This answer's cost on both sides and had the teacher written all of it (see shared/cost.py).

        The teacher's side is what the cloud stated for each call, summed; the counterfactual teacher reads
        the prompt once (the first call's prompt tokens)."""
        u, t = info.usage, info.timings
        rates = StudentRates(per_mtok=self.settings.price_student_per_mtok,
                             cpu_per_hour=self.settings.price_cpu_per_hour)
        # Core-seconds: the student's engine time times the threads it computes with.
        cpu_s = ((t.student_prompt_s or 0.0) + (t.student_generation_s or 0.0)) * self.settings.n_threads
        ran = u.student_tokens > 0 or t.student_generation_s is not None
        processed = u.student_prompt_tokens + u.guidance_student_tokens + u.student_tokens + u.student_discarded_tokens
        prompt_tokens = first.prompt_tokens if first is not None and first.prompt_tokens is not None else \
            u.teacher_prompt_tokens
        return answer_cost(
            student=rates, student_tokens=processed if ran else 0, student_cpu_s=cpu_s,
            teacher=_sum_costs([c.cost for c in info.calls if c.cost is not None]),
            teacher_prompt_tokens=prompt_tokens, guidance_teacher_tokens=u.teacher_tokens,
            guidance_student_tokens=u.guidance_student_tokens,
            answer_student_tokens=u.guidance_student_tokens + u.student_tokens, teacher_wrote_all=wrote_all,
        )

    @staticmethod
    def _student_done(result: GenerationResult, info: GKTInfo) -> None:
        """One student round ended: its timings add up (re-guidance makes several rounds per answer)."""
        t = info.timings
        if t.student_queue_s is None:
            info.usage.student_cached_tokens = result.cached_prompt_tokens
        t.student_queue_s = (t.student_queue_s or 0.0) + result.queue_s
        t.student_prompt_s = (t.student_prompt_s or 0.0) + result.prompt_s
        t.student_generation_s = (t.student_generation_s or 0.0) + result.generation_s


@dataclass
class _Draft:
    """Student text proposed for the teacher to check: its pieces (text, tokens) and how it ended."""

    pieces: list[tuple[str, int]] = field(default_factory=list)
    generated: int = 0  # tokens (a held-back partial stop included)
    stopped: bool = False  # the student ended the answer (end of turn or a stop sequence)

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def after(self, written: str) -> _Draft | None:
        """This draft without its opening ``written`` (the teacher's token, which the student also wrote), or
        None when it opens differently or the teacher's text ends inside one of its pieces."""
        pos, i = 0, 0
        while pos < len(written) and i < len(self.pieces):
            pos += len(self.pieces[i][0])
            i += 1
        if pos != len(written) or not self.text.startswith(written):
            return None
        rest = self.pieces[i:]
        return _Draft(rest, sum(n for _, n in rest), self.stopped)


@dataclass
class _Drafting:
    """How the verify policy's rounds ended, for the answer's summary."""

    finish: Literal["stop", "length"] = "length"
    generated: int = 0  # student tokens generated, rejected drafts included
    kept: int = 0  # of them, in the answer


def _sum_costs(costs: list[TeacherCost]) -> TeacherCost | None:
    """The teacher's cost over several calls (the rates of the first: one cloud serves them all)."""
    if not costs:
        return None
    return TeacherCost(
        rates=costs[0].rates, input_tokens=sum(c.input_tokens for c in costs),
        output_tokens=sum(c.output_tokens for c in costs), accelerator_s=sum(c.accelerator_s for c in costs),
        amount=sum(c.amount for c in costs),
    )
