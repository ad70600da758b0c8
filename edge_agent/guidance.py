"""The cloud's side of one answer: each guidance call, what it sent, and what became of it.

Every call (the first guidance, a re-guidance, a verify check) is a ``GuidanceCall`` in ``gkt.calls``, filled
in from the frames as they arrive. In ``teacher`` mode cloud trouble is the client's error (raised); in ``gkt``
mode the answer is never lost: the call ends early, and the books say so (``fallback`` when the first guidance
brought nothing, ``partial`` when it broke off after some text). Guidance text reaches the answer through a
``GuidanceSeam`` (``edge_agent/seam.py``), which releases it at once but for trailing whitespace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from time import perf_counter
from typing import Any, Literal

from edge_agent.answer import GKTInfo, GuidanceCall
from edge_agent.cloud import CloudClient
from edge_agent.fastpath import Prefetcher
from edge_agent.plan import Plan
from edge_agent.policies import FirstStop
from edge_agent.seam import GuidanceSeam
from shared.errors import ErrorCode, GKTError
from shared.protocol import ChatMessage, DoneFrame, GuidanceRequest, TokenFrame, TokenLogprob

log = logging.getLogger("gkt.edge")


class Guidance:
    """Guidance calls for one answer, against the cloud client (its retries and breaker) and a deadline each."""

    def __init__(self, cloud: CloudClient, plan: Plan, info: GKTInfo, timeout_s: float) -> None:
        assert plan.guidance is not None  # planned for every mode that asks the cloud
        self.cloud = cloud
        self.plan = plan
        self.request = plan.guidance
        self.info = info
        self.timeout_s = timeout_s

    def call(self, kind: Literal["first", "reguide", "verify"], max_tokens: int, **fields: Any) -> GuidanceCall:
        """A new call of this answer, recorded in ``gkt.calls``."""
        call = GuidanceCall(kind=kind, max_tokens=max_tokens, **fields)
        self.info.calls.append(call)
        return call

    def continuation(self, answer: str, max_tokens: int) -> GuidanceRequest:
        """The guidance request for the next tokens after ``answer``: the raw prompt with the answer appended,
        or the chat with the answer as a final assistant message, which the cloud continues (``continues``)."""
        request = self.request
        if request.messages is not None:
            messages = [*request.messages, ChatMessage(role="assistant", content=answer)]
            return request.model_copy(update={"messages": messages, "max_tokens": max_tokens})
        return request.model_copy(update={"prompt": (request.prompt or "") + answer, "max_tokens": max_tokens})

    async def text(self, request: GuidanceRequest, call: GuidanceCall) -> AsyncIterator[str]:
        """The teacher's text as it arrives; cloud trouble ends it early (gkt mode) or raises (teacher mode)."""
        async with aclosing(self.tokens(request, call)) as items:
            async for text, _ in items:
                yield text

    async def tokens(self, request: GuidanceRequest, call: GuidanceCall
                     ) -> AsyncIterator[tuple[str, list[TokenLogprob] | None]]:
        """``text``, each piece with the teacher's tokens behind it when the request asked for them."""
        info = self.info
        t0 = perf_counter()
        is_first = call.kind == "first"
        got_text = False
        try:
            deadline = time.monotonic() + self.timeout_s
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
                        yield frame.text, frame.logprobs
                    elif isinstance(frame, DoneFrame):
                        info.teacher_model = frame.model
                        call.prompt_tokens = frame.usage.prompt_tokens
                        call.cached_tokens = frame.usage.cached_tokens
                        call.teacher_tokens = frame.usage.completion_tokens
                        call.finish = frame.finish_reason
                        call.cost = frame.cost
                        call.draft_accepted = frame.draft_accepted
                        call.draft_teacher_tokens = frame.usage.draft_tokens
                        if is_first:
                            info.timings.teacher = frame.timings
                            info.guidance_cached = frame.cached
        except GKTError as err:
            if self.plan.mode == "teacher":
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

    async def names_teacher_tokens(self, student_vocab: str) -> None:
        """Raise a 400 unless the teacher's token ids mean what the student's do (the same vocabulary
        fingerprint, ``shared/tokenize.py``), so the edge can name the teacher's log-probabilities."""
        try:
            teacher_vocab = await self.cloud.teacher_vocabulary()
        except GKTError as err:
            raise GKTError(ErrorCode.invalid_request, f"logprobs in teacher mode need the teacher's vocabulary, "
                           f"which the cloud did not give ({err.code.name})", param="logprobs") from err
        if teacher_vocab != student_vocab:
            raise GKTError(ErrorCode.invalid_request, "logprobs in teacher mode need a teacher with the student's "
                           "vocabulary (its token ids are named with the student's); this pair has two",
                           param="logprobs")

    async def written(self, request: GuidanceRequest, call: GuidanceCall) -> str:
        """All the teacher wrote in one call (failures end up in ``call``)."""
        written = ""
        async with aclosing(self.text(request, call)) as texts:
            async for text in texts:
                written += text
        return written

    async def guide(
        self, call: GuidanceCall, answer: str, prefetch: Prefetcher | None = None, stopper: FirstStop | None = None
    ) -> AsyncIterator[str]:
        """One guidance call in gkt mode: the teacher continues ``answer`` (empty: starts it); yields the text
        the seam releases and feeds it to ``prefetch``. ``stopper`` (adaptive) may end it before its k tokens."""
        request = self.continuation(answer, call.max_tokens) if answer else self.request
        seam = GuidanceSeam()
        at_min: int | None = None
        async with aclosing(self.text(request, call)) as texts:
            async for item in texts:
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
