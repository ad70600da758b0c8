"""Guidance first, the student after: the ``fixed``, ``adaptive`` and ``reguide`` policies, and ``student`` mode.

1. **First guidance** (gkt mode): the teacher starts the answer; the seam releases its text at once, and the
   fast path prefills the student's prompt plus that text while it streams. ``adaptive`` ends it at the first
   step boundary after ``min_tokens`` (``FirstStop``). A teacher that ends the answer itself leaves the
   student nothing to do.
2. **Student rounds**: the student continues ``prompt + answer``. Under ``reguide`` each piece goes past a
   ``Reguider`` with its log-probabilities; a trigger halts the student, takes back the unsure span
   (``StudentRound``) and asks the teacher for the next tokens, after which a new round starts. Otherwise
   there is one round, which ends the answer.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from time import perf_counter

from edge_agent.accounting import Books
from edge_agent.answer import Delta, GuidanceCall
from edge_agent.guidance import Guidance
from edge_agent.plan import Plan
from edge_agent.policies import FirstStop, ReguidePolicy, Reguider, Trigger
from edge_agent.rollback import StudentRound
from edge_agent.runners import Finish
from edge_agent.session import StudentSession
from shared.generation import GenerationResult


class GuidedRunner:
    """The teacher's guidance (none in student mode) starts the answer; the student finishes it."""

    def __init__(
        self, plan: Plan, session: StudentSession, books: Books, guidance: Guidance | None = None, *,
        stopper: FirstStop | None = None, reguide: ReguidePolicy | None = None,
    ) -> None:
        assert reguide is None or guidance is not None  # re-guidance asks the cloud
        self.plan = plan
        self.session = session
        self.books = books
        self.guidance = guidance
        self.stopper = stopper
        self.reguide = reguide
        self.finish: Finish | None = None
        self._first: GuidanceCall | None = None
        self._trigger: Trigger | None = None  # how the last student round ended, if in a call for the teacher

    async def run(self) -> AsyncIterator[Delta]:
        info = self.books.info
        answer = ""
        prefetch = self.session.prefetcher(answer) if self.guidance is not None else None
        try:
            if self.guidance is not None:
                info.guidance_tokens = self.plan.k
                first = self._first = self.guidance.call("first", self.plan.k)
                async with aclosing(self.guidance.guide(first, answer, prefetch, self.stopper)) as texts:
                    async for text in texts:
                        answer += text
                        yield Delta(text, "teacher")
                info.guidance = first.text
                info.guidance_complete = first.finish == "stop"
                if info.guidance_complete:
                    self.finish = "stop"
            reguider = self._reguider()
            while self.finish is None:
                if prefetch is not None:
                    await prefetch.close()  # the handoff: the student's own generation takes the context
                    prefetch = None
                left = self.session.room(answer)
                if left <= 0:
                    self.finish = "length"
                    break
                async with aclosing(self._round(answer, left, reguider)) as deltas:
                    async for delta in deltas:
                        answer += delta.text
                        yield delta
                if self._trigger is not None and reguider is not None:
                    async with aclosing(self._reguide(answer, reguider, self._trigger)) as texts:
                        async for text in texts:
                            answer += text
                            yield Delta(text, "teacher")
        finally:
            if prefetch is not None:
                await prefetch.close()

    def _reguider(self) -> Reguider | None:
        """The re-guidance decisions for this answer (reguide policy), told about the first guidance."""
        if self.reguide is None:
            return None
        first = self._first
        reguider = Reguider(self.reguide, first.teacher_tokens if first else 0)
        reguider.guided(0, first.cloud_ttft_s if first else None, reguide=False)
        if self.books.info.fallback or self.books.info.partial:
            reguider.stop()  # the cloud is in trouble: do not make this answer wait on it again
        return reguider

    async def _round(self, answer: str, left: int, reguider: Reguider | None) -> AsyncIterator[Delta]:
        """One student generation after ``answer``, up to ``left`` tokens; the text it releases (with its tokens'
        log-probabilities when asked for: under reguide, those of the pieces its released text comes from). It ends the
        answer, or (reguide) with a trigger in ``self._trigger``: the teacher is to write next."""
        watch = reguider is not None and reguider.budget_left()
        halt = threading.Event()
        rnd = StudentRound()
        trigger: Trigger | None = None
        self._trigger = None
        if reguider is not None:
            reguider.new_round()
        async with aclosing(self.session.stream(answer, left, logprobs=watch, halt=halt)) as gen:
            async for piece in gen:
                choices = None
                if isinstance(piece, GenerationResult):
                    if trigger is None:
                        self.books.kept(piece.completion_tokens)
                        self.finish = "stop" if piece.finish_reason == "stop" else "length"
                        out = rnd.finish()
                        choices = rnd.released_choices()
                    else:
                        self.books.kept(rnd.kept_tokens)
                        out = ""
                elif trigger is not None:
                    continue  # decoded after the stop was asked for: generated, not used
                else:
                    self._note_handoff()
                    if reguider is None or not watch:
                        out, choices = piece.text, piece.choices
                    else:
                        trigger = reguider.observe(answer + rnd.pending, piece.text, piece.logprobs or [])
                        out = rnd.add(piece, trigger.drop_from if trigger else reguider.holding_from)
                        choices = rnd.released_choices()
                        if trigger is not None:
                            halt.set()  # the student stops at its next token; its result still arrives
                if out:
                    answer += out
                    yield Delta(out, "student", choices)
        self._trigger = trigger

    def _note_handoff(self) -> None:
        """The student's first token: the gap since the first guidance's last token is the handoff gap."""
        timings, first = self.books.info.timings, self._first
        if timings.handoff_gap_s is None and first is not None and first.last_token_at:
            timings.handoff_gap_s = perf_counter() - first.last_token_at

    async def _reguide(self, answer: str, reguider: Reguider, trigger: Trigger) -> AsyncIterator[str]:
        """Re-guidance: the teacher continues the answer as it stands (ending at a safe boundary), while the
        student's prompt plus the answer and the new guidance is prefilled."""
        assert self.guidance is not None
        t_stop = perf_counter()
        m = reguider.next_tokens(self.session.room(answer))
        if m <= 0:
            reguider.stop()
            return
        call = self.guidance.call("reguide", m, reason=trigger.reason, offset=len(answer))
        warm = self.session.prefetcher(answer)
        try:
            async with aclosing(self.guidance.guide(call, answer, warm)) as texts:
                async for text in texts:
                    yield text
        finally:
            if warm is not None:
                await warm.close()
        reguider.guided(call.teacher_tokens, call.cloud_ttft_s, reguide=True)
        if call.finish not in ("length", "stop"):
            reguider.stop()  # the cloud failed this call: the student finishes alone
        if call.finish == "stop":
            self.finish = "stop"  # the teacher ended the answer itself
        self.books.reguided(perf_counter() - t_stop)
