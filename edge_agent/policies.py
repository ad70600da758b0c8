"""Guidance policies: how much of the teacher each answer gets, chosen per request.

A policy is named in the request's ``guidance_policy`` field (a name, or an object with the name and
parameters) and decides two things, from signals the edge sees anyway:

* **when the first guidance ends** (``first_stop``): ``fixed`` takes exactly k teacher tokens (the paper's
  scheme, and the default); ``adaptive`` asks for up to ``max_tokens`` and ends the stream at the first
  step boundary (a line end, or a sentence end followed by more text) once ``min_tokens`` have arrived: the
  teacher's plan is out, the student writes the rest of the step;
* **whether to ask again** (``Reguider``): ``reguide`` watches the student's confidence (the log-probability
  of each token it samples) and, when it stays low for ``span`` tokens, or drops at a decision point (a
  number, an operator, the final answer line), stops the student, takes back what it wrote of the unsure
  span, and asks the teacher for the next ``tokens`` tokens of the answer so far; then the student goes on;
* or, under ``verify``, **who checks whom**: the student drafts ``draft_tokens`` tokens at a time (``auto``:
  a length per draft, ``edge_agent/draft_length.py``) and the
  teacher reads each draft (one prompt pass over it, no decoding), keeps it up to the first token it would not
  have chosen itself (greedy), and writes ``tokens`` of its own from there. The answer is the teacher's own
  greedy answer (the same text, up to tokenizer seams), while the teacher writes only the tokens where the
  student was wrong: an error signal rather than the student's uncertainty. The cloud does the checking
  (``GuidanceRequest.draft``): the llama.cpp teacher backend, or vLLM behind the openai backend.

Everything here is pure (text and numbers in, decisions out), so the decisions are tested on scripted
sequences (``tests/test_policies.py``); the runners in ``edge_agent/runners/`` do the I/O.

Each policy's parameters, defaults and ranges are the ``Field``s of its model below (the request's schema;
README.md shows them as a table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PolicyName = Literal["fixed", "adaptive", "reguide", "verify"]


class FixedPolicy(BaseModel):
    """The teacher writes exactly k (``guidance_tokens``) tokens, then the student finishes."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["fixed"] = "fixed"


class AdaptivePolicy(BaseModel):
    """The first guidance ends at the first step boundary after ``min_tokens`` (at most ``max_tokens``)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["adaptive"] = "adaptive"
    min_tokens: int = Field(16, ge=1, le=8192, description="Teacher tokens before a boundary may end it.")
    max_tokens: int = Field(80, ge=1, le=8192, description="Most teacher tokens the first guidance takes.")

    @model_validator(mode="after")
    def _order(self) -> AdaptivePolicy:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class ReguidePolicy(BaseModel):
    """k teacher tokens first, then more teacher tokens wherever the student's confidence drops."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["reguide"] = "reguide"
    tokens: int = Field(16, ge=1, le=1024, description="m: teacher tokens per re-guidance.")
    threshold: float = Field(-1.5, le=0.0, description="A student token below this log-probability is unsure.")
    span: int = Field(2, ge=1, le=64, description="Unsure tokens in a row that call the teacher.")
    decision_threshold: float = Field(
        -0.5, le=0.0, description="At a decision point (number, operator, answer line) one token below this calls."
    )
    max_calls: int = Field(4, ge=0, le=64, description="Re-guidance calls per answer.")
    max_teacher_tokens: int = Field(160, ge=1, le=8192, description="Teacher tokens per answer, all calls.")
    min_gap: int = Field(8, ge=0, le=4096, description="Student tokens after any guidance before the next call.")
    max_wait_s: float = Field(10.0, gt=0.0, le=3600.0,
                              description="No more calls once a guidance call took longer to its first token.")


class VerifyPolicy(BaseModel):
    """The student drafts, the teacher keeps each draft up to its first wrong token and writes from there."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["verify"] = "verify"
    draft_tokens: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        8, description="Student tokens per draft the teacher checks: a number, or auto (each draft the length that "
                       "keeps the most answer per second, from the answer's running acceptance and timings)")
    max_draft_tokens: int = Field(32, ge=1, le=256, description="auto: the longest draft.")
    ahead_min: float = Field(0.5, ge=0.0, le=1.0,
                             description="auto: draft the next draft during a check only when this one is at least "
                                         "this likely to be kept whole (else the work is mostly thrown away).")
    tokens: int = Field(1, ge=1, le=256, description="Teacher tokens written where a draft goes wrong.")
    max_calls: int = Field(256, ge=0, le=4096,
                           description="Verification calls per answer; then the student finishes alone.")
    max_wait_s: float = Field(10.0, gt=0.0, le=3600.0,
                              description="No more calls once one took longer than this to its first token.")


Policy = FixedPolicy | AdaptivePolicy | ReguidePolicy | VerifyPolicy
GuidancePolicy = Annotated[Policy, Field(discriminator="name")]  # as a request field: chosen by ``name``


def pieces_used(texts: list[str], chars: int) -> int:
    """How many of a draft's pieces (their texts, in order) its first ``chars`` characters use; a piece the cut
    goes through counts (its start is in the answer)."""
    used = pos = 0
    for text in texts:
        if pos >= chars:
            break
        used += 1
        pos += len(text)
    return used


def kept_tokens(pieces: list[tuple[str, int]], chars: int) -> int:
    """Tokens of a draft's pieces ((text, tokens) in order) that its first ``chars`` characters use."""
    return sum(tokens for _, tokens in pieces[: pieces_used([text for text, _ in pieces], chars)])


