"""The edge's OpenAI-compatible API models: requests with gkt's extension fields, and the ``gkt`` object on
every response (``GKTInfo``), with the events an answer is produced as (``Delta``s, then one ``Summary``).

Extension fields (top level of the request body; with the ``openai`` client pass them in ``extra_body``):

* ``mode``: ``gkt`` (default: the teacher writes the first k tokens, the student finishes), ``student``
  (the student alone) or ``teacher`` (the teacher writes the whole answer);
* ``guidance_tokens``: k, the number of teacher tokens in gkt mode;
* ``task``: ``gsm8k`` or ``csqa``: the last user message (or the prompt) is a question, turned into the
  task's few-shot prompt with its stop sequences; the answer is extracted into ``gkt.answer``;
* ``guidance_policy``: how much of the teacher the answer gets in gkt mode: ``fixed`` (default: k tokens),
  ``adaptive``, ``reguide`` or ``verify``, as a name or an object with the name and parameters
  (``edge_agent/policies.py``).

Fields of the OpenAI API that gkt does not implement are ignored, except ``n`` > 1, which is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge_agent.policies import GuidancePolicy, policy_from
from shared.cost import AnswerCost, TeacherCost
from shared.protocol import ChatMessage, Timings, check_text, normalize_stop
from shared.tasks import TASKS

Mode = Literal["gkt", "student", "teacher"]
Source = Literal["teacher", "student"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the edge serves its configured student.")
    max_tokens: int | None = Field(None, ge=1, le=131072, description="Answer length in student tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: list[str] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    mode: Mode | None = Field(None, description="gkt (default), student or teacher.")
    guidance_tokens: int | None = Field(None, ge=1, le=8192, description="k: teacher tokens in gkt mode.")
    task: str | None = Field(None, description=f"Few-shot task: one of {sorted(TASKS)}.")
    guidance_policy: GuidancePolicy | None = Field(
        None, description="gkt mode: fixed (default), adaptive, reguide or verify, by name or with parameters."
    )

    @field_validator("guidance_policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        return policy_from(v)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return normalize_stop(v)

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | None) -> str | None:
        if v is not None and v not in TASKS:
            raise ValueError(f"unknown task {v!r}; known: {', '.join(sorted(TASKS))}")
        return v


class OpenAIMessage(BaseModel):
    """A chat message; content may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            v = "".join(texts)
        return check_text(v, "content") if isinstance(v, str) else v

    def to_chat(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=str(self.content))


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[OpenAIMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=131072)

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_chat() for m in self.messages]


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str = Field(description="Raw prompt, continued as is.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return check_text(v, "prompt")


# --- responses -----------------------------------------------------------------------------------------------


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
