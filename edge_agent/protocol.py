"""The edge's OpenAI-compatible request models, with gkt's extension fields.

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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge_agent.policies import GuidancePolicy, policy_from
from shared.protocol import ChatMessage, check_text, normalize_stop
from shared.tasks import TASKS

Mode = Literal["gkt", "student", "teacher"]


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