def policy_from(value: Any) -> Any:
    """A bare name stands for that policy with its defaults (``"reguide"`` == ``{"name": "reguide"}``)."""
    return {"name": value} if isinstance(value, str) else value


# --- the first guidance ----------------------------------------------------------------------------------

# A step ends at a line end, or at a sentence end (. ! ? :) that is followed by whitespace: "24 clips. So"
# ends a step, "3.5" and "e.g." inside a sentence do not (the character after the stop is not whitespace,
# or no whitespace has arrived yet).
_STEP_END = re.compile(r"\n|[.!?:](?=\s)")


@dataclass
class FirstStop:
    """Decides, token frame by token frame, whether the first guidance has said enough."""

    min_tokens: int
    max_tokens: int

    def request_tokens(self) -> int:
        return self.max_tokens

    def enough(self, text: str, tokens: int, text_at_min: int | None) -> bool:
        """``text``: the guidance received so far, ``tokens`` its teacher token count; ``text_at_min``: how
        long ``text`` was when ``min_tokens`` were reached (None before). True: end the stream now."""
        return self.step_end(text, text_at_min) is not None

    def step_end(self, text: str, text_at_min: int | None) -> int | None:
        """Where the first step end after ``min_tokens`` lies in ``text`` (the guidance ends there), or None.
        A boundary counts only if it lies after min_tokens' text (the plan must be out first)."""
        if text_at_min is None:
            return None
        found = _STEP_END.search(text, max(0, text_at_min - 1))
        return None if found is None else found.end()


def first_stop(policy: Policy) -> FirstStop | None:
    """The early end of the first guidance, or None when it runs to its k."""
    if isinstance(policy, AdaptivePolicy):
        return FirstStop(policy.min_tokens, policy.max_tokens)
    return None


# --- re-guidance -----------------------------------------------------------------------------------------

_OPERATORS = {"=", "+", "-", "*", "/", "×", "÷", "x"}
# The answer line up to its first character: "The answer is", "answer:", and the "(" of a choice letter
# ("(C)") or the "$" of an amount, which the student writes as a token of its own before the decision itself.
_ANSWER_LINE = re.compile(r"answer(?: is|:)\s*[($]?$", re.IGNORECASE)


def decision_point(answer: str, piece: str) -> bool:
    """Is ``piece`` (what the student is about to write after ``answer``) a decision: a number, an operator,
    or the first words of the final answer ("The answer is" ...)?"""
    word = piece.strip()
    if any(c.isdigit() for c in word) or word in _OPERATORS:
        return True
    return bool(word) and _ANSWER_LINE.search(answer.rstrip()) is not None


@dataclass
class Trigger:
    """Why the teacher is called again, and from which token of the student's round its text is taken back."""

    reason: Literal["low_confidence", "decision_point"]
    drop_from: int  # index of the first piece (of this student round) to take back


class Reguider:
    """The re-guidance decisions of one answer: when to call the teacher and what the budget allows.

    The guided runner reports every student piece (``observe``), every guidance call (``guided``) and asks for
    the size of the next call (``next_tokens``); nothing here waits or talks to the network.
    """

    def __init__(self, policy: ReguidePolicy, first_tokens: int) -> None:
        self.policy = policy
        self.calls = 0  # re-guidance calls made
        self.teacher_tokens = first_tokens  # all calls, the first guidance included
        self.stopped = False
        self._since_guidance = 0
        self._run_start: int | None = None  # piece index where the current unsure run began
        self._index = -1

    def budget_left(self) -> bool:
        p = self.policy
        return not self.stopped and self.calls < p.max_calls and self.teacher_tokens < p.max_teacher_tokens

    def next_tokens(self, room: int) -> int:
        """Teacher tokens for the next call: m, within the teacher budget and the answer's ``room``."""
        return max(0, min(self.policy.tokens, self.policy.max_teacher_tokens - self.teacher_tokens, room))

    def stop(self) -> None:
        """No more re-guidance for this answer (the cloud failed, or no room is left)."""
        self.stopped = True

    def new_round(self) -> None:
        """The student starts (again) after guidance: piece indices restart at 0, the unsure run is cleared."""
        self._index = -1
        self._run_start = None

    def guided(self, teacher_tokens: int, first_token_s: float | None, *, reguide: bool) -> None:
        """A guidance call ended: count it; a slow round trip ends re-guidance for this answer."""
        if reguide:
            self.calls += 1
            self.teacher_tokens += teacher_tokens
        self._since_guidance = 0
        if first_token_s is not None and first_token_s > self.policy.max_wait_s:
            self.stopped = True

    def observe(self, answer: str, piece: str, logprobs: list[float]) -> Trigger | None:
        """The student sampled ``piece`` (its tokens' log-probabilities) after ``answer``: call the teacher?

        Returns a trigger, or None to let the student go on. The piece itself is not yet part of the answer.
        """
        self._index += 1
        lp = min(logprobs) if logprobs else 0.0
        self._since_guidance += max(1, len(logprobs))
        if not self.budget_left() or self._since_guidance <= self.policy.min_gap:
            # The student's own tokens right after guidance stand whatever their confidence: an unsure run
            # starts only after the gap, so a call never takes back what the gap let the student write.
            self._run_start = None
            return None
        if lp < self.policy.threshold:
            if self._run_start is None:
                self._run_start = self._index
        else:
            self._run_start = None
        if self._run_start is not None and self._index - self._run_start + 1 >= self.policy.span:
            return Trigger("low_confidence", self._run_start)
        if lp < self.policy.decision_threshold and decision_point(answer, piece):
            return Trigger("decision_point", self._index)
        return None

    @property
    def holding_from(self) -> int | None:
        """The first piece of the current unsure run (text from there may still be taken back)."""
        return self._run_start
