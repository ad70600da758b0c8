"""The ``verify`` policy: the student drafts, the teacher keeps each draft up to its first wrong token and writes from
there, until the answer ends. The user sees each draft's kept part (``student``) and the teacher's tokens.

The student runs one draft ahead: while the teacher checks a draft, the student writes the next one as if the check
will keep it whole; that draft is used when it was (and the teacher's token after it is where the new draft
starts), dropped otherwise. With ``draft_tokens: auto`` each draft's length, and whether to write ahead at all,
come from ``edge_agent/draft_length.py`` (the answer's running acceptance and timings). Stop sequences are matched
over the whole answer here (a stop may span student and teacher text). A student that stops after a draft the
teacher kept whole ends the answer; a failed call leaves the student to finish alone (the draft stands):
``fallback`` if no call had succeeded, else ``partial``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from edge_agent.accounting import Books
from edge_agent.answer import Delta, Source
from edge_agent.draft_length import DraftLength
from edge_agent.guidance import Guidance
from edge_agent.policies import VerifyPolicy, kept_tokens, pieces_used
from edge_agent.runners import Finish
from edge_agent.session import StudentSession
from shared.generation import GenerationResult, StopMatcher, TokenChoice


@dataclass
class Draft:
    """Student text proposed for the teacher to check: its pieces (text, tokens) and how it ended, and with
    log-probabilities asked for, each piece's tokens (``choices``, parallel to ``pieces``)."""

    pieces: list[tuple[str, int]] = field(default_factory=list)
    generated: int = 0  # tokens (a held-back partial stop included)
    stopped: bool = False  # the student ended the answer (end of turn or a stop sequence)
    choices: list[list[TokenChoice] | None] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def choices_before(self, chars: int) -> list[TokenChoice] | None:
        """The tokens behind the first ``chars`` characters, the pieces ``kept_tokens`` counts; None without
        log-probabilities."""
        if not self.choices or any(c is None for c in self.choices):
            return None
        used = self.choices[: pieces_used([text for text, _ in self.pieces], chars)]
        return [c for choices in used for c in choices or []]

    def after(self, written: str) -> Draft | None:
        """This draft without its opening ``written`` (the teacher's token, which the student also wrote), or
        None when it opens differently or the teacher's text ends inside one of its pieces."""
        pos, i = 0, 0
        while pos < len(written) and i < len(self.pieces):
            pos += len(self.pieces[i][0])
            i += 1
        if pos != len(written) or not self.text.startswith(written):
            return None
        rest = self.pieces[i:]
        return Draft(rest, sum(n for _, n in rest), self.stopped, self.choices[i:])


