"""The ``gkt`` object on every response of the edge (``GKTInfo``: who wrote what, tokens, cost, timings, the
guidance calls), and the events an answer is produced as: an ``Echo`` of the prompt when asked for, ``Delta``s,
then one ``Summary``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.adapters import AdapterRef
from shared.cost import AnswerCost, TeacherCost
from shared.generation import TokenChoice
from shared.protocol import Timings

Mode = Literal["gkt", "student", "teacher"]
Source = Literal["teacher", "student"]


class GKTUsage(BaseModel):
    """Token counts on both sides (each in its own model's tokenizer)."""

    teacher_prompt_tokens: int = 0
    # Of the teacher's prompt and draft tokens, those its engine found in its KV cache (the cached-input price).
    teacher_cached_tokens: int = 0
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
    draft_student_tokens: int = 0  # verify: the student tokens behind the draft (its length, as drafted)
    text: str = ""  # the guidance kept in the answer (cut at a safe boundary)
    max_tokens: int = 0  # teacher tokens asked for
    teacher_tokens: int = 0  # teacher tokens received
    prompt_tokens: int | None = None  # the teacher's prompt tokens (None: ended early, the cloud did not say)
    cached_tokens: int = 0  # of them (and the draft), found in the teacher's KV cache, as the cloud said
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
    adapter: AdapterRef | None = None  # the student's LoRA adapter when this answer started (None: the base)
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
    """Answer text and who wrote it; with log-probabilities asked for, the student's tokens behind it (None:
    the text was given, written by the teacher, not sampled by the student)."""

    text: str
    source: Source
    choices: list[TokenChoice] | None = None


@dataclass
class Echo:
    """The prompt, first in a completion that asked for ``echo``; with log-probabilities, the student's
    scores of its tokens (the first has none: nothing comes before it)."""

    text: str
    tokens: list[int]
    choices: list[TokenChoice | None] | None = None


@dataclass
class Summary:
    """The end of an answer."""

    finish_reason: Literal["stop", "length"]
    info: GKTInfo
    prompt_tokens: int
    completion_tokens: int