@dataclass
class VerifyRunner:
    """Draft, check, keep, repeat: the answer is the teacher's greedy answer, written mostly by the student."""

    session: StudentSession
    guidance: Guidance
    books: Books
    policy: VerifyPolicy
    finish: Finish | None = "length"
    _answer: str = field(default="", init=False)  # all text so far, a stop sequence's possible start included
    _guard: StopMatcher = field(init=False)
    _held: list[TokenChoice] = field(default_factory=list, init=False)  # tokens of student text the guard holds
    _lengths: DraftLength | None = field(default=None, init=False)  # draft_tokens auto: the lengths' decider

    def __post_init__(self) -> None:
        self._guard = StopMatcher(self.session.plan.stop)
        if self.policy.draft_tokens == "auto":
            self._lengths = DraftLength(most=self.policy.max_draft_tokens, ahead_min=self.policy.ahead_min)

    def _length(self) -> int:
        """The next draft's length: fixed, or what the answer's measurements say keeps the most per second."""
        return self._lengths.next() if self._lengths is not None else self.policy.draft_tokens  # type: ignore[return-value]

    def _ahead(self, draft: Draft) -> bool:
        """Whether to write the next draft while ``draft`` is checked."""
        return self._lengths is None or self._lengths.draft_ahead(draft.generated)

    def _show(self, text: str, source: Source, choices: list[TokenChoice] | None = None) -> tuple[Delta | None, bool]:
        """``text`` joins the answer; the part no stop sequence may still claim goes out, and whether one hit.
        The student's tokens behind text held back go out with its next text."""
        safe, hit = self._guard.feed(text)
        self._answer += text
        if source == "student" and choices is not None:
            choices, self._held = self._held + choices, []
            if not safe:
                self._held, choices = choices, None
        return (Delta(safe, source, choices if source == "student" else None) if safe else None), hit

    async def run(self) -> AsyncIterator[Delta]:
        info, policy, room = self.books.info, self.policy, self.session.room
        calls = 0
        ahead: Draft | None = None  # written while the previous draft was being checked
        while calls < policy.max_calls:
            answer = self._answer
            if ahead is not None:
                draft, ahead = ahead, None
            else:
                left = room(answer)
                if left <= 0:
                    self.finish = "length"
                    break
                draft = await self._draft(answer, min(self._length(), left))
                while not draft.text and not draft.stopped and draft.generated < left:
                    # No text yet (the tokens so far spell part of a character, as one-token drafts of emoji
                    # do): write on, since the cloud refuses an empty draft.
                    draft = await self._draft(answer, min(draft.generated + 4, left))
            if not draft.text and not draft.stopped:
                break  # no room left to show it: the student finishes alone, as at any budget's end
            if draft.stopped and not draft.text:
                self.finish = "stop"  # the student ends the answer where the teacher's last check left it
                return
            call = self.guidance.call("verify", policy.tokens, offset=len(answer), draft=draft.text,
                                      draft_student_tokens=draft.generated)
            calls += 1
            request = self.guidance.continuation(answer, policy.tokens).model_copy(
                update={"draft": draft.text, "whole_words": False})
            check = asyncio.ensure_future(self.guidance.written(request, call))
            halt = threading.Event()
            nxt: asyncio.Future[Draft] | None = None
            left = room(answer + draft.text)
            if not draft.stopped and left > 0 and calls < policy.max_calls and self._ahead(draft):
                # One token more: its first is the teacher's next token, which the kept draft will not include.
                nxt = asyncio.ensure_future(self._draft(answer + draft.text, min(self._length() + 1, left), halt))
            try:
                written = await check
                if call.finish not in ("length", "stop"):  # the cloud failed: the draft stands, the student goes on
                    if calls == 1:
                        info.fallback = call.finish
                    else:
                        info.partial, info.partial_reason = True, call.finish
                    if nxt is not None:
                        ahead = await nxt  # written after this draft: it goes out too
                    self.books.kept(draft.generated)
                    delta, hit = self._show(draft.text, "student", draft.choices_before(len(draft.text)))
                    if delta is not None:
                        yield delta
                    if draft.stopped or hit:
                        self.finish = "stop"
                        return
                    break
                accepted = min(call.draft_accepted or 0, len(draft.text))
                whole = accepted == len(draft.text)
                kept = kept_tokens(draft.pieces, accepted)
                if self._lengths is not None:
                    self._lengths.observe_check(draft.generated, kept, whole, call.s)
                if nxt is not None:
                    if not whole:
                        halt.set()  # the student wrote on from text the teacher did not keep
                    ahead = (await nxt).after(written) if whole else None
                    if ahead is not None and not ahead.text and not ahead.stopped:
                        ahead = None  # nothing after the teacher's token (a one-token draft): draft anew, never empty
                self.books.kept(kept)
                call.offset, call.text = len(answer) + accepted, written
                hit = False
                choices = draft.choices_before(accepted)
                for text, source in ((draft.text[:accepted], "student"), (written, "teacher")):
                    if text and not hit:
                        delta, hit = self._show(text, source, choices)  # type: ignore[arg-type]
                        if delta is not None:
                            yield delta
                if hit or call.finish == "stop" or (draft.stopped and whole):
                    self.finish = "stop"  # a stop sequence, the teacher's end, or a student end the teacher agreed to
                    return
                if ahead is not None and ahead.stopped and not ahead.text:
                    self.finish = "stop"  # the student stops right after the teacher's token, which it also wrote
                    return
                if (call.cloud_ttft_s or 0.0) > policy.max_wait_s:
                    break
            finally:  # however this round ended (also closed or cancelled): neither task outlives it
                check.cancel()
                if nxt is not None and not nxt.done():
                    halt.set()
                    nxt.cancel()
        async with aclosing(self._alone(ahead)) as deltas:
            async for delta in deltas:
                yield delta

    async def _alone(self, ahead: Draft | None) -> AsyncIterator[Delta]:
        """No more checking (budget, a slow or failed cloud): the student's text goes out as it comes."""
        if ahead is not None:
            self.books.kept(ahead.generated)
            delta, hit = self._show(ahead.text, "student", ahead.choices_before(len(ahead.text)))
            if delta is not None:
                yield delta
            if hit or ahead.stopped:
                self.finish = "stop"
                return
        left = self.session.room(self._answer)
        if left <= 0:
            self.finish = "length"
        else:
            halt = threading.Event()
            hit = False
            async with aclosing(self.session.stream(self._answer, left, halt=halt)) as gen:
                async for item in gen:
                    if isinstance(item, GenerationResult):
                        self.books.kept(item.completion_tokens)
                        self.finish = "stop" if item.finish_reason != "length" or hit else "length"
                    elif not hit:
                        delta, hit = self._show(item.text, "student", item.choices)
                        if hit:
                            halt.set()  # a stop sequence across the seam: the student stops at its next token
                        if delta is not None:
                            yield delta
        if self.finish == "length" and (tail := self._guard.flush()):
            yield Delta(tail, "student", self._held if self.session.plan.logprobs is not None else None)

    async def _draft(self, answer: str, n: int, halt: threading.Event | None = None) -> Draft:
        """Up to ``n`` student tokens after ``answer`` (``halt`` ends it early: the tokens so far stand)."""
        draft = Draft()
        t0 = time.perf_counter()
        async with aclosing(self.session.stream(answer, n, halt=halt)) as gen:
            async for item in gen:
                if isinstance(item, GenerationResult):
                    draft.generated = item.completion_tokens
                    draft.stopped = item.finish_reason == "stop"
                else:
                    draft.pieces.append((item.text, item.tokens))
                    draft.choices.append(item.choices)
        if self._lengths is not None:
            self._lengths.observe_draft(draft.generated, time.perf_counter() - t0)
        return draft
